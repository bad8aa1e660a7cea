"""Mesh, rules and shardings on 8 CPU devices: a sharded train step equals the one-device step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from internvl_jax import losses, optim, sharding
from internvl_jax.config import chat_preset, internvl_preset, llama_preset, vision_preset
from internvl_jax.models import layers
from internvl_jax.models.intern_vit import InternViT
from internvl_jax.models.llama import Llama
from internvl_jax.stages.contrastive import ContrastiveStage
from internvl_jax.stages.generative import GenerativeStage
from internvl_jax.stages.sft import ChatStage
from internvl_jax.train import config as config_lib

VIT = vision_preset("tiny")  # width 64, 4 heads, MLP 256: every sharded dimension divides 8
BATCH = 8


def boxed_vit_params(config=VIT):
  pixels = jnp.zeros((1, config.image_size, config.image_size, 3))
  return jax.eval_shape(lambda: InternViT(config).init(jax.random.key(0), pixels)["params"])


def specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


@pytest.mark.parametrize("config, devices, shape", [
    (sharding.MeshConfig(), 8, (8, 1, 1)),
    (sharding.MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (sharding.MeshConfig(data=1, fsdp=4, tensor=-1), 8, (1, 4, 2)),
    (sharding.MeshConfig(data=1, fsdp=8, tensor=1), 8, (1, 8, 1)),
])
def test_mesh_config_resolves_the_rest(config, devices, shape):
  assert config.shape(devices) == shape


@pytest.mark.parametrize("config, message", [
    (sharding.MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
    (sharding.MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices, but there are 8"),
    (sharding.MeshConfig(data=-1, fsdp=3), "do not divide the 8 devices"),
    (sharding.MeshConfig(data=0), "must be positive"),
])
def test_mesh_config_errors_say_what_to_change(config, message):
  with pytest.raises(ValueError, match=message):
    config.shape(8)


def test_make_mesh_has_auto_axes_over_all_or_given_devices():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh.axis_names == sharding.MESH_AXES and tuple(mesh.shape.values()) == (2, 2, 2)
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert set(mesh.devices.flat) == set(jax.devices())
  single = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[3:4])
  assert tuple(single.shape.values()) == (1, 1, 1) and single.devices.flat[0] == jax.devices()[3]


@pytest.mark.parametrize("env, multi", [
    ({}, False),
    ({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
])
def test_multi_process_environments_are_recognized(env, multi):
  assert sharding.is_multi_process_environment(env) == multi


def test_distributed_initialize_runs_only_for_multi_process(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  assert not sharding.maybe_initialize_distributed(env={})
  assert calls == []
  assert sharding.maybe_initialize_distributed(env={"SLURM_NTASKS": "4"})
  assert calls == [{"num_processes": None, "process_id": None}]
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert sharding.maybe_initialize_distributed(env=env)
  assert calls[-1] == {"num_processes": 2, "process_id": 1}
  assert sharding.maybe_initialize_distributed(enabled=True, env={}) and len(calls) == 3
  assert sharding.maybe_initialize_distributed(env={**env, sharding.HEARTBEAT_TIMEOUT_ENV: "15"})
  assert calls[-1] == {"num_processes": 2, "process_id": 1, "heartbeat_timeout_seconds": 15}


def boxed_llama_params(config=llama_preset("tiny")):
  return jax.eval_shape(
      lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def test_one_vocabulary_shards_each_tower_by_role():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  vit = specs(sharding.param_shardings(boxed_vit_params(), mesh, sharding.RULES))["blocks"]
  llm = specs(sharding.param_shardings(boxed_llama_params(), mesh, sharding.RULES))["layers"]
  # InternViT's attention is not tensor parallel; the LLM's is, over query and key/value heads.
  assert vit["attn"]["qkv"]["kernel"] == P(None, "fsdp", None, None, None)
  assert vit["attn"]["proj"]["kernel"] == P(None, None, None, "fsdp")
  assert llm["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert llm["self_attn"]["k_proj"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert llm["self_attn"]["o_proj"]["kernel"] == P(None, "tensor", None, "fsdp")
  # Both MLPs are.
  assert vit["mlp"]["fc1"]["kernel"] == P(None, "fsdp", "tensor")
  assert vit["mlp"]["fc2"]["kernel"] == P(None, "tensor", "fsdp")
  assert llm["mlp"]["gate_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert vit["norm1"]["scale"] == P(None, None) and vit["ls1"] == P(None, None)


@pytest.mark.parametrize("stage", [
    ContrastiveStage(internvl_preset("tiny", variant="C")), GenerativeStage(internvl_preset("tiny")),
    ChatStage(chat_preset("tiny-qllama"), max_len=64)], ids=["internvl_c", "internvl_g", "chat"])
def test_every_param_axis_name_is_in_the_vocabulary(stage):
  boxed = jax.eval_shape(stage.init, jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  used = {name for leaf in leaves if isinstance(leaf, nn.Partitioned) for name in leaf.names}
  assert used - {None} <= {name for name, _ in sharding.RULES}


def test_config_rules_override_the_table():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  config = config_lib.override(sharding.MeshConfig(data=2, fsdp=2, tensor=2),
                               config_lib.parse_settings(["rules=(('mlp', None),)"]))  # --set
  assert config.rules == (("mlp", None),)
  blocks = specs(sharding.param_shardings(boxed_vit_params(), mesh, config.logical_rules))
  assert blocks["blocks"]["mlp"]["fc1"]["kernel"] == P(None, "fsdp", None)
  assert sharding.MeshConfig().logical_rules == sharding.RULES


@pytest.mark.parametrize("rules, message", [
    ((("act_mlp", None),), r"unknown logical axis 'act_mlp'"),
    ((("mlp", "model"),), r"'mlp' maps to \['model'\], which are not mesh axes"),
])
def test_config_rules_must_name_known_axes(rules, message):
  with pytest.raises(ValueError, match=message):
    sharding.MeshConfig(rules=rules)


def test_a_dimension_that_does_not_divide_names_the_param():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
  odd = boxed_vit_params(vision_preset("tiny", hidden_size=36, num_heads=4, mlp_dim=72))
  with pytest.raises(ValueError, match=r"param blocks/.* 36 cannot be split over mesh axes fsdp"):
    sharding.param_shardings(odd, mesh, sharding.RULES)


def test_sharding_context_turns_logical_activation_names_into_constraints():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  mlp = layers.Mlp(32)
  x = jnp.ones((8, 5, 16))
  params, _ = sharding.sharded_init(lambda key: mlp.init(key, x)["params"], mesh,
                                    sharding.RULES, jax.random.key(0))
  forward = jax.jit(lambda p, x: mlp.apply({"params": p}, x))
  assert "sharding_constraint" not in forward.lower(params, x).as_text()
  with sharding.sharding_context(mesh, sharding.RULES):
    hlo = forward.lower(params, x).as_text()
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in hlo


# One training step: InternViT features (mean over tokens) against fixed text embeddings with the
# CLIP loss and a learnable temperature, AdamW with groups, layer decay and a frozen param. Adam's
# first step is lr * g / (|g| + eps): with a tiny eps, float rounding in near-zero gradients would
# move params by up to lr, so eps is large enough that 1e-5 compares the sharding, not rounding.
OPTIMIZER = optim.OptimizerConfig(
    learning_rate=1e-2, lr_groups=(("temperature", "logit_scale", 1e-3),), b2=0.95, eps=1e-4,
    weight_decay=0.1, grad_clip_norm=1.0, total_steps=10, frozen=("pos_embed",),
    layer_decay=(optim.LayerDecay(0.8, depth=VIT.num_layers, prefix="^vision/"),))


def init_fn(key):
  pixels = jnp.zeros((1, VIT.image_size, VIT.image_size, 3))
  return {"vision": InternViT(VIT).init(key, pixels)["params"],
          "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}


def make_train_step(tx, mask):
  def loss_fn(params, pixels, text):
    features = InternViT(VIT).apply({"params": params["vision"]}, pixels).last_hidden_state
    image = features.mean(axis=1)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    return losses.clip_softmax_loss(image, text, params["logit_scale"])[0]

  def train_step(params, opt_state, pixels, text):
    trainable, frozen = optim.partition(params, mask)
    loss, grads = jax.value_and_grad(
        lambda t: loss_fn(optim.merge(t, frozen), pixels, text))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optim.merge(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  return train_step


@pytest.fixture(scope="module")
def training():
  """The optimizer, trainable mask, batch, and the unsharded one-device step's results."""
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(BATCH, VIT.image_size, VIT.image_size, 3)).astype(np.float32)
  text = rng.normal(size=(BATCH, VIT.hidden_size)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  tx = optim.make_optimizer(OPTIMIZER)
  params = nn.meta.unbox(jax.jit(init_fn)(jax.random.key(0)))
  mask = optim.trainable_mask(OPTIMIZER, params)
  opt_state = tx.init(optim.partition(params, mask)[0])
  new_params, _, loss = jax.jit(make_train_step(tx, mask))(params, opt_state, pixels, text)
  return dict(tx=tx, mask=mask, pixels=pixels, text=text, params=params,
              new_params=new_params, loss=loss)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_sharded_train_step_matches_one_device(training, mesh_shape):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  tx, mask = training["tx"], training["mask"]
  params, shardings = sharding.sharded_init(init_fn, mesh, sharding.RULES, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params, training["params"])
  trainable_shardings = optim.partition(shardings, mask)[0]
  opt_state, state_shardings = sharding.sharded_opt_init(
      tx, optim.partition(params, mask)[0], trainable_shardings, mesh)

  batch = sharding.batch_sharding(mesh)
  step = jax.jit(make_train_step(tx, mask),
                 in_shardings=(shardings, state_shardings, batch, batch),
                 out_shardings=(shardings, state_shardings, NamedSharding(mesh, P())))
  with sharding.sharding_context(mesh, sharding.RULES):  # the models' constraints apply
    new_params, new_state, loss = step(params, opt_state, training["pixels"], training["text"])

  np.testing.assert_allclose(loss, training["loss"], atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               new_params, training["new_params"])
  qkv = ("vision", "blocks", "attn", "qkv", "kernel")
  leaf = lambda tree: tree[qkv[0]][qkv[1]][qkv[2]][qkv[3]][qkv[4]]
  assert leaf(new_params).sharding == leaf(shardings)
  if mesh_shape[1] > 1:
    assert leaf(new_params).addressable_shards[0].data.shape[1] == VIT.hidden_size // mesh_shape[1]
  adam = next(state for state in new_state.inner_states["trainable"].inner_state
              if isinstance(state, optax.ScaleByAdamState))
  moments = adam.mu
  assert leaf(moments).sharding == leaf(shardings)
  assert isinstance(moments["vision"]["embeddings"]["pos_embed"], optax.MaskedNode)

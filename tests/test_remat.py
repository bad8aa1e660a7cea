"""Named remat policies (models/remat.py): every policy keeps the loss and gradients, a save
policy keeps exactly the tagged values it names, and an offload policy moves them to host memory,
on CPU and in a program compiled for TPU."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.config import QLlamaConfig, llama_preset, vision_preset
from internvl_jax.models import intern_vit, llama, qllama, remat
from llama_fixtures import GQA

# One block of each tower, as (make_block(policy), apply(block, params, x), x, init_args): the
# block's class wrapped in the policy, how it is applied to the residual stream x, and the other
# arguments that its init takes.


def _vit_block():
  config = vision_preset("tiny")
  x = np.random.default_rng(1).normal(size=(2, 17, config.hidden_size)).astype(np.float32)
  return (lambda policy: remat.remat(intern_vit.Block, policy)(config),
          lambda block, params, x: block.apply(params, x, 0.0)[0], x, (0.0,))


def _decoder_layer():
  x = np.random.default_rng(1).normal(size=(2, 8, GQA.hidden_size)).astype(np.float32)
  mask, _, positions = llama.attention_mask_and_positions(np.ones((2, 8), np.int32), None)
  return (lambda policy: remat.remat(llama.DecoderLayer, policy)(GQA),
          lambda block, params, x: block.apply(params, x, mask, positions, None, None)[0], x,
          (mask, positions, None, None))


def _qllama_block():
  config = QLlamaConfig(text=llama_preset("tiny"), vision_width=48, num_queries=4)
  x = np.random.default_rng(1).normal(size=(2, 12, config.text.hidden_size)).astype(np.float32)
  vision = np.random.default_rng(2).normal(size=(2, 5, 48)).astype(np.float32)
  mask, positions = qllama.attention_mask_and_positions("itg", np.ones((2, 8), bool),
                                                        config.num_queries)
  return (lambda policy: remat.remat(qllama.QLlamaBlock, policy)(config),
          lambda block, params, x: block.apply(params, x, vision, mask, positions, None, None)[0],
          x, (vision, mask, positions, None, None))


@pytest.fixture(scope="module")
def gradients():
  """Loss and gradients of a decoder layer (grouped-query attention, RoPE) under every policy,
  from one compiled function. The towers' tests run their scanned stacks with named policies."""
  make_block, apply, x, init_args = _decoder_layer()
  params = jax.jit(make_block("none").init)(jax.random.key(0), x, *init_args)

  def loss(policy):
    block = make_block(policy)
    return lambda p, x: jnp.sum(apply(block, p, x)**2)

  @jax.jit
  def every_policy(p, x):
    return {policy: jax.value_and_grad(loss(policy), argnums=(0, 1))(p, x)
            for policy in remat.POLICIES}

  return every_policy(params, x)


@pytest.mark.parametrize("policy", [p for p in remat.POLICIES if p != "none"])
def test_every_policy_keeps_the_loss_and_gradients(gradients, policy):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               gradients[policy], gradients["none"])


def _abstract_params(block, x, init_args):
  return jax.eval_shape(block.init, jax.random.key(0), x, *init_args)  # tracing needs no values


@pytest.mark.parametrize("block", [_vit_block, _decoder_layer, _qllama_block])
def test_each_block_tags_every_name_of_the_vocabulary_and_no_other(block):
  make_block, apply, x, init_args = block()
  plain = make_block("none")
  jaxpr = jax.make_jaxpr(lambda p, x: apply(plain, p, x))(_abstract_params(plain, x, init_args), x)
  tags = {eqn.params["name"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "name"}
  assert tags == set(remat.CHECKPOINT_NAMES)


def _saved_residuals(make_block, apply, x, init_args, policy):
  """(name or "host", shape) of each residual of the block's VJP that is not an input."""
  block = make_block(policy)
  params = _abstract_params(block, x, init_args)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(lambda p, x: apply(block, p, x), params, x)
  residuals = []
  for line in out.getvalue().splitlines():
    if " from the argument " in line or " from a constant" in line:
      continue
    on_host, shape = re.match(r"\w+(<host>)?(\[[\d,]*\])", line).groups()
    named = re.search(r"named '(\w+)'", line)
    residuals.append(("host" if on_host else named.group(1) if named else None, shape))
  return residuals


# A LLaMA layer adds its MLP's output to the residual stream alone, whose gradient does not need
# it (in a QLLaMA block the next layer does); InternViT's LayerScale multiplies it, so it is needed.
@pytest.mark.parametrize("block, unneeded", [(_vit_block, ()), (_decoder_layer, ("mlp_out",)),
                                             (_qllama_block, ())])
@pytest.mark.parametrize("named_set", remat.NAMED_SETS)
def test_a_policy_keeps_exactly_its_named_values_and_offloads_them(block, unneeded, named_set):
  args = block()
  saved = _saved_residuals(*args, f"save_{named_set}")
  assert {name for name, _ in saved} == set(remat.NAMED_SETS[named_set]) - set(unneeded)
  offloaded = _saved_residuals(*args, f"offload_{named_set}")
  assert sorted(shape for _, shape in saved) == sorted(shape for _, shape in offloaded)
  assert {name for name, _ in offloaded} == {"host"}


def test_full_remat_keeps_only_the_inputs():
  assert not _saved_residuals(*_decoder_layer(), "full")


@pytest.mark.own_process
def test_an_offload_policy_compiles_for_tpu_with_the_values_in_host_memory():
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  device = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  config = GQA.replace(remat_policy="offload_dot_except_mlp")
  tokens = on_tpu(jax.ShapeDtypeStruct((2, 128), jnp.int32))
  loss = lambda p, t: jnp.sum(llama.Llama(config).apply({"params": p}, t).logits**2)
  compiled = jax.jit(jax.grad(loss)).lower(
      jax.tree.map(on_tpu, llama.abstract_params(config)), tokens).compile()
  # q, k, v and the output projection of every layer and token, in float32.
  widths = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim + config.hidden_size
  expected = config.num_layers * tokens.size * widths * 4
  assert compiled.memory_analysis().host_temp_size_in_bytes == expected


def test_an_unknown_policy_fails_listing_the_known_ones():
  with pytest.raises(ValueError, match="'sometimes' is not one of .*'offload_dot_except_mlp'"):
    llama_preset("tiny", remat_policy="sometimes")
  with pytest.raises(ValueError, match="'save_everything' is not one of .*'save_qkv_proj'"):
    remat.remat(llama.DecoderLayer, "save_everything")

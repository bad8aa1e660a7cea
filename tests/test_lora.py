"""LoRA (models/lora.py) and the fine-tuning switches (stages/sft.py `Freeze`): adapters sit on
the official target layers, a fresh one changes nothing, the merged model computes what the
adapted one does, frozen weights hold no optimizer state and a step moves only what trains."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from internvl_jax import optim
from internvl_jax.config import LoraConfig, chat_preset
from internvl_jax.models import lora
from internvl_jax.models.chat import InternVLChat
from internvl_jax.stages.sft import ChatStage, Freeze
from internvl_jax.train.loop import Trainer

from test_stage3 import MAX_LEN, make_batch
from train_fixtures import GRADIENT_OPTIMIZER, one_step, train_config

MODEL = chat_preset("tiny-v1.0", lora=LoraConfig(vision_rank=2, llm_rank=4))
STAGE = ChatStage(MODEL, max_len=MAX_LEN)


def names(tree) -> set[str]:
  return {optim.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def logits(config, params, batch):
  """The model's logits with its adapters applied (none if `config.lora` is None)."""
  with lora.adapters(config.lora):
    return InternVLChat(config).apply({"params": params}, batch["tiles"], batch["tile_count"],
                                      batch["tokens"], batch["token_mask"])


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(jax.jit(STAGE.init)(jax.random.key(0)))


def test_adapters_sit_on_the_official_targets_stacked_over_layers(params):
  adapters = {name for name in names(params) if "lora_" in name}
  assert adapters == {f"{module}/lora_{ab}" for ab in "ab" for module in (
      "vision_model/blocks/attn/qkv", "vision_model/blocks/attn/proj",
      "vision_model/blocks/mlp/fc1", "vision_model/blocks/mlp/fc2",
      *(f"language_model/layers/self_attn/{p}_proj" for p in "qkvo"),
      *(f"language_model/layers/mlp/{p}_proj" for p in ("gate", "up", "down")))}
  qkv = params["vision_model"]["blocks"]["attn"]["qkv"]
  depth, width = MODEL.vision.num_layers, MODEL.vision.hidden_size
  assert qkv["lora_a"].shape == (depth, width, 2)
  assert qkv["lora_b"].shape == (depth, 2) + qkv["kernel"].shape[2:]
  o_proj = params["language_model"]["layers"]["self_attn"]["o_proj"]
  assert o_proj["lora_a"].shape == o_proj["kernel"].shape[:-1] + (4,)
  np.testing.assert_array_equal(o_proj["lora_b"], 0.0)


def test_a_fresh_adapter_changes_nothing_and_the_merged_model_equals_the_adapted_one(params):
  batch = make_batch(batch_size=2)
  plain, plain_params = lora.merge(MODEL, params)
  assert plain.lora is None and not any("lora_" in name for name in names(plain_params))
  np.testing.assert_allclose(logits(MODEL, params, batch), logits(plain, plain_params, batch),
                             atol=1e-6)

  rng = np.random.default_rng(0)
  trained = jax.tree_util.tree_map_with_path(
      lambda path, x: (x + rng.normal(scale=0.1, size=x.shape).astype(np.float32)
                       if "lora_" in optim.path_name(path) else x), params)
  adapted = logits(MODEL, trained, batch)
  base = logits(plain, plain_params, batch)
  assert np.max(np.abs(adapted - base)) > 1e-2  # the adapters are in use
  merged_config, merged = lora.merge(MODEL, trained)
  np.testing.assert_allclose(logits(merged_config, merged, batch), adapted, atol=1e-5, rtol=1e-5)


def test_lora_fine_tuning_trains_the_adapters_alone():
  optimizer = GRADIENT_OPTIMIZER.replace(**Freeze().masks(MODEL.lora))
  trainer = Trainer(train_config(STAGE, optimizer))
  state, _ = one_step(trainer, make_batch())
  # Adam's two moments of the adapters (and the projector, which Freeze() trains) and no more.
  trainable = {name for name in names(state.params)
               if "lora_" in name or name.startswith("mlp1/")}
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * sum(
      np.size(x) for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
      if optim.path_name(path) in trainable) + 2
  before = trainer.factory.init(seed=0).params
  moved = {optim.path_name(path) for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(state.params))
           if not np.array_equal(a, b)}
  # lora_a gets no gradient while B is zero; everything but the adapters' B and mlp1 holds still.
  assert moved == {name for name in trainable if not name.endswith("lora_a")}


def test_freeze_switches_follow_the_official_flags():
  masks = Freeze(vision=True, projector=True, llm=False, unfreeze_vision_layers=-1).masks()
  config = optim.OptimizerConfig(**masks)
  abstract = nn.meta.unbox(jax.eval_shape(
      ChatStage(chat_preset("tiny-v1.0"), max_len=MAX_LEN).init, jax.random.key(0)))
  mask = optim.trainable_mask(config, abstract)
  np.testing.assert_array_equal(mask["vision_model"]["blocks"]["mlp"]["fc1"]["kernel"],
                                [False, True])
  assert mask["vision_model"]["embeddings"]["pos_embed"] is False
  assert not any(jax.tree.leaves(mask["mlp1"]))
  assert all(jax.tree.leaves(mask["language_model"]))
  with_lora = Freeze(vision=False).masks(LoraConfig(llm_rank=8))
  assert with_lora["trainable"] == (r"^vision_model/", r"^mlp[12]/", lora.ADAPTER_PARAMS)

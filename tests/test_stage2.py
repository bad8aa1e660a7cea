"""Stage 2 (InternVL-G, ITC + ITM + ITG): accumulation equals the unaccumulated step, packed ITG
captions train as one per row, only the new parts train and hold optimizer state, the optional
InternVL-C ITC term, and the analytic FLOPs agree with XLA's."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internvl_jax import losses, optim, sharding
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.data import packing
from internvl_jax.data.tokenizer import IGNORE_LABEL
from internvl_jax.flops import internvl_g_stage2_forward_flops
from internvl_jax.models.internvl import InternVLG, abstract_params
from internvl_jax.stages.generative import TRAINABLE_PARAMS, GenerativeStage
from internvl_jax.train.config import TrainConfig
from internvl_jax.train.loop import Trainer

from train_fixtures import GRADIENT_OPTIMIZER, one_step, train_config

MODEL = internvl_preset("tiny")
TEXT_LEN = 12
BATCH = 16
PREFIX = 3  # BOS and a two-token "English caption:" stand-in: no labels


def make_batch(index: int = 0, batch_size: int = BATCH):
  """Random stage-2 rows as the pair pipeline gives them; the last row is a padding row (all
  zeros, valid False)."""
  rng = np.random.default_rng(index)
  cfg = MODEL.text

  def texts():
    out = np.zeros((batch_size, TEXT_LEN), np.int32)
    for row, length in enumerate(rng.integers(PREFIX + 2, TEXT_LEN + 1, size=batch_size)):
      out[row, :length - 1] = rng.integers(3, cfg.vocab_size, size=length - 1)
      out[row, 0], out[row, length - 1] = cfg.bos_id, cfg.eos_id
    return out

  text, itg_text = texts(), texts()
  itg_labels = np.where(itg_text != cfg.pad_id, itg_text, IGNORE_LABEL)
  itg_labels[:, :PREFIX] = IGNORE_LABEL
  # Per-row labels, not the reference's half-and-half layout: the split into micro-batches must
  # keep each row's own label.
  batch = {"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32), "text": text,
           "itm_text": np.roll(text, 1, axis=0),
           "itm_label": rng.integers(0, 2, size=batch_size).astype(np.int32),
           "itg_text": itg_text, "itg_labels": itg_labels.astype(np.int32),
           "valid": np.ones((batch_size,), bool)}
  for value in batch.values():
    value[-1] = 0
  return batch


def packed(batch, slots: int):
  """`batch`'s valid rows packed `slots` pairs to a row (the last row's empty slots unfilled),
  their ITG captions in rows of slots x TEXT_LEN tokens, as the pair pipeline packs them."""
  rows = int(np.sum(batch["valid"]))
  examples = [{key: value[i] for key, value in batch.items()} for i in range(rows)]
  layout = packing.Packing(pack_length=slots * TEXT_LEN, pack_tiles=slots, buffer_size=1)
  rows = [packing.pack_pairs(examples[i:i + slots], layout) for i in range(0, rows, slots)]
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]} | {
      "valid": np.ones((len(rows),), bool)}


def config(slots: int | None = None, **changes) -> TrainConfig:
  optimizer = GRADIENT_OPTIMIZER.replace(b2=0.98, weight_decay=0.05, trainable=(TRAINABLE_PARAMS,))
  # Vocabulary blocks of 48 of the 128 tokens, so that ITG's loss loops, sharded or not.
  stage = GenerativeStage(MODEL, text_len=TEXT_LEN, loss_block_size=48)
  if slots is not None:
    stage = dataclasses.replace(stage, pack_length=slots * TEXT_LEN, pack_tiles=slots)
  return train_config(stage, optimizer, **({"global_batch_size": BATCH} | changes))


@pytest.fixture(scope="module")
def unaccumulated():
  trainer = Trainer(config())
  initial = jax.tree.map(np.asarray, trainer.factory.init(seed=0))
  state, metrics = one_step(trainer, make_batch())
  return initial, state, metrics


def names(tree) -> set[str]:
  return {optim.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("mesh, accum_steps, slots", [
    (sharding.MeshConfig(data=-1), 2, None),
    # Params sharded, 4-way data parallel, and the 15 pairs packed two to a row (the last row's
    # second slot empty): packed captions train as one per row.
    (sharding.MeshConfig(data=2, fsdp=2, tensor=2), 2, 2),
])
def test_accumulated_step_equals_the_unaccumulated_step(unaccumulated, mesh, accum_steps, slots):
  _, state, metrics = unaccumulated
  batch = make_batch() if slots is None else packed(make_batch(), slots)
  acc_state, acc_metrics = one_step(
      Trainer(config(slots, mesh=mesh, accum_steps=accum_steps,
                     global_batch_size=len(batch["valid"]))), batch)
  assert np.isfinite(metrics["loss"])
  # The whole-batch losses (not means of micro-batch losses) and their gradient; only the order
  # of float sums differs.
  for name in ("loss", "itc_loss", "itm_loss", "itg_loss", "grad_norm", "itm_accuracy",
               "i2t_accuracy", "t2i_accuracy"):
    np.testing.assert_allclose(acc_metrics[name], metrics[name], rtol=2e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               acc_state.params, state.params)


def test_a_packed_caption_gets_the_logits_it_gets_in_a_row_of_its_own():
  params = jax.jit(lambda key: nn.meta.unbox(GenerativeStage(MODEL, TEXT_LEN).init(key)))(
      jax.random.key(0))
  batch, model = make_batch(), InternVLG(MODEL)
  tokens = np.stack([batch["text"], batch["text"], batch["itg_text"]])
  logits = jax.jit(lambda *args, **kwargs: model.apply({"params": params}, *args,
                                                       **kwargs).lm_logits)
  alone = logits(batch["image"], tokens, tokens > 0)
  rows = packed({key: value[:12] for key, value in batch.items()}, slots=3)
  pairs = lambda x: x.reshape((-1,) + x.shape[2:])
  text = np.stack([pairs(rows["text"])] * 2)
  together = logits(pairs(rows["image"]), text, text > 0,
                    packed_itg=(rows["itg_text"], rows["itg_slots"]))
  for i in range(12):
    where = rows["itg_slots"][i // 3] == i % 3 + 1
    length = int(np.sum(batch["itg_text"][i] > 0))
    np.testing.assert_allclose(together[i // 3][where], alone[i, :length], rtol=1e-5, atol=1e-5)


def test_only_the_new_parts_train_and_hold_optimizer_state(unaccumulated):
  initial, state, _ = unaccumulated
  trainable = {name for name in names(initial.params) if re.search(TRAINABLE_PARAMS, name)}
  assert trainable == {name for name in names(initial.params) if name.startswith(
      ("qllama/query_tokens", "qllama/layers/layer_0/cross_attn/", "clip_projector2/",
       "itm_head/", "logit_scale"))}
  for moments in ("mu", "nu"):
    assert names(optax.tree_utils.tree_get(state.opt_state, moments)) == trainable
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial.params, state.params)
  flat = {optim.path_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(changed)[0]}
  assert {name for name, leaf in flat.items() if leaf} == trainable


def test_backbone_itc_scores_internvl_cs_embedding_over_the_whole_accumulated_batch():
  # The demo's setting: the text tower trains too, so the term's gradient reaches it.
  base = config()
  optimizer = dataclasses.replace(base.optimizer,
                                  trainable=(TRAINABLE_PARAMS, r"^qllama/layers/"))
  stage = GenerativeStage(MODEL, text_len=TEXT_LEN, backbone_itc=True)
  trainer = Trainer(base.replace(stage=stage, optimizer=optimizer, accum_steps=2))
  params = jax.tree.map(np.asarray, trainer.factory.init(seed=0).params)
  batch = make_batch()
  _, metrics = one_step(trainer, batch)
  np.testing.assert_allclose(
      metrics["loss"], metrics["itc_loss"] + metrics["itm_loss"] + metrics["itg_loss"] +
      metrics["backbone_itc_loss"], rtol=1e-6)

  # InternVL-C's image embedding against the ITC text features, every row against every column.
  features = jax.jit(lambda b: stage.encode(params, b, jax.random.key(1), train=False))(batch)
  model = InternVLG(MODEL)
  image_c = jax.jit(lambda p: model.apply({"params": p}, batch["image"], mode="C",
                                          method=model.encode_image))(params)
  np.testing.assert_allclose(features["backbone"], image_c, rtol=1e-5, atol=1e-6)
  expected, _ = losses.clip_softmax_loss(image_c, features["text"], params["logit_scale"],
                                         max_logit_scale=stage.max_logit_scale,
                                         valid=batch["valid"])
  np.testing.assert_allclose(metrics["backbone_itc_loss"], expected, rtol=2e-5)


def test_itg_loss_is_the_next_token_loss_of_the_lm_logits():
  stage = GenerativeStage(MODEL, text_len=TEXT_LEN, loss_block_size=48)
  params = nn.meta.unbox(jax.jit(stage.init)(jax.random.key(0)))
  batch = make_batch()
  batch["itg_labels"][-1] = batch["itg_labels"][0]  # a padding row's labels must not count
  features = jax.jit(lambda b: stage.encode(params, b, jax.random.key(1), train=False))(batch)
  # ITG rows see only their queries, so the other two text batches do not change their logits.
  tokens = np.stack([batch["text"], batch["text"], batch["itg_text"]])
  logits = jax.jit(lambda p: InternVLG(MODEL).apply({"params": p}, batch["image"], tokens,
                                                    tokens > 0).lm_logits)(params)
  nll, counts = losses.lm_example_losses(logits, batch["itg_labels"], ignore_index=IGNORE_LABEL,
                                         valid=batch["valid"])
  assert counts[-1] == 0 and np.sum(counts) > 0
  np.testing.assert_array_equal(features["itg_tokens"], counts)
  np.testing.assert_allclose(features["itg_nll"], nll, rtol=1e-5)


def test_itm_rows_use_their_own_caption_where_labelled_positive():
  stage = GenerativeStage(MODEL, text_len=TEXT_LEN)
  params = nn.meta.unbox(jax.jit(stage.init)(jax.random.key(0)))
  batch = make_batch()
  positive = dict(batch, itm_label=np.ones_like(batch["itm_label"]))
  negative_is_own = dict(batch, itm_label=np.zeros_like(batch["itm_label"]),
                         itm_text=batch["text"])
  encode = jax.jit(lambda b: stage.encode(params, b, jax.random.key(1), train=False))
  logits = [encode(b)["itm_logits"] for b in (positive, negative_is_own)]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6)
  assert stage.count_tokens(positive) == 2 * np.sum(batch["text"] > 0) + np.sum(
      batch["itg_text"] > 0)


@pytest.mark.parametrize("packing_shape", [None, (2, 20)])
def test_forward_flops_match_xla(packing_shape):
  # One layer of ViT and one QLLaMA block: XLA counts a scan body once. Two pairs, unpacked or in
  # one packed row of 2 slots and 20 caption tokens.
  model = internvl_preset("tiny", vision=vision_preset("tiny", num_layers=1),
                          text=llama_preset("tiny", num_layers=2, vocab_size=512))
  pixels = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  texts = 3 if packing_shape is None else 2
  tokens = jax.ShapeDtypeStruct((texts, 2, TEXT_LEN), jnp.int32)
  if packing_shape is None:
    forward = jax.jit(lambda p, x, t: InternVLG(model).apply({"params": p}, x, t, t > 0))
    args, rows = (), 2
  else:
    captions = jax.ShapeDtypeStruct((1, packing_shape[1]), jnp.int32)
    forward = jax.jit(lambda p, x, t, c, s: InternVLG(model).apply(
        {"params": p}, x, t, t > 0, packed_itg=(c, s)))
    args, rows = (captions, captions), 1
  compiled = forward.lower(abstract_params(model), pixels, tokens, *args).compile()
  analytic = rows * internvl_g_stage2_forward_flops(model, (32, 32), TEXT_LEN, packing_shape)
  assert analytic <= compiled.cost_analysis()["flops"] <= 1.1 * analytic

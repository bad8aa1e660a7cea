"""Stage 3 on packed rows: a packed row gives each conversation the loss it has in a row of its
own, and the stage's loss and gradients are those of the same conversations one per row, for each
official loss reduction (token, sample, square)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.config import chat_preset
from internvl_jax.data import packing
from internvl_jax.data.tokenizer import IGNORE_LABEL
from internvl_jax.models.chat import InternVLChat
from internvl_jax.stages.sft import LOSS_REDUCTIONS, ChatStage

# 32-px tiles shuffled to 4 image tokens each; LLM width 64; one block per tower, to compile fast.
_TINY = chat_preset("tiny-v1.5")
MODEL = _TINY.replace(vision=_TINY.vision.replace(num_layers=1),
                      llm=_TINY.llm.replace(num_layers=1))
MAX_LEN, MAX_TILES = 24, 2  # tile slots: 2 tiles + the thumbnail
PACKING = packing.Packing(pack_length=64, pack_tiles=6, buffer_size=1)
# (tiles, tokens, answer tokens) per conversation; the first three share a packed row.
CONVERSATIONS = ((1, 14, 5), (0, 9, 3), (2, 20, 6), (3, 24, 9))


def example(index: int, tiles: int, length: int, answer: int) -> dict:
  """A conversation as the chat pipeline gives it: BOS, the image tokens, a prompt, an answer."""
  rng = np.random.default_rng(index)
  size, slots = MODEL.image_size, MAX_TILES + 1
  image_tokens = tiles * MODEL.num_image_tokens
  tokens = np.zeros((MAX_LEN,), np.int32)
  tokens[0] = MODEL.llm.bos_id
  tokens[1:1 + image_tokens] = MODEL.image_context_id
  tokens[1 + image_tokens:length] = rng.integers(3, MODEL.image_context_id,
                                                 size=length - 1 - image_tokens)
  labels = np.full((MAX_LEN,), IGNORE_LABEL, np.int32)
  labels[length - answer:length] = tokens[length - answer:length]
  pixels = np.zeros((slots, size, size, 3), np.float32)
  pixels[:tiles] = rng.normal(size=(tiles, size, size, 3))
  return {"tiles": pixels, "tile_count": np.int32(tiles), "tokens": tokens, "labels": labels,
          "token_mask": np.arange(MAX_LEN) < length}


EXAMPLES = [example(i, *c) for i, c in enumerate(CONVERSATIONS)]


def stack(rows: list[dict]) -> dict:
  return {**{k: np.stack([r[k] for r in rows]) for k in rows[0]},
          "valid": np.ones((len(rows),), bool)}


UNPACKED = stack(EXAMPLES)
PACKED = stack([packing.pack_conversations(EXAMPLES[:3], PACKING), packing.pack_conversations(EXAMPLES[3:], PACKING)])


def stages(reduction: str) -> tuple[ChatStage, ChatStage]:
  # Vocabulary blocks of 48 of the 128 tokens: the last block is shifted back.
  unpacked = ChatStage(MODEL, max_len=MAX_LEN, max_tiles=MAX_TILES, loss_block_size=48,
                       loss_reduction=reduction)
  return unpacked, dataclasses.replace(unpacked, pack_length=PACKING.pack_length,
                                       pack_tiles=PACKING.pack_tiles)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(jax.jit(stages("token")[0].init)(jax.random.key(0)))


@pytest.fixture(scope="module")
def unpacked_nll(params):
  return conversation_nll(params, UNPACKED, "token_mask")


@jax.jit
def log_probs_of(params, tiles, tile_count, tokens, mask):
  logits = InternVLChat(MODEL).apply({"params": params}, tiles, tile_count, tokens, mask)
  return jax.nn.log_softmax(logits, axis=-1)


def conversation_nll(params, batch, mask_key: str) -> list[float]:
  """Each conversation's summed answer NLL, from the model's logits, in order."""
  log_probs = np.asarray(log_probs_of(params, batch["tiles"], batch["tile_count"],
                                      batch["tokens"], batch[mask_key]))
  segments = batch[mask_key].astype(np.int32)
  out = []
  for row in range(len(segments)):
    for segment in range(1, segments[row].max() + 1):
      out.append(-sum(log_probs[row, t - 1, batch["labels"][row, t]]
                      for t in range(1, segments.shape[1])
                      if segments[row, t] == segment and batch["labels"][row, t] != IGNORE_LABEL))
  return out


def test_a_packed_row_gives_each_conversation_its_own_loss(params, unpacked_nll):
  np.testing.assert_allclose(conversation_nll(params, PACKED, "segment_ids"), unpacked_nll,
                             rtol=1e-5)


def losses_and_grads(packed: bool, params, batch):
  """Each reduction's loss and gradients, in one compiled function (the forward pass is shared,
  the backward pass batched over the reductions)."""
  chosen = [stages(reduction)[packed] for reduction in LOSS_REDUCTIONS]

  def losses(p):
    values = [stage.loss(p, stage.encode(p, batch, None), batch) for stage in chosen]
    return jnp.stack([loss for loss, _ in values]), values[0][1]["answer_tokens"]

  return jax.jit(lambda p: (losses(p), jax.jacrev(lambda q: losses(q)[0])(p)))(params)


@pytest.fixture(scope="module")
def reference(params):
  return losses_and_grads(False, params, UNPACKED)


@pytest.fixture(scope="module")
def packed_result(params):
  return losses_and_grads(True, params, PACKED)


@pytest.mark.parametrize("index, reduction", list(enumerate(LOSS_REDUCTIONS)))
def test_packed_loss_and_gradients_equal_one_conversation_per_row(unpacked_nll, reference,
                                                                 packed_result, index, reduction):
  (loss, tokens), grads = jax.tree.map(lambda x: np.asarray(x)[index] if x.ndim else x,
                                       reference)
  (packed_loss, packed_tokens), packed_grads = jax.tree.map(
      lambda x: np.asarray(x)[index] if x.ndim else x, packed_result)
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
  assert packed_tokens == tokens == 23
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), packed_grads, grads)
  # The reduction's official weighting of the conversations' NLL sums s over their n tokens.
  sums = np.asarray(unpacked_nll)
  n = np.array([answer for _, _, answer in CONVERSATIONS], np.float64)
  weights = {"token": np.ones_like(n), "sample": 1 / n, "square": 1 / np.sqrt(n)}[reduction]
  np.testing.assert_allclose(loss, np.sum(weights * sums) / np.sum(weights * n), rtol=1e-5)


def test_packed_stage_takes_segment_ids_and_counts_real_tokens():
  _, packed = stages("square")
  batch = packed.abstract_batch(2)
  assert "token_mask" not in batch and batch["segment_ids"].shape == (2, PACKING.pack_length)
  assert batch["tiles"].shape[1] == PACKING.pack_tiles
  assert packed.count_tokens(PACKED) == sum(length for _, length, _ in CONVERSATIONS)
  with pytest.raises(ValueError, match="loss_reduction='mean' is not one of"):
    dataclasses.replace(packed, loss_reduction="mean")
  with pytest.raises(ValueError, match="pack_tiles 2 cannot hold one image's 3 tiles"):
    dataclasses.replace(packed, pack_tiles=2)

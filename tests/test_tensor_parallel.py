"""Tensor parallelism over the one logical-axis vocabulary: a train step of each tower (InternViT
and the LLaMA text tower in stage 1, QLLaMA in stage 2, the chat LLM in stage 3) on a mesh with
tensor=2 equals the one-device step, and XLA compiles it without resharding any tensor by
replicating it (its "involuntary full rematerialization" warning)."""

import os
import tempfile

import jax
import numpy as np
import pytest

import train_fixtures
from internvl_jax import optim, sharding
from internvl_jax.config import chat_preset
from internvl_jax.data.tokenizer import IGNORE_LABEL
from internvl_jax.stages.generative import GenerativeStage
from internvl_jax.stages.sft import ChatStage
from internvl_jax.train.loop import Trainer

BATCH = train_fixtures.BATCH
TEXT_LEN = train_fixtures.TEXT_LEN
CHAT = chat_preset("tiny-v1.5")  # 4 image tokens per 32-px tile; LLM width 64, 4 heads
CHAT_LEN = 24
MESH = sharding.MeshConfig(data=2, fsdp=2, tensor=2)
# Every param trains. An eps far above every gradient makes the first update about
# -lr * grad / eps, so the params after one step compare the gradients (Adam's g / |g| would
# amplify float noise).
OPTIMIZER = optim.OptimizerConfig(learning_rate=1.0, eps=10.0, warmup_steps=0, total_steps=10)


def generative_batch():
  """Stage-2 rows: captions from the stage-1 fixture, ITM negatives by rolling them."""
  text, itg_text = (train_fixtures.make_batch(i)["text"] for i in range(2))
  return {"image": train_fixtures.make_batch(0)["image"], "text": text,
          "itm_text": np.roll(text, 1, axis=0),
          "itm_label": (np.arange(BATCH) % 2).astype(np.int32), "itg_text": itg_text,
          "itg_labels": np.where(itg_text != 0, itg_text, IGNORE_LABEL).astype(np.int32),
          "valid": np.ones((BATCH,), bool)}


def chat_batch():
  """Stage-3 rows: BOS, one tile's image tokens, a prompt, an answer with labels, padding."""
  rng = np.random.default_rng(0)
  images = CHAT.num_image_tokens
  tokens = np.zeros((BATCH, CHAT_LEN), np.int32)
  labels = np.full((BATCH, CHAT_LEN), IGNORE_LABEL, np.int32)
  for row, length in enumerate(rng.integers(images + 5, CHAT_LEN + 1, size=BATCH)):
    tokens[row, 0], tokens[row, 1:1 + images] = CHAT.llm.bos_id, CHAT.image_context_id
    tokens[row, 1 + images:length] = rng.integers(3, CHAT.image_context_id,
                                                  size=length - 1 - images)
    labels[row, length - 3:length] = tokens[row, length - 3:length]
  return {"tiles": rng.normal(size=(BATCH, 1, CHAT.image_size, CHAT.image_size, 3)
                              ).astype(np.float32),
          "tile_count": np.ones((BATCH,), np.int32), "tokens": tokens, "labels": labels,
          "token_mask": tokens != 0, "valid": np.ones((BATCH,), bool)}


STAGES = {
    "intern_vit-and-llama": (train_fixtures.tiny_config().stage,
                             lambda: train_fixtures.make_batch(0)),
    "qllama": (GenerativeStage(train_fixtures.MODEL.replace(variant="G"), text_len=TEXT_LEN),
               generative_batch),
    "chat-llm": (ChatStage(CHAT, max_len=CHAT_LEN), chat_batch),
}


def compile_with_log(lowered):
  """The compiled step and what was written to file descriptor 2 while compiling: XLA's SPMD
  partitioner warns there through C++ logging, which Python's stderr never sees."""
  with tempfile.TemporaryFile() as sink:
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
      compiled = lowered.compile()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    sink.seek(0)
    return compiled, sink.read().decode(errors="replace")


@pytest.mark.parametrize("name", list(STAGES))
def test_a_tensor_parallel_step_equals_one_device_and_reshards_nothing_whole(name):
  stage, make_batch = STAGES[name]
  config = train_fixtures.tiny_config(stage=stage, optimizer=OPTIMIZER)
  batch = make_batch()
  single = Trainer(config, devices=jax.devices()[:1])
  with single.context():
    expected, expected_metrics = single.step(single.factory.init(seed=0),
                                             single.global_batch(batch))

  trainer = Trainer(config.replace(mesh=MESH))
  state, global_batch = trainer.factory.init(seed=0), trainer.global_batch(batch)
  with trainer.context():
    step, log = compile_with_log(trainer.step.lower(state, global_batch))
  assert "involuntary full rematerialization" not in log.lower(), log
  state, metrics = step(state, global_batch)

  for metric in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[metric], expected_metrics[metric], rtol=1e-5, atol=1e-5,
                               err_msg=metric)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               jax.device_get(state.params), jax.device_get(expected.params))

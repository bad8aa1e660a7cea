"""What the trainer tests share: a config of any stage, one step of a trainer, the experiment
files as modules, and a tiny InternVL-C config with a deterministic in-memory batch source.

The source stands in for the grain pipeline: batch n is a function of (seed, n) alone, and its
state is the index of the next batch, so a restored source continues exactly where it was. On
several processes, process p gives its share of the rows of the same global batches, so a run's
batches do not depend on the process count.
"""

import json
import os

import numpy as np

import scripts
from internvl_jax import optim, sharding
from internvl_jax.config import internvl_preset
from internvl_jax.stages.contrastive import TEXT_PARAMS, VISION_PARAMS, ContrastiveStage
from internvl_jax.train.config import TrainConfig
from internvl_jax.train.loop import Trainer


# ViT width 64, 2 layers, 32 px; LLaMA width 64, 2 layers.
MODEL = internvl_preset("tiny", variant="C")
TEXT_LEN = 12
BATCH = 16


class InMemoryPairs:
  """(image, text, valid) host batches; `nan_batches` get NaN pixels (a corrupt input).

  `batch_size` is the global batch; process `shard_index` of `shard_count` gets its rows.
  """

  def __init__(self, batch_size: int = BATCH, seed: int = 0, nan_batches=(),
               image_size: int = MODEL.vision.image_size, text_len: int = TEXT_LEN,
               shard_index: int = 0, shard_count: int = 1):
    self.batch_size, self.seed, self.nan_batches = batch_size, seed, set(nan_batches)
    self.image_size, self.text_len = image_size, text_len
    rows = batch_size // shard_count
    self.rows = slice(shard_index * rows, (shard_index + 1) * rows)
    self.next_index = 0

  def __iter__(self):
    return self

  def __next__(self):
    index = self.next_index
    self.next_index += 1
    batch = make_batch(index, self.batch_size, self.seed, self.image_size, self.text_len,
                       nan=index in self.nan_batches)
    return {name: value[self.rows] for name, value in batch.items()}

  def get_state(self):
    return {"next_index": self.next_index}

  def set_state(self, state):
    self.next_index = state["next_index"]

  def continue_from(self, states):
    """Every process of the saving run was at the same global batch."""
    self.next_index = states[0]["next_index"]


def make_batch(index: int, batch_size: int = BATCH, seed: int = 0,
               image_size: int = MODEL.vision.image_size, text_len: int = TEXT_LEN,
               nan: bool = False):
  rng = np.random.default_rng([seed, index])
  image = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
  if nan:
    image[0, 0, 0, 0] = np.nan
  text = np.zeros((batch_size, text_len), np.int32)  # pad id 0
  lengths = rng.integers(3, text_len + 1, size=batch_size)
  for row, length in enumerate(lengths):
    text[row, 0] = MODEL.text.bos_id
    text[row, 1:length - 1] = rng.integers(3, MODEL.text.vocab_size, size=length - 2)
    text[row, length - 1] = MODEL.text.eos_id
  return {"image": image, "text": text, "valid": np.ones((batch_size,), bool)}


OPTIMIZER = optim.OptimizerConfig(
    learning_rate=1e-3, lr_groups=(("vision", VISION_PARAMS, 1e-3), ("text", TEXT_PARAMS, 1e-4)),
    b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=2, total_steps=12)


# An eps far above every gradient makes the first update about -lr * grad / eps, so the params
# after one step compare the gradients (Adam's g / |g| would amplify float noise).
GRADIENT_OPTIMIZER = optim.OptimizerConfig(learning_rate=1.0, eps=10.0, total_steps=12)


def train_config(stage, optimizer: optim.OptimizerConfig, **changes) -> TrainConfig:
  """`stage` trained on this process's devices, data parallel, logging every step."""
  return TrainConfig(stage=stage, optimizer=optimizer, global_batch_size=BATCH,
                     mesh=sharding.MeshConfig(data=-1), log_every=1).replace(**changes)


def tiny_config(**changes) -> TrainConfig:
  return train_config(ContrastiveStage(MODEL, text_len=TEXT_LEN), OPTIMIZER, checkpoint_every=3,
                      keep_checkpoints=2, peak_tflops_per_device=1.0).replace(**changes)


def one_step(trainer: Trainer, batch):
  """(state, metrics) after one step from the seed-0 initial state."""
  state = trainer.factory.init(seed=0)
  with trainer.context():
    return trainer.step(state, trainer.global_batch(batch))


def load_experiment(name: str):
  """experiments/NAME.py as a module (the experiments are scripts, not a package)."""
  return scripts.load(f"experiments/{name}.py")


def read_metrics(workdir: str) -> list[dict]:
  """A run's metrics.jsonl records, in the order written."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses_by_step(records: list[dict]) -> dict[int, float]:
  """The loss of each step; a step logged twice (re-run after a resume) must agree with itself."""
  losses = {}
  for record in records:
    if "loss" in record:  # evaluation records carry none
      assert losses.setdefault(record["step"], record["loss"]) == record["loss"], record["step"]
  return losses

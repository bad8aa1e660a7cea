"""Runs the tiny InternVL-C training of `train_fixtures` in its own process (the resume tests
kill it): python tests/train_run.py WORKDIR [--steps N] [--batch-delay SECONDS].

Started with the cluster environment (tests/multiprocess.py), it is one process of a
multi-process run, reading its rows of the same global batches.
"""

import argparse
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position

import train_fixtures  # pylint: disable=wrong-import-position
from internvl_jax import sharding  # pylint: disable=wrong-import-position
from internvl_jax.train import loop  # pylint: disable=wrong-import-position


class SlowPairs(train_fixtures.InMemoryPairs):
  """Waits before each batch, so that a test can interrupt the run between given steps, and
  reports process_index + 1 skipped captions, so that a test can tell the sum over processes
  from one process's count."""

  def __init__(self, delay: float):
    super().__init__(shard_index=jax.process_index(), shard_count=jax.process_count())
    self.delay = delay

  def __next__(self):
    time.sleep(self.delay)
    return super().__next__()

  def issue_counts(self):
    # Each process skips for its own reason, as real shards do: the sums must not mix them up.
    return {("caption_empty", "image_undecodable")[jax.process_index() % 2]: jax.process_index() + 1}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--batch-delay", type=float, default=0.0)
  args = parser.parse_args()
  sharding.maybe_initialize_distributed()
  loop.train(train_fixtures.tiny_config(steps=args.steps), SlowPairs(args.batch_delay),
             args.workdir)


if __name__ == "__main__":
  main()

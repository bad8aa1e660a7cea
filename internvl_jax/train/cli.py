"""The command line every experiment file shares: pick a preset and a work directory, train."""

import argparse
from typing import Callable

from internvl_jax import sharding
from internvl_jax.train import config as train_config
from internvl_jax.train import loop


def main(description: str, presets: dict, data: Callable, default_workdir: str, argv=None):
  """`data(config, preset, seed)` returns this process's batches for the chosen preset."""
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="demo", choices=sorted(presets))
  parser.add_argument("--workdir", default=default_workdir)
  args = parser.parse_args(argv)
  sharding.maybe_initialize_distributed()
  config = train_config.preset(presets, args.preset)
  loop.train(config, data(config, args.preset, config.seed), args.workdir)

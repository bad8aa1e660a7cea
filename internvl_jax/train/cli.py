"""The command line every experiment file shares, and what a run does around the trainer:
record the model in the workdir, warm-start, evaluate, and report.

  python experiments/NAME.py [--preset P] [--workdir DIR] [--init PATH] [--set KEY=VALUE ...]

An experiment file has presets (functions returning an `ExperimentConfig`) and
`data(config) -> iterator` of this process's batches (with the `tokenizer_path` it used).
"""

import argparse
import os
from collections.abc import Callable, Mapping

import jax

from internvl_jax import evaluation, loading, sharding
from internvl_jax.data.tokenizer import Tokenizer
from internvl_jax.models import lora
from internvl_jax.pretrained import Pretrained
from internvl_jax.train import config as config_lib
from internvl_jax.train import loop
from internvl_jax.train import report
from internvl_jax.train import warm_start
from internvl_jax.train import workdir as workdir_lib


def default_workdir(name: str, preset: str) -> str:
  """runs/NAME for the demo (where the next stage's demo looks for it), runs/NAME-PRESET else."""
  return os.path.join("runs", name if preset == "demo" else f"{name}-{preset}")


def main(description: str, name: str, presets: Mapping[str, Callable[[], object]],
         data: Callable, argv=None, previous: str | None = None):
  """`name` is the experiment's (its default workdir); `previous` the command that writes the
  demo's warm-start source, named when it is missing."""
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="demo", choices=sorted(presets))
  parser.add_argument("--workdir", help="default: runs/NAME (demo) or runs/NAME-PRESET")
  parser.add_argument("--init", action="append", metavar="PATH",
                      help="warm start from a stage workdir, an internvl_jax Orbax checkpoint or a "
                      "PyTorch checkpoint directory (a fresh workdir only; repeatable: applied in "
                      "order; replaces the preset's)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set train.steps=200 (repeatable)")
  args = parser.parse_args(argv)
  config = config_lib.preset(presets, args.preset)
  config = config_lib.override(config, config_lib.parse_settings(args.set))
  if args.init:
    config = config.replace(init=tuple(args.init))
  config_lib.check_experiment(config)
  sharding.maybe_initialize_distributed()
  run(config, data(config), args.workdir or default_workdir(name, args.preset),
      title=f"{name} ({args.preset})", previous=previous)


def run(config: config_lib.ExperimentConfig, data, workdir: str, title: str = "",
        previous: str | None = None):
  """Trains `config` on `data` in `workdir` (resuming if it has a checkpoint), then prints the
  summary table and writes the plot."""
  stage = config.train.stage
  init = None
  if config.init and not loading.checkpoint_steps(workdir):
    sources = []
    for path in config.init:
      if not os.path.exists(path):
        hint = f"; run `{previous}` first" if previous else ""
        raise FileNotFoundError(
            f"The warm start {path} does not exist{hint} (or pass --init PATH, or --set init=() "
            "to start from random params).")
      sources.append((path, *loading.load_arrays(path)[:2]))
    init = lambda params: warm_start.apply(stage, params, sources)
  workdir_lib.write_model(workdir, stage.model, data.tokenizer_path)
  evaluate = None
  if config.eval.enabled:
    tokenizer = Tokenizer.load(data.tokenizer_path)
    evaluate = lambda params: _evaluate(config, tokenizer, params)
  state = loop.train(config.train, data, workdir, init=init, evaluate=evaluate,
                     eval_every=config.eval.every)
  if int(state.step) == config.train.num_steps and jax.process_index() == 0:
    print(f"\n{title}: done, step {int(state.step)}, workdir {workdir}\n"
          f"{report.report(workdir, title)}\nplot: {os.path.join(workdir, report.PLOT_FILE)}")
  return state


def _evaluate(config: config_lib.ExperimentConfig, tokenizer: Tokenizer, params) -> dict:
  model = Pretrained(*lora.merge(config.train.stage.model, params), tokenizer)
  results = {}
  for task in config.eval.tasks:
    results.update(evaluation.evaluate(model, task, config.eval.data, limit=config.eval.limit,
                                       mode=config.eval.mode))
  return results

"""What a training workdir holds besides checkpoints and metrics: the model's config and its
tokenizer, so that any checkpoint in it loads as a model without the experiment file
(`load_pretrained(workdir)`, `tools/evaluate.py`, warm starts of the next stage).

  WORKDIR/model.json        {"model": kind, "config": {...}}, as in Orbax model checkpoints
  WORKDIR/tokenizer.model   the SentencePiece model the data pipeline used
  WORKDIR/checkpoints/STEP  train state + data position (train/checkpoint.py)
"""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from internvl_jax.convert import formats, orbax_io
from internvl_jax.convert.pytorch import TOKENIZER_FILE

MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_FILE))


def write_model(workdir: str, model_config, tokenizer_path: str | None = None):
  """Records the model config (and a copy of the tokenizer) once, on the first process."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MODEL_FILE)
  partial = f"{path}.{os.getpid()}.partial"
  with open(partial, "w") as f:
    json.dump(formats.config_to_json(model_config), f, indent=1)
  os.replace(partial, path)
  if tokenizer_path is not None:
    shutil.copyfile(tokenizer_path, os.path.join(workdir, TOKENIZER_FILE))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps with a complete checkpoint (Orbax renames a step directory when it is done)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_model(workdir: str, step: int | None = None) -> tuple[object, dict, str | None]:
  """(model config, params as numpy, tokenizer path or None) of a checkpoint of the workdir:
  `step`, or the latest. Only the params are read, not the optimizer state."""
  if not is_workdir(workdir):
    raise ValueError(f"{workdir} is not a training workdir ({MODEL_FILE} is missing).")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ValueError(f"{workdir} has no complete checkpoint in {CHECKPOINT_DIR}/ yet.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir} has no checkpoint of step {step}; it has {steps}.")
  with open(os.path.join(workdir, MODEL_FILE)) as f:
    config = formats.config_from_json(json.load(f))
  state_dir = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR, str(step), "state"))
  target = {"params": orbax_io.saved_arrays(state_dir)["params"]}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  tokenizer = os.path.join(workdir, TOKENIZER_FILE)
  return (config, jax.tree.map(np.asarray, restored["params"]),
          tokenizer if os.path.isfile(tokenizer) else None)

"""Checkpoints as models: a path becomes (config, params as host numpy arrays, tokenizer path).

Neutral to training, so that `pretrained`, the trainer's warm starts and the tools read models
one way. A path is one of:

  a PyTorch checkpoint directory   config.json + weights, through the converters (convert/)
  an Orbax model checkpoint        `params` and `config` items, as `Pretrained.save` writes them
  a training workdir               model.json + checkpoints/STEP, as train/ writes them:

  WORKDIR/model.json        {"model": kind, "config": {...}}, as in Orbax model checkpoints
  WORKDIR/tokenizer.model   the SentencePiece model the data pipeline used
  WORKDIR/checkpoints/STEP  train state + data position (train/checkpoint.py)

The kind in model.json and in Orbax checkpoints names what the params are, never guessed from
them: "intern_vit", "llama", "internvl_c" (stage 1), "internvl_g" (stage 2, the released
InternVL-14B) or "internvl_chat" (convert/formats.py: `MODELS`).
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from internvl_jax.convert import formats, orbax_io
from internvl_jax.convert.pytorch import TOKENIZER_FILE, import_pytorch
from internvl_jax.models import lora

MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_FILE))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps with a complete checkpoint (Orbax renames a step directory when it is done)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_workdir(workdir: str, step: int | None = None) -> tuple[object, dict, str | None]:
  """(model config, params as numpy, tokenizer path or None) of a checkpoint of the workdir:
  `step`, or the latest, LoRA adapters merged (`lora.merge`). Only the params are read, not the
  optimizer state."""
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
  # A LoRA fine-tune's adapters are folded in, so that every reader gets a plain model.
  config, params = lora.merge(config, restored["params"])
  return config, jax.tree.map(np.asarray, params), _tokenizer(workdir)


def load_arrays(path: str, *, allow_missing: bool = False) -> tuple[object, dict, str | None]:
  """(config, params as host numpy arrays, tokenizer path or None) of a PyTorch checkpoint
  directory (InternViT in OpenGVLab's or transformers' layout, InternVL-14B in OpenGVLab's, LLaMA
  in transformers'), an Orbax checkpoint, or the latest checkpoint of a training workdir."""
  if os.path.isfile(os.path.join(path, "config.json")):
    config, params = import_pytorch(path, allow_missing=allow_missing)
  elif orbax_io.is_checkpoint(path):
    config, params = orbax_io.load(path)
  elif is_workdir(path):
    return load_workdir(path)
  elif not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  else:
    raise ValueError(
        f"{path} is neither a PyTorch checkpoint directory (config.json + weights), an Orbax "
        "checkpoint written by internvl_jax, nor a training workdir.")
  return config, params, _tokenizer(path)


def _tokenizer(directory: str) -> str | None:
  path = os.path.join(directory, TOKENIZER_FILE)
  return path if os.path.isfile(path) else None

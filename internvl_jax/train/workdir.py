"""What a training workdir holds besides checkpoints and metrics: the model's config and its
tokenizer, so that any checkpoint in it loads as a model without the experiment file
(`internvl_jax/loading.py` reads them, and describes the layout).
"""

import json
import os
import shutil

import jax

from internvl_jax.convert import formats
from internvl_jax.convert.pytorch import TOKENIZER_FILE
from internvl_jax.loading import MODEL_FILE


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

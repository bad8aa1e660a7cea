"""Tiny InternVL-Chat configs, random params, and checkpoint directories in the chat layouts."""

import functools
import json
import os

import jax
import numpy as np

from internvl_jax.convert import chat_layouts, keymap
from internvl_jax.convert.pytorch_dir import read_config
from internvl_jax.convert.safetensors_io import SafetensorsFile, write_streaming
from internvl_jax.models import chat


@functools.cache
def random_params(config, seed: int = 0) -> dict:
  """Init params with every leaf perturbed, so that norm scales and biases matter too."""
  rng = np.random.default_rng(seed)
  params = chat.init_params(config, seed=seed)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


def export(config, params, directory, layout: str) -> None:
  """config.json and model.safetensors in the layout, block by block."""
  plans, flat = keymap.plan(chat_layouts.LAYOUTS[layout], params), keymap.flatten(params)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(chat_layouts.config_json(config, layout) | {"torch_dtype": "float32"}, f, indent=2)
  tensors = ((tensor.key, blocks) for tensor, blocks in
             keymap.export_tensors(plans, lambda path, index: flat[path][index]))
  write_streaming(str(directory), {t.key: (t.torch_shape, np.dtype(np.float32)) for t in plans},
                  tensors)


def import_(directory, layout: str):
  """(config, params) of a directory in the layout; every key checked first."""
  config = chat_layouts.config_from_json(read_config(str(directory)), layout)
  source = SafetensorsFile(os.path.join(directory, "model.safetensors"))
  abstract = chat.abstract_params(config)
  plans = keymap.plan(chat_layouts.LAYOUTS[layout], abstract)
  keymap.check_source(chat_layouts.LAYOUTS[layout], plans, set(source.keys()), source.shape,
                      source.dtype, allow_missing=False)
  arrays = {path: np.empty(leaf.shape, leaf.dtype)
            for path, leaf in keymap.flatten(abstract).items()}
  for path, index, block in keymap.import_tensors(plans, source.read, abstract):
    arrays[path][index] = block
  return config, keymap.unflatten(arrays)

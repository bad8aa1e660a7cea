"""PyTorch checkpoint directories <-> Flax params and Orbax checkpoints, block by block.

Every direction is one loop over the format's plan (see keymap.py), with the storage on either
side given as a read or write function: numpy arrays in memory, safetensors / .bin files, or an
Orbax checkpoint read and written by TensorStore. Which model a directory holds, and in which
layout, comes from its config.json (see formats.py).
"""

import json
import os
import shutil
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from internvl_jax.convert import formats, keymap, orbax_io
from internvl_jax.convert.orbax_stream import BlockSource
from internvl_jax.convert.pytorch_dir import TensorSource, open_weights, read_config
from internvl_jax.convert.safetensors_io import write_streaming

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
                 "float16": np.dtype(np.float16)}
TOKENIZER_FILE = "tokenizer.model"  # SentencePiece, next to the weights as in the HF repositories


def _open_pytorch(directory: str, allow_missing: bool, block_bytes: int):
  """Config, model kind, abstract params, plan, missing tensors and weights of a directory."""
  config_data = read_config(directory)
  added_tokens = os.path.join(directory, "added_tokens.json")
  if "img_context_token_id" not in config_data and os.path.isfile(added_tokens):
    # The official chat config leaves <IMG_CONTEXT>'s id to the tokenizer's added tokens.
    with open(added_tokens) as f:
      config_data["img_context_token_id"] = json.load(f).get("<IMG_CONTEXT>")
  fmt = formats.detect(config_data)
  config = fmt.config_from_json(config_data)
  kind = formats.MODELS[fmt.model]
  source = open_weights(directory).with_prefix(fmt.key_prefixes).renamed(fmt.key_renames)
  abstract = kind.abstract_params(config)
  layout = fmt.layout(config)
  plans = keymap.plan(layout, abstract, block_bytes)
  missing = keymap.check_source(layout, plans, source.keys(), source.shape, source.dtype,
                                allow_missing=allow_missing)
  return config, kind, abstract, plans, missing, source


def _blocks(plans, missing, source: TensorSource, abstract, init):
  """(path, index, block) of every tensor: from the checkpoint, or from `init()` if missing."""
  present = [tensor for tensor in plans if tensor not in missing]
  yield from keymap.import_tensors(present, source.read, abstract)
  if missing:
    initial = keymap.flatten(init())
    for tensor in missing:
      for _, index in tensor.blocks:
        yield tensor.flax, index, initial[tensor.flax][index]


def import_pytorch(directory: str, *, allow_missing: bool = False,
                   block_bytes: int = keymap.BLOCK_BYTES) -> tuple[object, dict]:
  """Reads a PyTorch directory (any format in formats.py) into (config, numpy params)."""
  config, kind, abstract, plans, missing, source = _open_pytorch(directory, allow_missing, block_bytes)
  arrays = {path: np.empty(leaf.shape, leaf.dtype) for path, leaf in keymap.flatten(abstract).items()}
  for path, index, block in _blocks(plans, missing, source, abstract, lambda: kind.init_params(config)):
    arrays[path][index] = block
  return config, keymap.unflatten(arrays)


def pytorch_to_orbax(directory: str, out_dir: str, *, allow_missing: bool = False,
                     block_bytes: int = keymap.BLOCK_BYTES):
  """Converts a PyTorch directory to an Orbax checkpoint, holding one block at a time.

  Returns the config. A tokenizer.model next to the weights is copied along.
  """
  config, kind, abstract, plans, missing, source = _open_pytorch(directory, allow_missing, block_bytes)
  init = lambda: kind.init_params(config)
  by_leaf: dict[str, list] = {}
  for tensor in plans:
    by_leaf.setdefault(tensor.flax, []).append(tensor)

  def leaf_blocks(path):
    leaf_missing = [t for t in missing if t.flax == path]
    for _, index, block in _blocks(by_leaf[path], leaf_missing, source, abstract, init):
      yield index, block

  chunks = keymap.chunk_shapes(plans, abstract)
  leaves = {path: BlockSource(tuple(leaf.shape), np.dtype(leaf.dtype), chunks[path],
                              lambda path=path: leaf_blocks(path))
            for path, leaf in keymap.flatten(abstract).items()}
  orbax_io.save(out_dir, config, keymap.unflatten(leaves))
  if os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
    shutil.copy(os.path.join(directory, TOKENIZER_FILE), os.path.join(out_dir, TOKENIZER_FILE))
  return config


def export_pytorch(config, params: Mapping | Callable, out_dir: str, *, layout: str,
                   dtype: str = "float32", prefix: str = "", max_shard_bytes: int = 5 * 2**30,
                   block_bytes: int = keymap.BLOCK_BYTES, strict: bool = True) -> list[str]:
  """Writes config.json and safetensors in the format `layout` of the config's model kind.

  `params` is the param tree, or a function (path, index) -> array that reads blocks of it
  (e.g. from an Orbax checkpoint without loading it). `strict=False` lets a format write sizes
  its own PyTorch code cannot load (the official InternVL code hard-codes some), for tests.
  """
  kind = formats.model_kind(config)
  fmt = formats.find(kind.name, layout)
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; known: {sorted(EXPORT_DTYPES)}.")
  if isinstance(params, Mapping):
    flat = keymap.flatten(params)
    read_flax = lambda path, index: np.asarray(flat[path][index])
  else:
    read_flax = params
  config_data = dict(fmt.config_json(config, strict), torch_dtype=dtype)
  plans = keymap.plan((fmt.export_layout or fmt.layout)(config), kind.abstract_params(config),
                      block_bytes)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_data, f, indent=2)
  shapes = {prefix + t.key: (t.torch_shape, EXPORT_DTYPES[dtype]) for t in plans}
  tensors = ((prefix + tensor.key, blocks) for tensor, blocks in keymap.export_tensors(plans, read_flax))
  return write_streaming(out_dir, shapes, tensors, max_shard_bytes=max_shard_bytes)


def orbax_to_pytorch(checkpoint: str, out_dir: str, **kwargs) -> tuple[object, list[str]]:
  """Converts an Orbax checkpoint to a PyTorch directory, reading one block at a time."""
  config = orbax_io.load_config(checkpoint)
  files = export_pytorch(config, orbax_io.leaf_reader(checkpoint).read, out_dir, **kwargs)
  if os.path.isfile(os.path.join(checkpoint, TOKENIZER_FILE)):
    shutil.copy(os.path.join(checkpoint, TOKENIZER_FILE), os.path.join(out_dir, TOKENIZER_FILE))
  return config, files

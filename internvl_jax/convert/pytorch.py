"""PyTorch checkpoint directories <-> Flax params and Orbax checkpoints, block by block.

Every direction is one loop over the layout's plan (see keymap.py), with the storage on either
side given as a read or write function: numpy arrays in memory, safetensors / .bin files, or an
Orbax checkpoint read and written by TensorStore.
"""

import json
import os
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from internvl_jax.config import VisionConfig
from internvl_jax.convert import intern_vit_layouts as vit_layouts
from internvl_jax.convert import keymap, orbax_io
from internvl_jax.convert.orbax_stream import BlockSource
from internvl_jax.convert.pytorch_dir import TensorSource, open_weights, read_config
from internvl_jax.convert.safetensors_io import write_streaming
from internvl_jax.models.intern_vit import abstract_params, init_params

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
                 "float16": np.dtype(np.float16)}


def detect_layout(config: dict) -> str:
  for architecture in config.get("architectures") or ():
    if architecture in vit_layouts.ARCHITECTURES:
      return vit_layouts.ARCHITECTURES[architecture]
  raise ValueError(
      f"config.json names architectures {config.get('architectures')} (model_type "
      f"{config.get('model_type')!r}); supported: {sorted(vit_layouts.ARCHITECTURES)}.")


def _open_pytorch(directory: str, allow_missing: bool, block_bytes: int):
  """Config, abstract params, the plan and the checked weights of a PyTorch directory."""
  config_data = read_config(directory)
  layout = detect_layout(config_data)
  config = vit_layouts.config_from_json(config_data, layout)
  source = open_weights(directory).with_prefix(vit_layouts.KEY_PREFIXES[layout])
  abstract = abstract_params(config)
  plans = keymap.plan(vit_layouts.LAYOUTS[layout], abstract, block_bytes)
  missing = keymap.check_source(vit_layouts.LAYOUTS[layout], plans, source.keys(), source.shape,
                                source.dtype, allow_missing=allow_missing)
  return config, abstract, plans, missing, source


def _blocks(plans, missing, source: TensorSource, abstract, config):
  """(path, index, block) of every tensor: from the checkpoint, or freshly initialized if missing."""
  present = [tensor for tensor in plans if tensor not in missing]
  yield from keymap.import_tensors(present, source.read, abstract)
  if missing:
    init = keymap.flatten(init_params(config))
    for tensor in missing:
      for _, index in tensor.blocks:
        yield tensor.flax, index, init[tensor.flax][index]


def import_pytorch(directory: str, *, allow_missing: bool = False,
                   block_bytes: int = keymap.BLOCK_BYTES) -> tuple[VisionConfig, dict]:
  """Reads a PyTorch InternViT directory (either layout) into (config, float32 numpy params)."""
  config, abstract, plans, missing, source = _open_pytorch(directory, allow_missing, block_bytes)
  arrays = {path: np.empty(leaf.shape, leaf.dtype) for path, leaf in keymap.flatten(abstract).items()}
  for path, index, block in _blocks(plans, missing, source, abstract, config):
    arrays[path][index] = block
  return config, keymap.unflatten(arrays)


def pytorch_to_orbax(directory: str, out_dir: str, *, allow_missing: bool = False,
                     block_bytes: int = keymap.BLOCK_BYTES) -> VisionConfig:
  """Converts a PyTorch directory to an Orbax checkpoint, holding one block at a time."""
  config, abstract, plans, missing, source = _open_pytorch(directory, allow_missing, block_bytes)
  flat_abstract = keymap.flatten(abstract)
  by_leaf: dict[str, list] = {}
  for tensor in plans:
    by_leaf.setdefault(tensor.flax, []).append(tensor)

  def leaf_blocks(path):
    for leaf_path, index, block in _blocks(by_leaf[path], [t for t in missing if t.flax == path],
                                           source, abstract, config):
      yield index, block

  chunks = keymap.chunk_shapes(plans, abstract)
  leaves = {path: BlockSource(tuple(leaf.shape), np.dtype(leaf.dtype), chunks[path],
                              lambda path=path: leaf_blocks(path))
            for path, leaf in flat_abstract.items()}
  orbax_io.save(out_dir, config, keymap.unflatten(leaves))
  return config


def export_pytorch(config: VisionConfig, params: Mapping | Callable, out_dir: str, *, layout: str,
                   dtype: str = "float32", prefix: str = "", max_shard_bytes: int = 5 * 2**30,
                   block_bytes: int = keymap.BLOCK_BYTES) -> list[str]:
  """Writes config.json and safetensors of the layout, block by block.

  `params` is the param tree, or a function (path, index) -> array that reads blocks of it
  (e.g. from an Orbax checkpoint without loading it).
  """
  if layout not in vit_layouts.LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(vit_layouts.LAYOUTS)}.")
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; known: {sorted(EXPORT_DTYPES)}.")
  if isinstance(params, Mapping):
    flat = keymap.flatten(params)
    read_flax = lambda path, index: np.asarray(flat[path][index])
  else:
    read_flax = params
  plans = keymap.plan(vit_layouts.LAYOUTS[layout], abstract_params(config), block_bytes)
  os.makedirs(out_dir, exist_ok=True)
  config_data = dict(vit_layouts.config_json(config, layout), torch_dtype=dtype)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_data, f, indent=2)
  shapes = {prefix + t.key: (t.torch_shape, EXPORT_DTYPES[dtype]) for t in plans}
  tensors = ((prefix + tensor.key, blocks) for tensor, blocks in keymap.export_tensors(plans, read_flax))
  return write_streaming(out_dir, shapes, tensors, max_shard_bytes=max_shard_bytes)


def orbax_to_pytorch(checkpoint: str, out_dir: str, **kwargs) -> tuple[VisionConfig, list[str]]:
  """Converts an Orbax checkpoint to a PyTorch directory, reading one block at a time."""
  config = orbax_io.load_config(checkpoint)
  return config, export_pytorch(config, orbax_io.leaf_reader(checkpoint).read, out_dir, **kwargs)

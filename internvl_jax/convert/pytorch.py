"""PyTorch checkpoint directories <-> (config, Flax params), through the declarative layouts."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import VisionConfig
from internvl_jax.convert import intern_vit_layouts as vit_layouts
from internvl_jax.convert import keymap
from internvl_jax.convert.pytorch_dir import open_weights, read_config
from internvl_jax.convert.safetensors_io import write_streaming
from internvl_jax.models.intern_vit import InternViT

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
                 "float16": np.dtype(np.float16)}


def detect_layout(config: dict) -> str:
  for architecture in config.get("architectures") or ():
    if architecture in vit_layouts.ARCHITECTURES:
      return vit_layouts.ARCHITECTURES[architecture]
  raise ValueError(
      f"config.json names architectures {config.get('architectures')} (model_type "
      f"{config.get('model_type')!r}); supported: {sorted(vit_layouts.ARCHITECTURES)}.")


def abstract_params(config: VisionConfig) -> dict:
  """Param shapes and dtypes of the model, with nothing allocated."""
  model = InternViT(config)
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                                jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), pixels)
  return nn.meta.unbox(variables["params"])


def init_params(config: VisionConfig, seed: int = 0) -> dict:
  model = InternViT(config)
  pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
  variables = jax.jit(model.init)(jax.random.key(seed), pixels)
  return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))


def import_pytorch(directory: str, *, allow_missing: bool = False) -> tuple[VisionConfig, dict]:
  """Reads a PyTorch InternViT directory (either layout) into (config, float32 numpy params)."""
  config_data = read_config(directory)
  layout = detect_layout(config_data)
  config = vit_layouts.config_from_json(config_data, layout)
  source = open_weights(directory).with_prefix(vit_layouts.KEY_PREFIXES[layout])
  params = keymap.from_torch(
      vit_layouts.LAYOUTS[layout], abstract_params(config), lambda key: source.read(key),
      source.keys(), allow_missing=allow_missing,
      init_params=init_params(config) if allow_missing else None)
  return config, params


def export_pytorch(config: VisionConfig, params, out_dir: str, *, layout: str,
                   dtype: str = "float32", prefix: str = "",
                   max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes config.json and safetensors of the given layout, one tensor at a time."""
  if layout not in vit_layouts.LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(vit_layouts.LAYOUTS)}.")
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; known: {sorted(EXPORT_DTYPES)}.")
  rules = vit_layouts.LAYOUTS[layout]
  shapes = keymap.torch_shapes(rules, params)
  plan = {prefix + key: (shape, EXPORT_DTYPES[dtype]) for key, shape in shapes.items()}
  os.makedirs(out_dir, exist_ok=True)
  config_data = vit_layouts.config_json(config, layout)
  config_data["torch_dtype"] = dtype
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_data, f, indent=2)
  tensors = ((prefix + key, array) for key, array in keymap.to_torch(rules, params))
  return write_streaming(out_dir, plan, tensors, max_shard_bytes=max_shard_bytes)


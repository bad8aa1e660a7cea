"""Tiny LLaMA configs, random params, and transformers-layout directories for the tests."""

import functools

import jax
import numpy as np

from internvl_jax.config import llama_preset
from internvl_jax.convert import keymap, llama_layouts
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch
from internvl_jax.models import llama

MHA = llama_preset("tiny")
GQA = llama_preset("tiny", num_kv_heads=2, num_layers=3, tie_embeddings=True, rope_base=500.0)
LAYOUT = llama_layouts.LAYOUTS[llama_layouts.TRANSFORMERS]


@functools.cache
def random_params(config, seed: int = 0) -> dict:
  """Init params with every leaf perturbed, so that the norm scales matter too (shared: do not edit)."""
  rng = np.random.default_rng(seed)
  params = llama.init_params(config, seed=seed)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


def export_transformers(config, params, directory) -> None:
  """Writes config.json and model.safetensors in LlamaForCausalLM's layout."""
  export_pytorch(config, params, str(directory), layout="transformers")


def import_tensors(config, source) -> dict:
  """Params from a source with keys(), shape(key), dtype(key) and read(key, rows)."""
  abstract = llama.abstract_params(config)
  plans = keymap.plan(LAYOUT, abstract)
  keymap.check_source(LAYOUT, plans, source.keys(), source.shape, source.dtype, allow_missing=False)
  arrays = {path: np.empty(leaf.shape, leaf.dtype) for path, leaf in keymap.flatten(abstract).items()}
  for path, index, block in keymap.import_tensors(plans, source.read, abstract):
    arrays[path][index] = block
  return keymap.unflatten(arrays)


def import_transformers(directory):
  return import_pytorch(str(directory))

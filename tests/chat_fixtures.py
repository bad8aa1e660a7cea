"""Tiny InternVL-Chat configs, random params, checkpoint directories in the chat layouts, and the
batch that checks logits against transformers."""

import functools

import jax
import numpy as np
import torch

from internvl_jax.config import ChatConfig
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch
from internvl_jax.models import chat

CONTEXT = 127  # the tiny presets' <IMG_CONTEXT> id


@functools.cache
def random_params(config, seed: int = 0) -> dict:
  """Init params with every leaf perturbed, so that norm scales and biases matter too."""
  rng = np.random.default_rng(seed)
  params = chat.init_params(config, seed=seed)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


def export(config, params, directory, layout: str) -> None:
  """config.json and model.safetensors in the layout, in blocks of a few rows, so that each part
  of a fused tensor spans several blocks."""
  export_pytorch(config, params, str(directory), layout=layout, block_bytes=512)


def import_(directory):
  """(config, params) of a directory in either layout; every key checked first."""
  return import_pytorch(str(directory), block_bytes=512)


def batch(config: ChatConfig, text: int = 0, seed: int = 0):
  """Two right-padded rows: two tiles, then one tile in two slots; text around the images, the
  first row `text` tokens longer."""
  n = config.num_image_tokens
  rows = [[1, 17, *[CONTEXT] * (2 * n), 30, 99, *range(5, 5 + text), 4], [1, *[CONTEXT] * n, 5, 6]]
  tokens = np.zeros((2, max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  size = config.image_size
  tiles = np.random.default_rng(seed).normal(size=(2, 2, size, size, 3)).astype(np.float32)
  tiles[1, 1] = 0.0  # an empty slot, as the data side leaves it
  return tiles, np.array([2, 1], np.int32), tokens, tokens != 0


def transformers_logits(model, tiles, tile_count, tokens, mask) -> np.ndarray:
  """The logits of transformers' InternVLForConditionalGeneration on a `batch`."""
  real_tiles = np.concatenate([row[:count] for row, count in zip(tiles, tile_count)])
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(),
                 attention_mask=torch.from_numpy(mask).long(),
                 pixel_values=torch.from_numpy(real_tiles.transpose(0, 3, 1, 2).copy())
                 ).logits.numpy()

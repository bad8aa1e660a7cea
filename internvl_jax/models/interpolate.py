"""Bicubic resizing that matches torch.nn.functional.interpolate(mode="bicubic").

`jax.image.resize(method="bicubic")` uses the Keys kernel with a = -0.5 and antialiasing, which
differs from PyTorch (a = -0.75, no antialiasing, clamped borders). Checkpoints trained with
PyTorch resize their position embeddings with the latter, so parity needs this exact kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # PyTorch's cubic convolution coefficient.


def _cubic_near(x):  # |x| <= 1
  return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic_far(x):  # 1 < |x| < 2
  return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix W such that W @ signal is the 1-D resize (align_corners=False)."""
  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for out_index in range(out_size):
    source = scale * (out_index + 0.5) - 0.5  # not clamped at 0 for cubic, as in PyTorch
    floor = int(np.floor(source))
    t = source - floor
    weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
    for offset, weight in zip(range(-1, 3), weights):
      matrix[out_index, min(max(floor + offset, 0), in_size - 1)] += weight
  return matrix.astype(np.float32)


def resize_bicubic(grid: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Resizes a (..., H, W, C) grid to (..., out_h, out_w, C) in float32, like PyTorch."""
  in_h, in_w = grid.shape[-3], grid.shape[-2]
  rows = jnp.asarray(bicubic_matrix(in_h, out_hw[0]))
  cols = jnp.asarray(bicubic_matrix(in_w, out_hw[1]))
  highest = jax.lax.Precision.HIGHEST  # TPUs would otherwise multiply in bfloat16
  grid = jnp.einsum("oh,...hwc->...owc", rows, grid.astype(jnp.float32), precision=highest)
  return jnp.einsum("pw,...owc->...opc", cols, grid, precision=highest)


def resize_pos_embed(pos_embed: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Resizes a (1, 1 + g*g, D) position embedding to the grid out_hw; the CLS row is kept as is."""
  cls_row, patch_rows = pos_embed[:, :1], pos_embed[:, 1:]
  grid = int(round(patch_rows.shape[1]**0.5))
  if grid * grid != patch_rows.shape[1]:
    raise ValueError(f"Position embedding with {patch_rows.shape[1]} patch rows is not a square grid.")
  if (grid, grid) == tuple(out_hw):
    return pos_embed
  patch_grid = patch_rows.reshape(1, grid, grid, -1)
  resized = resize_bicubic(patch_grid, out_hw).reshape(1, out_hw[0] * out_hw[1], -1)
  return jnp.concatenate([cls_row.astype(jnp.float32), resized], axis=1).astype(pos_embed.dtype)

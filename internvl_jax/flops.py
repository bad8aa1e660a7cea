"""Analytic model FLOPs (multiply-adds count 2), for throughput and MFU figures.

XLA's cost analysis counts a scanned layer once, so logs and benchmarks use these formulas; a test
checks them against XLA on a one-layer model.
"""

from internvl_jax.config import VisionConfig


def vit_forward_flops(config: VisionConfig, image_hw: tuple[int, int], keep_fraction: float = 1.0) -> int:
  """Matmul FLOPs of one image through InternViT (patch embedding, attention, MLP)."""
  d, p = config.hidden_size, config.patch_size
  num_patches = (image_hw[0] // p) * (image_hw[1] // p)
  tokens = 1 + max(1, int(round(num_patches * keep_fraction)))
  patch_embed = 2 * num_patches * p * p * config.num_channels * d
  projections = 2 * tokens * d * (3 * d + d)  # qkv and output projection
  attention = 2 * 2 * tokens * tokens * d  # scores and the weighted sum of values
  mlp = 2 * 2 * tokens * d * config.mlp_dim
  return patch_embed + config.num_layers * (projections + attention + mlp)


def training_flops(forward_flops: int) -> int:
  """Forward plus backward: the backward pass costs twice the forward."""
  return 3 * forward_flops

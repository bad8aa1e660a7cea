"""Tiny InternViT configs and random params shared by the tests."""

import jax
import numpy as np

from internvl_jax.config import vision_preset
from internvl_jax.models.intern_vit import init_params

# The 6B family's structure (RMSNorm, QK-norm, no qkv bias) and the 300M's (LayerNorm, qkv bias).
RMS_QKNORM = vision_preset("tiny")
LAYERNORM_QKV_BIAS = vision_preset("tiny", norm_type="layer_norm", qkv_bias=True, qk_norm=False,
                                   num_layers=3, layerscale_init=1.0)


def random_params(config, seed: int = 0) -> dict:
  """Init params with every leaf perturbed, so that norms, biases and LayerScale all matter."""
  rng = np.random.default_rng(seed)
  params = init_params(config, seed=seed)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


def random_pixels(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)

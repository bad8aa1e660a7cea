"""InternVL in JAX: models, conversion to and from PyTorch, and training stages."""

from internvl_jax.preprocess import normalize_images
from internvl_jax.pretrained import Pretrained, load_pretrained

__all__ = ["Pretrained", "load_pretrained", "normalize_images"]

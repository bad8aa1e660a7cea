"""InternVL in JAX: models, conversion to and from PyTorch, and training stages."""

import importlib

# The inference API is imported on first use, so that importing a model module does not pull in
# the data pipeline's libraries (grain, TFDS, PIL) with it.
_API = {"Pretrained": "internvl_jax.pretrained", "load_pretrained": "internvl_jax.pretrained",
        "normalize_images": "internvl_jax.preprocess"}

__all__ = list(_API)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'internvl_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_API[name]), name)

"""The public entry point: `load_pretrained(path)` for PyTorch directories and Orbax checkpoints."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from internvl_jax.config import VisionConfig
from internvl_jax.convert import orbax_io
from internvl_jax.convert.pytorch import import_pytorch
from internvl_jax.models.intern_vit import InternViT, select_layer


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _vision_features(config: VisionConfig, params, pixels, layer: int):
  output = InternViT(config).apply({"params": params}, pixels, return_hidden_states=layer != -1)
  return select_layer(output, layer)


@dataclasses.dataclass
class Pretrained:
  """A loaded model: its config, its params, and what it computes."""

  config: VisionConfig
  params: dict

  def vision_features(self, pixels, layer: int = -1) -> jax.Array:
    """InternViT token features (batch, 1 + patches, width) of the given layer.

    `pixels` are NHWC float32, normalized with the ImageNet mean and std. `layer` indexes the
    hidden states as the reference does: -1 is the last block, -4 the fourth-to-last.
    """
    return _vision_features(self.config, self.params, jnp.asarray(pixels, jnp.float32), layer)

  def save(self, directory: str):
    """Writes an Orbax checkpoint that `load_pretrained` reads back."""
    orbax_io.save(directory, self.config, self.params)


def load_pretrained(path: str, *, allow_missing: bool = False) -> Pretrained:
  """Loads a PyTorch checkpoint directory (OpenGVLab or transformers layout) or an Orbax checkpoint."""
  if os.path.isfile(os.path.join(path, "config.json")):
    config, params = import_pytorch(path, allow_missing=allow_missing)
  elif orbax_io.is_checkpoint(path):
    config, params = orbax_io.load(path)
  else:
    raise ValueError(
        f"{path} is neither a PyTorch checkpoint directory (config.json + weights) nor an Orbax "
        "checkpoint written by internvl_jax.")
  return Pretrained(config, jax.tree.map(jnp.asarray, params))

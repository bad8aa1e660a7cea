"""What a training stage provides to the trainer: model, loss, FLOPs.

Sharding is not a stage's: every model names its axes in one vocabulary, which `sharding.RULES`
(and a config's `MeshConfig.rules`) maps to the mesh.

The loss is split in two so that gradient accumulation is exact for losses over the whole batch
(contrastive): `encode` maps a (micro-)batch to per-example features, `loss` maps the features
of the whole batch to the loss. Any loss fits this split; for one that is a mean over examples
the features can simply be the per-example losses.
"""

from typing import Any, Protocol

import jax
import numpy as np

Batch = dict[str, jax.Array]


class Stage(Protocol):
  """A hashable (frozen dataclass) description of one stage, used as a static jit argument."""

  def init(self, rng: jax.Array) -> Any:
    """Fresh params, boxed (`nn.Partitioned`) with their logical axis names."""

  def encode(self, params, batch: Batch, rng: jax.Array, train: bool = True) -> Any:
    """Per-example features: a pytree whose leaves have the batch as leading axis."""

  def loss(self, params, features, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, scalar metrics) from the features of the whole batch."""

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a batch the step takes, by name (other keys of a host batch are dropped)."""

  def flops_per_example(self) -> int:
    """Analytic model FLOPs of one training example, forward and backward."""

  def count_tokens(self, batch: dict[str, np.ndarray]) -> int:
    """The real (non-padding) tokens of a host batch, for tokens/s."""

  def warm_start(self, params: dict, source_config: Any, source_params: dict, source: str) -> dict:
    """Fresh `params` (numpy) with the parts another model provides (`train/warm_start.py`);
    `source` names it in errors."""


def loss_fn(stage: Stage, params, batch: Batch, rng: jax.Array):
  """The whole-batch loss: `stage.loss` of `stage.encode`."""
  return stage.loss(params, stage.encode(params, batch, rng), batch)

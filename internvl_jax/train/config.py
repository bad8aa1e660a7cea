"""The trainer's config, its checks (run before anything compiles) and dotted-key overrides."""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from internvl_jax import sharding
from internvl_jax.optim import OptimizerConfig, path_name


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs besides its data iterator.

  `global_batch_size` examples make one optimizer step; they are processed as `accum_steps`
  micro-batches (exact for whole-batch losses, see `train/step.py`).
  """

  stage: Any  # a `train.stage.Stage`: model, loss, rules, FLOPs
  optimizer: OptimizerConfig
  global_batch_size: int
  mesh: sharding.MeshConfig = sharding.MeshConfig()
  accum_steps: int = 1
  steps: int | None = None  # None: optimizer.total_steps
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
  profile_steps: tuple[int, int] | None = None  # trace steps [first, last) to WORKDIR/profile
  peak_tflops_per_device: float | None = None  # MFU denominator; None: table, else measured

  def __post_init__(self):
    for name in ("global_batch_size", "accum_steps", "log_every", "checkpoint_every",
                 "keep_checkpoints", "max_bad_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig: {name} must be at least 1, got {getattr(self, name)}.")
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"TrainConfig: steps must be at least 1 (or None), got {self.steps}.")
    if self.profile_steps is not None and not 0 <= self.profile_steps[0] < self.profile_steps[1]:
      raise ValueError(f"TrainConfig: profile_steps must be (first, last) with 0 <= first < last, "
                       f"got {self.profile_steps}.")

  @property
  def num_steps(self) -> int:
    return self.optimizer.total_steps if self.steps is None else self.steps

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)


def check_batch(config: TrainConfig, mesh_shape: Mapping[str, int]):
  """Every micro-batch must split evenly over the data-parallel devices."""
  data_parallel = 1
  for axis in sharding.BATCH_AXES:
    data_parallel *= mesh_shape[axis]
  unit = data_parallel * config.accum_steps
  if config.global_batch_size % unit:
    raise ValueError(
        f"global_batch_size {config.global_batch_size} is not divisible by the data-parallel size "
        f"{data_parallel} (mesh {dict(mesh_shape)}) x accum_steps {config.accum_steps} = {unit}; "
        f"use a multiple of {unit}, or change the mesh or accum_steps.")


def check_patterns(optimizer: OptimizerConfig, abstract_params):
  """Trainable, frozen and lr-group regexes that select no param are typos: fail by name."""
  names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
  used = [("trainable", p) for p in optimizer.trainable] + [("frozen", p) for p in optimizer.frozen]
  used += [(f"lr_groups[{group!r}]", p) for group, p, _ in optimizer.lr_groups]
  for field, pattern in used:
    if not any(re.search(pattern, name) for name in names):
      raise ValueError(
          f"OptimizerConfig.{field}: the regex {pattern!r} matches no param; fix it or remove it. "
          f"Param names look like {names[:3]}.")
  if not any(optimizer.is_trainable(name) for name in names):
    raise ValueError("OptimizerConfig: trainable / frozen leave no param to train.")


def override(config, changes: Mapping[str, Any]):
  """`config` with dotted fields replaced: {"optimizer.learning_rate": 1e-4, "steps": 10}."""
  for key, value in changes.items():
    config = _replace_path(config, key.split("."), value, key)
  return config


def _replace_path(obj, parts: list[str], value, key: str):
  fields = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
  if parts[0] not in fields:
    raise ValueError(f"Unknown config key {key!r}: {type(obj).__name__} has no field "
                     f"{parts[0]!r}; its fields are {fields}.")
  if len(parts) > 1:
    value = _replace_path(getattr(obj, parts[0]), parts[1:], value, key)
  return dataclasses.replace(obj, **{parts[0]: value})


def preset(presets: Mapping[str, Callable[[], TrainConfig]], name: str) -> TrainConfig:
  """The named preset of an experiment; the error lists the known names."""
  if name not in presets:
    raise ValueError(f"Unknown preset {name!r}; this experiment has {sorted(presets)}.")
  return presets[name]()

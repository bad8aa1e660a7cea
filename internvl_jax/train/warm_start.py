"""Warm starts: a stage's first params taken in part from another model (spec 4.2, 4.4).

The source is a previous stage's workdir (its latest checkpoint), an internvl_jax Orbax model
checkpoint or a PyTorch checkpoint directory, read by `internvl_jax.loading` as host numpy arrays
(kept on the host: the state is placed in its shards after the warm start). Each stage says
which of its params come from which part of the source (`Stage.warm_start`); the rest keep their
fresh initialization. Only params are taken: optimizer state, step and data position start anew.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def graft(params: dict, parts: Mapping[str, Any], source: str) -> dict:
  """`params` with the top-level entries in `parts` replaced; each must have the same tree and
  shapes as the entry it replaces (the models must agree in size)."""
  out = dict(params)
  for name, value in parts.items():
    if name not in params:
      raise ValueError(f"Warm start from {source}: this model has no {name!r} params.")
    expected = jax.tree_util.tree_flatten_with_path(params[name])
    given = jax.tree_util.tree_flatten_with_path(value)
    if expected[1] != given[1]:
      raise ValueError(f"Warm start from {source}: {name!r} has a different structure there "
                       f"({given[1]}) than here ({expected[1]}).")
    for (path, want), (_, got) in zip(expected[0], given[0]):
      if np.shape(want) != np.shape(got):
        raise ValueError(
            f"Warm start from {source}: {name}{jax.tree_util.keystr(path)} has shape "
            f"{np.shape(got)} there and {np.shape(want)} here: the models differ in size.")
    out[name] = jax.tree.map(lambda want, got: np.asarray(got, np.asarray(want).dtype),
                             params[name], value)
  return out


def require(source_config, expected_types: tuple[type, ...], source: str, what: str):
  if not isinstance(source_config, expected_types):
    names = " or ".join(t.__name__ for t in expected_types)
    raise ValueError(f"Warm start from {source}: {what} needs a {names} checkpoint; it holds a "
                     f"{type(source_config).__name__}.")


def apply(stage, params: dict, sources: list[tuple[str, Any, dict]]) -> dict:
  """`params` after each (path, config, params) source's `stage.warm_start`, in order."""
  for path, source_config, source_params in sources:
    params = stage.warm_start(params, source_config, source_params, path)
  return params

"""Orbax checkpoints of pretrained models: a `params` item and a `config` JSON item."""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from internvl_jax.config import VisionConfig
from internvl_jax.convert.pytorch import abstract_params

_MODEL_KIND = "intern_vit"


def config_to_json(config: VisionConfig) -> dict:
  return {"model": _MODEL_KIND, "vision": dataclasses.asdict(config)}


def config_from_json(data: dict) -> VisionConfig:
  if data.get("model") != _MODEL_KIND:
    raise ValueError(f"Checkpoint holds a {data.get('model')!r} model; this build reads {_MODEL_KIND!r}.")
  return VisionConfig(**data["vision"])


def is_checkpoint(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, item)) for item in ("params", "config"))


def save(directory: str, config: VisionConfig, params):
  directory = os.path.abspath(directory)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(directory, ocp.args.Composite(
      params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config_to_json(config))),
      force=True)


def load(directory: str) -> tuple[VisionConfig, dict]:
  directory = os.path.abspath(directory)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  config = config_from_json(checkpointer.restore(
      directory, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract_params(config))
  params = checkpointer.restore(
      directory, ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
  return config, jax.tree.map(np.asarray, params)

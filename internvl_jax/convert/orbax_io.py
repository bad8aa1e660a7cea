"""Orbax checkpoints of pretrained models: a `params` PyTree item and a `config` JSON item.

Arrays are stored in chunks of at most keymap.BLOCK_BYTES, so that a converter can read any
block of a 6B checkpoint without decoding whole layers.
"""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from internvl_jax.config import VisionConfig
from internvl_jax.convert.keymap import BLOCK_BYTES
from internvl_jax.convert import orbax_stream
from internvl_jax.convert.orbax_stream import BlockSource, LeafReader
from internvl_jax.models.intern_vit import abstract_params

_MODEL_KIND = "intern_vit"


def config_to_json(config: VisionConfig) -> dict:
  return {"model": _MODEL_KIND, "vision": dataclasses.asdict(config)}


def config_from_json(data: dict) -> VisionConfig:
  if data.get("model") != _MODEL_KIND:
    raise ValueError(f"Checkpoint holds a {data.get('model')!r} model; this build reads {_MODEL_KIND!r}.")
  return VisionConfig(**data["vision"])


def is_checkpoint(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, item)) for item in ("params", "config"))


def _checkpointer(streaming: bool = False):
  if not streaming:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  registry = ocp.DefaultCheckpointHandlerRegistry()
  registry.add("params", ocp.args.PyTreeSave, orbax_stream.params_handler())
  registry.add("config", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def save(directory: str, config: VisionConfig, params):
  """Saves params (arrays, or BlockSources that produce them block by block) and the config."""
  leaves = jax.tree.leaves(params)
  streaming = any(isinstance(leaf, BlockSource) for leaf in leaves)
  if streaming and not all(isinstance(leaf, BlockSource) for leaf in leaves):
    raise ValueError("A streaming save needs every leaf as a BlockSource.")
  save_args = None if streaming else jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=BLOCK_BYTES), params)
  _checkpointer(streaming).save(
      os.path.abspath(directory),
      ocp.args.Composite(params=ocp.args.PyTreeSave(params, save_args=save_args),
                         config=ocp.args.JsonSave(config_to_json(config))),
      force=True)


def load_config(directory: str) -> VisionConfig:
  if not is_checkpoint(directory):
    raise ValueError(f"{directory} is not an Orbax checkpoint written by internvl_jax "
                     "(it needs `params` and `config` items).")
  restored = _checkpointer().restore(os.path.abspath(directory),
                                     ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_from_json(restored["config"])


def load(directory: str) -> tuple[VisionConfig, dict]:
  config = load_config(directory)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract_params(config))
  params = _checkpointer().restore(
      os.path.abspath(directory), ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
  return config, jax.tree.map(np.asarray, params)


def leaf_reader(directory: str) -> LeafReader:
  """Reads blocks of the params of a checkpoint without restoring it."""
  load_config(directory)  # checks that it is one of ours
  return LeafReader(os.path.join(directory, "params"))

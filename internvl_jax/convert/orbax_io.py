"""Orbax checkpoints of pretrained models: a `params` PyTree item and a `config` JSON item.

Arrays are stored in chunks of at most keymap.BLOCK_BYTES, so that a converter can read any
block of a 6B checkpoint without decoding whole layers.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from internvl_jax.convert import formats, orbax_stream
from internvl_jax.convert.keymap import BLOCK_BYTES
from internvl_jax.convert.orbax_stream import BlockSource, LeafReader


def is_checkpoint(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, item)) for item in ("params", "config"))


def _checkpointer(streaming: bool = False):
  if not streaming:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  registry = ocp.DefaultCheckpointHandlerRegistry()
  registry.add("params", ocp.args.PyTreeSave, orbax_stream.params_handler())
  registry.add("config", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def save(directory: str, config, params):
  """Saves params (arrays, or BlockSources that produce them block by block) and the config."""
  leaves = jax.tree.leaves(params)
  streaming = any(isinstance(leaf, BlockSource) for leaf in leaves)
  if streaming and not all(isinstance(leaf, BlockSource) for leaf in leaves):
    raise ValueError("A streaming save needs every leaf as a BlockSource.")
  save_args = None if streaming else jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=BLOCK_BYTES), params)
  _checkpointer(streaming).save(
      os.path.abspath(directory),
      ocp.args.Composite(params=ocp.args.PyTreeSave(params, save_args=save_args),
                         config=ocp.args.JsonSave(formats.config_to_json(config))),
      force=True)


def load_config(directory: str):
  if not is_checkpoint(directory):
    raise ValueError(f"{directory} is not an Orbax checkpoint written by internvl_jax "
                     "(it needs `params` and `config` items).")
  restored = _checkpointer().restore(os.path.abspath(directory),
                                     ocp.args.Composite(config=ocp.args.JsonRestore()))
  return formats.config_from_json(restored["config"])


def saved_arrays(pytree_dir: str) -> dict:
  """The tree of a saved PyTree item as host-CPU ShapeDtypeStructs: a restore target that is
  whatever was saved (InternVL-C and -G share a config but not a params tree)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  tree = ocp.PyTreeCheckpointer().metadata(os.path.abspath(pytree_dir)).item_metadata.tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)


def load(directory: str) -> tuple[object, dict]:
  config = load_config(directory)
  target = saved_arrays(os.path.join(directory, "params"))
  params = _checkpointer().restore(
      os.path.abspath(directory), ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
  return config, jax.tree.map(np.asarray, params)


def leaf_reader(directory: str) -> LeafReader:
  """Reads blocks of the params of a checkpoint without restoring it."""
  load_config(directory)  # checks that it is one of ours
  return LeafReader(os.path.join(directory, "params"))

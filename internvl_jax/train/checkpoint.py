"""Orbax checkpoints of the train state and the data iterator's position, saved together.

Each checkpoint is a step directory with two items: "state" (the `TrainState` arrays, each host
writing its shards) and "data" (each process's iterator state as JSON, one file per process).
The state restores onto any mesh and number of processes; the data position of another number
of processes comes back as every process's state, for the iterator to continue from.
Orbax writes a step into a temporary directory and renames it when complete, so a crash during a
save leaves the earlier steps as they were and the half-written one invisible.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

_STATE, _DATA = "state", "data"
PROCESS_STATES = "process_states"  # a data state saved by another number of processes


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves a JSON-serializable iterator state per process (grain's layout: one file each).

  Restores this process's state if as many processes saved it; otherwise
  `{PROCESS_STATES: [state of process 0, 1, ...]}` of the processes that did.
  """

  def save(self, directory: epath.Path, args: "IteratorStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "IteratorStateRestore | None" = None):
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if path.exists():
      return json.loads(path.read_text())
    files = sorted(directory.glob("process_*-of-*.json"),
                   key=lambda f: int(f.name.split("_")[1].split("-")[0]))
    if not files:
      raise ValueError(f"{directory} holds no process_*-of-*.json data iterator state.")
    return {PROCESS_STATES: [json.loads(f.read_text()) for f in files]}

  def metadata(self, directory: epath.Path):
    return None

  def structure(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpoints:
  """The checkpoints of one workdir: async saves, keep the last `keep`, restore onto any mesh."""

  def __init__(self, directory: str, keep: int = 3, async_saves: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_saves)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _DATA))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state) -> bool:
    """Starts saving (returns at once when async); `data_state` must describe the data position
    after `step` steps. Returns False if the step is already saved."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _DATA: IteratorStateSave(data_state)}), force=True)

  def restore(self, step: int, abstract_state):
    """(state, data_state) of `step`; each array lands in the sharding `abstract_state` gives
    it, so a checkpoint written on one mesh restores onto another. `data_state` is this
    process's, or `{PROCESS_STATES: [...]}` if another number of processes saved it."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _DATA: IteratorStateRestore()}))
    return restored[_STATE], restored[_DATA]

  def wait(self):
    """Blocks until the pending save is complete on disk."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has seen the preemption notice (multi-process runs)."""
    return self._manager.reached_preemption(step)

  def close(self):
    self._manager.close()

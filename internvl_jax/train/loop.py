"""The training loop every stage uses: host batch -> global array -> jitted step -> metrics ->
checkpoint, resuming from the workdir's latest checkpoint, saving on preemption."""

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np

from internvl_jax import optim, sharding
from internvl_jax.data import issues
from internvl_jax.loading import CHECKPOINT_DIR
from internvl_jax.train import config as config_lib
from internvl_jax.train import hardware
from internvl_jax.train import metrics as metrics_lib
from internvl_jax.train import step as step_lib
from internvl_jax.train.checkpoint import PROCESS_STATES, Checkpoints
from internvl_jax.train.state import StateFactory, TrainState


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Trainer:
  """The mesh, the state's shardings and the compiled step for one config (no data, no I/O).

  Built before anything compiles, so that config errors surface first; `tools/aot_plan.py`
  compiles its `step` for devices that are not here.
  """

  def __init__(self, config: config_lib.TrainConfig, devices=None):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    config_lib.check_batch(config, self.mesh.shape)
    self.factory = StateFactory(config.stage, config.optimizer, self.mesh,
                                config.mesh.logical_rules)
    config_lib.check_patterns(config.optimizer, self.factory.abstract_params)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    trainable_shardings = optim.partition(self.factory.param_shardings, self.factory.mask)[0]
    self.step = step_lib.jit_train_step(
        step_lib.make_train_step(config.stage, config.optimizer, self.factory.mask,
                                 config.accum_steps, trainable_shardings),
        self.factory.shardings, self.batch_sharding)

  def context(self):
    """The mesh and activation rules the models' sharding constraints read when tracing."""
    return sharding.sharding_context(self.mesh, self.config.mesh.logical_rules)

  def abstract_batch(self):
    abstract = self.config.stage.abstract_batch(self.config.global_batch_size)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
            for k, v in abstract.items()}

  def global_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of each array the step takes become its part of a global array."""
    batch = {}
    for name, spec in self.config.stage.abstract_batch(self.config.global_batch_size).items():
      if name not in host_batch:
        raise ValueError(f"The data has no {name!r} array; it gives {sorted(host_batch)}.")
      value = jax.make_array_from_process_local_data(self.batch_sharding, host_batch[name])
      if value.shape != spec.shape:
        raise ValueError(f"Batch array {name!r} has global shape {value.shape}; the stage "
                         f"expects {spec.shape} (global_batch_size {self.config.global_batch_size}).")
      batch[name] = value
    return batch


def trainer_for(config: config_lib.TrainConfig) -> Trainer:
  """One Trainer (and compiled step) per compiled configuration in a process: runs that differ
  in length, seed, logging or checkpointing share it, and a resume in the same process does not
  compile again."""
  return _cached_trainer(config.stage, config.optimizer, config.mesh, config.global_batch_size,
                         config.accum_steps)


@functools.lru_cache(maxsize=4)
def _cached_trainer(stage, optimizer, mesh, global_batch_size, accum_steps) -> Trainer:
  return Trainer(config_lib.TrainConfig(stage=stage, optimizer=optimizer, mesh=mesh,
                                        global_batch_size=global_batch_size,
                                        accum_steps=accum_steps))


@contextlib.contextmanager
def _sigterm_flag():
  """A flag set by SIGTERM (single process; multi-process runs use JAX's preemption notice)."""
  flag = {"set": False}
  if jax.process_count() > 1:
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(set=True))
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _peak_tflops(config: config_lib.TrainConfig) -> float:
  device = jax.devices()[0]
  return (config.peak_tflops_per_device or hardware.peak_tflops(device.device_kind) or
          hardware.measure_tflops(device))


def train(config: config_lib.TrainConfig, data, workdir: str, *,
          init: Callable[[dict], dict] | None = None,
          evaluate: Callable[[dict], dict[str, float]] | None = None,
          eval_every: int | None = None) -> TrainState:
  """Trains to `config.num_steps`, resuming from WORKDIR/checkpoints if it has a checkpoint.

  `data` yields host batches (dicts of numpy arrays, this process's rows) and has
  JSON-serializable `get_state()` / `set_state()`; its state is saved with every checkpoint. A
  checkpoint saved by another number of processes resumes if it has `continue_from(states)`
  (every saving process's state). If it has `issue_counts()` (the data pipeline's skipped
  records by reason), their sums over processes are logged.
  `init` maps fresh params (numpy) to the first params of a run that has no checkpoint (a warm
  start). `evaluate(params)` runs every `eval_every` steps and after the last; its metrics are
  logged as "eval/<name>". Returns the final state. On SIGTERM (preemption) the current step is
  saved before returning.
  """
  trainer = trainer_for(config)
  stage, num_steps = config.stage, config.num_steps
  checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints,
                            config.async_checkpoints)
  latest = checkpoints.latest_step()
  if latest is None:
    state = trainer.factory.init(config.seed)
    if init is not None:
      params = init(jax.device_get(state.params))
      state = state.replace(params=jax.device_put(params, trainer.factory.param_shardings))
  else:
    state, data_state = checkpoints.restore(latest, trainer.factory.abstract())
    if isinstance(data_state, dict) and PROCESS_STATES in data_state:
      if not hasattr(data, "continue_from"):
        raise ValueError(
            f"The checkpoint {checkpoints.directory}/{latest} was saved by "
            f"{len(data_state[PROCESS_STATES])} processes; this run has {jax.process_count()}, "
            f"and its data ({type(data).__name__}) cannot continue from another process count.")
      data.continue_from(data_state[PROCESS_STATES])
    else:
      data.set_state(data_state)
    logging.info("Resumed from %s at step %d.", checkpoints.directory, latest)
  step = int(state.step)
  writer = metrics_lib.MetricsWriter(workdir, num_steps, step)
  throughput = metrics_lib.Throughput(stage.flops_per_example(), jax.device_count(),
                                      _peak_tflops(config))
  profile = config.profile_steps
  interval_start, examples, tokens, tracing = None, 0, 0, False
  batch = next(data) if step < num_steps else None
  try:
    with _sigterm_flag() as sigterm:
      while step < num_steps:
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
          tracing = True
        with trainer.context():
          state, metrics = trainer.step(state, trainer.global_batch(batch))
        step_tokens = stage.count_tokens(batch)
        step += 1
        data_state = data.get_state()  # the position after this step's batch
        if step < num_steps:
          batch = next(data)  # read while the device computes
        bad_streak = int(metrics["bad_streak"])  # waits for the step
        writer.advance()
        if tracing and step == profile[1]:
          jax.profiler.stop_trace()
          tracing = False
        if interval_start is None:  # the first step of a run includes compilation: not timed
          interval_start = time.perf_counter()
        else:
          examples += config.global_batch_size
          tokens += step_tokens
        if step % config.log_every == 0 or step == num_steps or bad_streak:
          values = jax.device_get(metrics)
          # This interval's tokens and the records the input pipeline skipped (or truncated) so
          # far in the run, by reason, of all processes: each process counts its own rows.
          # Every reason is sent, zero or not, so that each process gathers the same vector.
          local = getattr(data, "issue_counts", dict)()
          counts = metrics_lib.sum_over_processes(
              {"tokens": tokens, **{f"data/{reason}": local.get(reason, 0)
                                    for reason in issues.REASONS}})
          values.update({name: count for name, count in counts.items()
                         if name != "tokens" and count})
          seconds = time.perf_counter() - interval_start
          if examples:  # global_batch_size per step: already every process's examples
            values.update(throughput.rates(examples, counts["tokens"], seconds))
          writer.write(step, values)
          interval_start, examples, tokens = time.perf_counter(), 0, 0
        if bad_streak >= config.max_bad_steps:
          raise NonFiniteError(
              f"Step {step}: the loss or gradients were not finite for {bad_streak} consecutive "
              f"steps (max_bad_steps={config.max_bad_steps}); stopping. The last checkpoint "
              f"({checkpoints.latest_step()}) holds the last good state; lower the learning rate "
              f"or check the data before resuming.")
        if evaluate is not None and (step == num_steps or (eval_every and step % eval_every == 0)):
          results = {f"eval/{name}": value for name, value in evaluate(state.params).items()}
          writer.write(step, results)
          writer.message(f"step {step}: " + ", ".join(f"{name} {value:.4g}"
                                                      for name, value in results.items()))
        preempted = sigterm["set"] or checkpoints.reached_preemption(step)
        if preempted or step % config.checkpoint_every == 0 or step == num_steps:
          checkpoints.save(step, state, data_state)
        if preempted:
          writer.message(f"Preempted: saved step {step} to {checkpoints.directory}.")
          break
  finally:
    if tracing:
      jax.profiler.stop_trace()
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  return state

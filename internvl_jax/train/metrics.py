"""Per-log-step metrics: throughput and MFU, written as JSON lines and TensorBoard events, and a
progress bar with ETA. Counts that each process keeps of its own rows are summed over processes;
only the first process writes."""

import json
import math
import os

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class Throughput:
  """samples/s, tokens/s, TFLOP/s per device and MFU over the interval since the last call."""

  def __init__(self, flops_per_example: int, num_devices: int, peak_tflops_per_device: float):
    self.flops_per_example = flops_per_example
    self.num_devices = num_devices
    self.peak = peak_tflops_per_device

  def rates(self, examples: int, tokens: int, seconds: float) -> dict[str, float]:
    tflops = self.flops_per_example * examples / seconds / self.num_devices / 1e12
    return {"samples_per_second": examples / seconds, "tokens_per_second": tokens / seconds,
            "tflops_per_device": tflops, "mfu": tflops / self.peak}


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
  """Each count summed over all processes (every process must call this at the same step).

  One gather of a small vector; each count travels as two 31-bit halves, since JAX arrays hold
  32-bit integers unless x64 is on, and a long run's counts can pass 2**31.
  """
  if jax.process_count() == 1:
    return dict(counts)
  values = np.array(list(counts.values()), np.int64)
  halves = np.stack([values >> 31, values & (2**31 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64).sum(axis=0)
  return dict(zip(counts, (gathered[0] << 31) + gathered[1]))


def _number(value) -> float | int:
  value = value.item() if hasattr(value, "item") else value
  return value if isinstance(value, int) else float(value)


class MetricsWriter:
  """Appends one JSON object per log step to WORKDIR/metrics.jsonl, mirrors it to TensorBoard
  (WORKDIR/tensorboard) and shows a progress bar; on processes other than the first, nothing."""

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, METRICS_FILE), "a")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict):
    """Logs `metrics` (scalars) for `step`, the number of steps completed."""
    if not self._enabled:
      return
    record = {"step": step, **{k: _number(v) for k, v in sorted(metrics.items())}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for name, value in record.items():
      if name != "step" and math.isfinite(value):
        self._tensorboard.add_scalar(name, value, step)
    if "loss" in record:  # evaluation records carry none
      self._bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)

  def advance(self, steps: int = 1):
    if self._enabled:
      self._bar.update(steps)

  def message(self, text: str):
    """A line on the console that does not break the progress bar."""
    if self._enabled:
      self._bar.write(text)

  def close(self):
    if self._enabled:
      self._bar.close()
      self._tensorboard.close()
      self._file.close()

"""JAX against PyTorch on the CPU, side by side in one process: the best dense matmul rate either
library reaches (the MFU denominator), steps timed alternately, and the comparison table."""

import os
import resource
import statistics
import time

import jax

from internvl_jax.train import hardware

MATMUL_SIZE = 2048


def describe_machine() -> None:
  """The CPU, its load and the settings that change the figures, for BENCHMARKS.md."""
  model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
  print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {model}, {os.cpu_count()} cores; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def torch_matmul_tflops(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
  """Dense float32 matmul TFLOP/s of torch on the CPU (median of `repeats`)."""
  import torch
  a = torch.ones(size, size)
  a @ a

  def timed():
    start = time.perf_counter()
    a @ a
    return time.perf_counter() - start

  return 2 * size**3 / statistics.median(timed() for _ in range(repeats)) / 1e12


def best_matmul_tflops() -> float:
  """The higher of XLA's and torch's float32 matmul rates, each printed."""
  import torch
  torch.set_num_threads(os.cpu_count())
  xla = hardware.measure_tflops(jax.devices()[0], MATMUL_SIZE)
  torch_rate = torch_matmul_tflops()
  print(f"dense float32 {MATMUL_SIZE}^3 matmul: XLA {xla * 1e3:.0f} GFLOP/s, torch "
        f"{torch_rate * 1e3:.0f} GFLOP/s ({torch.get_num_threads()} threads); "
        f"MFU below is against {max(xla, torch_rate) * 1e3:.0f}")
  return max(xla, torch_rate)


def mfu_peak_tflops(device: jax.Device, dtype: str, with_torch: bool) -> float:
  """The MFU denominator, printed: on the CPU in float32 beside torch, the better of the two
  libraries' matmul rates; else the device's dense bfloat16 peak where `hardware.DEVICES` knows
  it, or the matmul rate measured on it."""
  if device.platform == "cpu" and dtype == "float32" and with_torch:
    return best_matmul_tflops()
  measured = hardware.measure_tflops(device, 2048 if device.platform == "cpu" else 8192,
                                     dtype=jax.numpy.dtype(dtype))
  peak = hardware.peak_tflops(device.device_kind) or measured
  print(f"dense {dtype} matmul on {device.device_kind}: {measured:.3f} TFLOP/s measured; MFU "
        f"below is against {peak:.3f} TFLOP/s")
  return peak


def torch_train_step(model, loss_of, device: str, dtype: str):
  """One PyTorch training step of `model` on `device` ("cpu" or "cuda") as a runner: gradients
  cleared, `loss_of()` under autocast for a half-precision `dtype` (float32 params, half-precision
  compute, as JAX's), backward, and on a GPU waited for; it returns the loss."""
  import torch

  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  half = dtype != "float32"

  def step():
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=getattr(torch, dtype), enabled=half):
      loss = loss_of()
    loss.backward()
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  return step


def alternate(runners: dict, steps: int, turn: int = 3) -> dict[str, list[tuple[float, float]]]:
  """(wall seconds, process CPU seconds) of `steps` steps of each runner. The runners take turns
  of `turn` timed steps, so that machine noise hits them alike; each turn starts with one untimed
  step, because training runs its steps back to back and, while the other library runs, the kernel
  of a shared machine may page out memory a runner keeps between steps (proactive reclaim), which
  its next step then faults back in."""
  times = {name: [] for name in runners}
  while any(len(samples) < steps for samples in times.values()):
    for name, run in runners.items():
      run()
      for _ in range(min(turn, steps - len(times[name]))):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        run()
        times[name].append((time.perf_counter() - wall, _cpu_seconds() - cpu))
  return times


def print_comparison(times: dict, flops_per_step: float, peak_tflops: float, unit: str,
                     per_step: int) -> None:
  """Median seconds, `unit`/s, achieved TFLOP/s and MFU of each runner, then the ratio of each
  to the last (the reference). CPU s/step is the process's user + system time: on a loaded
  machine the share of the cores each side got varies, and this shows the work each needed."""
  print(f"{'implementation':<16}{'median s/step':>14}{'CPU s/step':>11}{unit + '/s':>12}"
        f"{'TFLOP/s':>10}{'MFU':>8}")
  medians = {}
  for name, samples in times.items():
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    medians[name] = wall, cpu
    rate = flops_per_step / wall
    print(f"{name:<16}{wall:>14.4f}{cpu:>11.3f}{per_step / wall:>12.2f}{rate / 1e12:>10.4f}"
          f"{rate / (peak_tflops * 1e12):>8.1%}")
  *ours, (reference, (wall_ref, cpu_ref)) = medians.items()
  for name, (wall, cpu) in ours:
    print(f"{name} / {reference} throughput ratio: {wall_ref / wall:.2f}x "
          f"(by CPU time: {cpu_ref / cpu:.2f}x)")


def print_breakdown(name: str, seconds: dict[str, float], top: int = 6) -> None:
  """The top categories of a `benchmark_profile.breakdown`, as shares of the profiled op time."""
  total = sum(seconds.values())
  shares = ", ".join(f"{category} {value / total:.0%}"
                     for category, value in list(seconds.items())[:top])
  print(f"{name} op time by category ({total:.2f} s per step over all threads): {shares}")

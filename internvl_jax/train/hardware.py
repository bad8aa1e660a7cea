"""Peak matmul throughput and memory of known accelerators: the denominators of MFU and of
"does it fit" in ahead-of-time planning."""

import statistics
import time

import jax
import jax.numpy as jnp

# Dense bfloat16 TFLOP/s and HBM GB per chip, by `device_kind` (longest matching prefix wins).
# JAX names TPU v5p "TPU v5" and v5e "TPU v5 lite".
DEVICES = {
    "TPU v2": (45.0, 8),
    "TPU v3": (123.0, 16),
    "TPU v4": (275.0, 32),
    "TPU v5 lite": (197.0, 16),
    "TPU v5": (459.0, 95),
    "TPU v5p": (459.0, 95),
    "TPU v6 lite": (918.0, 32),
    "NVIDIA A100": (312.0, 80),
    "NVIDIA H100": (989.0, 80),
    "NVIDIA H200": (989.0, 141),
}


def _lookup(device_kind: str):
  matches = [kind for kind in DEVICES if device_kind.startswith(kind)]
  return DEVICES[max(matches, key=len)] if matches else None


def peak_tflops(device_kind: str) -> float | None:
  known = _lookup(device_kind)
  return None if known is None else known[0]


def memory_gb(device_kind: str) -> float | None:
  known = _lookup(device_kind)
  return None if known is None else known[1]


def measure_tflops(device: jax.Device, size: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """Dense matmul TFLOP/s of one device (median of `repeats`): the MFU denominator where no
  table entry is, and what benchmarks compare against in the same run."""
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()

  def timed():
    start = time.perf_counter()
    matmul(a).block_until_ready()
    return time.perf_counter() - start

  return 2 * size**3 / statistics.median(timed() for _ in range(repeats)) / 1e12

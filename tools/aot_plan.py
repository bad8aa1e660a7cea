"""Compiles an experiment's real training step for a device topology without running it, and
prints per-device memory, FLOPs per step and whether it fits.

  python tools/aot_plan.py --experiment experiments/stage1_contrastive.py --preset paper \
      --topology v5p:4x4x4        # TPU devices described by libtpu, on this CPU machine
  python tools/aot_plan.py --experiment experiments/stage1_contrastive.py --preset demo \
      --cpu-devices 8 [--set accum_steps=2 --set optimizer.learning_rate=1e-4]

An experiment file exposes `get_config(preset) -> TrainConfig`.

FLOPs: XLA's cost analysis counts the body of a loop (scanned layers, accumulated micro-batches)
once, whatever the trip count. So the step is compiled again without accumulation (one
micro-batch per step), without remat, with `nn.scan` unrolled (patched for these compiles only,
so XLA sees every layer), and with every scanned depth (each `num_layers` field of the config)
at 2, then each in turn at 4 with the others at 2 (2, not 1: QLLaMA scans its layers in pairs).
FLOPs are linear in each depth, so one micro-batch costs
f(2, ..., 2) + sum_i (L_i - 2) (f(.., 4_i, ..) - f(2, ..., 2)) / 2, and a step `accum_steps`
times that. These are model FLOPs (no recomputation), compared with the stage's analytic count. The
memory figures are those of the real step, with its remat and accumulation.
"""

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib.util
import os
import sys
import time


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experiment", required=True, help="experiment file with get_config(preset)")
  parser.add_argument("--preset", required=True)
  target = parser.add_mutually_exclusive_group(required=True)
  target.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x4 (needs libtpu)")
  target.add_argument("--cpu-devices", type=int, help="plan for this many host CPU devices")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (dotted path; VALUE a Python literal)")
  parser.add_argument("--memory-gb", type=float, help="device memory, if not in the known table")
  parser.add_argument("--no-flops", action="store_true", help="skip the FLOPs compilations")
  return parser.parse_args(argv)


def _load_config(path: str, preset: str, settings: list[str]):
  from internvl_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  changes = {}
  for setting in settings:
    key, sep, value = setting.partition("=")
    if not sep:
      raise ValueError(f"--set {setting!r}: expected KEY=VALUE.")
    try:
      changes[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[key] = value  # a bare string
  return config_lib.override(module.get_config(preset), changes)


def _field_paths(obj, name: str, prefix: str = "") -> list[str]:
  """Dotted paths of every dataclass field called `name` inside `obj`."""
  paths = []
  for field in dataclasses.fields(obj):
    value, path = getattr(obj, field.name), prefix + field.name
    if field.name == name:
      paths.append(path)
    elif dataclasses.is_dataclass(value):
      paths += _field_paths(value, name, path + ".")
  return paths


def _compile(config, devices):
  from internvl_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(config, devices)
  with trainer.context():
    return trainer.step.lower(trainer.factory.abstract(), trainer.abstract_batch()).compile()


@contextlib.contextmanager
def _unrolled_scans():
  """Models call `nn.scan` when traced; within this context it unrolls its loop."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  scan = nn.scan
  nn.scan = functools.partial(scan, unroll=True)
  try:
    yield
  finally:
    nn.scan = scan


def model_flops_per_step(config, devices) -> tuple[float, dict[str, int]]:
  """Per-device XLA FLOPs of one step, extrapolated over scanned depths (module docstring)."""
  from internvl_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  depths = {path: _get(config, path) for path in _field_paths(config, "num_layers")}
  base = config_lib.override(config, {p: "none" for p in _field_paths(config, "remat_policy")})
  base = base.replace(accum_steps=1, global_batch_size=config.global_batch_size // config.accum_steps)
  flops = lambda changes: _compile(config_lib.override(base, changes), devices).cost_analysis()["flops"]
  twos = {path: 2 for path in depths}
  with _unrolled_scans():
    f0 = flops(twos)
    per_micro = f0 + sum((depth - 2) * (flops({**twos, path: 4}) - f0) / 2
                         for path, depth in depths.items())
  return per_micro * config.accum_steps, depths


def _get(obj, path: str):
  for part in path.split("."):
    obj = getattr(obj, part)
  return obj


def main(argv=None):
  args = _parse(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"  # never initialize an attached accelerator: compile only
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
  import jax  # pylint: disable=import-outside-toplevel
  from internvl_jax.train import hardware  # pylint: disable=import-outside-toplevel

  config = _load_config(args.experiment, args.preset, args.set)
  if args.topology:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
  else:
    devices = jax.devices("cpu")[:args.cpu_devices]
  kind = devices[0].device_kind
  target = args.topology or f"{args.cpu_devices} CPU devices"
  print(f"{args.experiment} --preset {args.preset}: {target} ({len(devices)} x {kind})")

  start = time.perf_counter()
  memory = _compile(config, devices).memory_analysis()
  gib = lambda b: b / 2**30
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes -
           memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  per_device_batch = config.global_batch_size // len(devices)
  print(f"  compiled in {time.perf_counter() - start:.0f} s")
  print(f"  per device: {per_device_batch} examples per step = {config.accum_steps} micro-batches "
        f"of {per_device_batch // config.accum_steps}")
  print(f"  memory per device: arguments {gib(memory.argument_size_in_bytes):.2f} GiB, "
        f"outputs {gib(memory.output_size_in_bytes):.2f} GiB (aliased "
        f"{gib(memory.alias_size_in_bytes):.2f} GiB), temporaries "
        f"{gib(memory.temp_size_in_bytes):.2f} GiB, total {gib(total):.2f} GiB "
        f"({total / 1e9:.1f} GB)")
  capacity = args.memory_gb or hardware.memory_gb(kind)
  if capacity is None:
    print(f"  fits: unknown (no memory size known for {kind!r}; pass --memory-gb)")
  else:
    verdict = "yes" if total <= capacity * 1e9 else "NO"
    print(f"  fits in {capacity:g} GB: {verdict} ({100 * total / (capacity * 1e9):.0f}% used)")

  if not args.no_flops:
    start = time.perf_counter()
    xla, depths = model_flops_per_step(config, devices)
    analytic = config.stage.flops_per_example() * config.global_batch_size / len(devices)
    print(f"  FLOPs per step per device (XLA, depths {depths} extrapolated, "
          f"{time.perf_counter() - start:.0f} s): {xla:.4g}; analytic {analytic:.4g}; "
          f"XLA / analytic = {xla / analytic:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

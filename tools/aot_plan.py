"""Compiles an experiment's real training step for a device topology without running it, and
prints per-device memory, FLOPs per step and whether it fits.

  python tools/aot_plan.py --experiment experiments/stage1_contrastive.py --preset paper \
      --topology v5p:4x4x4        # TPU devices described by libtpu, on this CPU machine
  python tools/aot_plan.py --experiment experiments/stage1_contrastive.py --preset demo \
      --cpu-devices 8 [--set train.accum_steps=2 --set train.optimizer.learning_rate=1e-4]
  python tools/aot_plan.py --experiment experiments/stage3_sft.py \
      --preset finetune-InternVL-Chat-V1-5 --topology v5p:4x4x4 --set train.stage.max_len=8192 \
      --set train.global_batch_size=64 --set train.accum_steps=1   # one 8192-token row per chip

An experiment file exposes `get_config(preset) -> TrainConfig`. The plan names the attention
implementation the config asks for, and the fused kernels the compiled step holds (Mosaic ones,
e.g. splash attention's, or cuDNN's fused attention; XLA's own attention has none).

FLOPs: XLA's cost analysis counts the body of a while loop once, whatever its trip count: the
scanned layers, the accumulated micro-batches, and the loops the TPU compiler makes itself (FSDP
matmuls become windowed loops over the weight shards, `windowed_dot_general`, two shards a trip).
Unrolling the scans does not help: which matmuls the compiler windows changes with the depth, so
counts of unrolled shallow variants are not linear in it. So the step is compiled once more on
the same devices, without accumulation (one micro-batch per step) and without remat (it need not
fit: only its optimized HLO is read, from an XLA dump), and the FLOPs of its dots and
convolutions are summed, each loop body times its trip count (XLA's annotation, else the
condition's bound, the counter's start and its step in the body), and each value once (XLA
rematerializes values of a step that does not fit, as `x.remat`, `x.remat2`, ...). That is every
layer as XLA runs it, after it dropped what frozen towers do not need: matmul model FLOPs per
device (no recomputation), times `accum_steps`, compared with the stage's analytic (matmul)
count. The
memory figures are those of the real step, with its remat and accumulation.
"""

import argparse
import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import sys
import tempfile
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
  """The experiment's preset, overridden, as the trainer's config."""
  from internvl_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.override(module.get_config(preset), config_lib.parse_settings(settings)).train


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
  """(the compiled step, its optimized HLO, None); where the TPU compiler finds that the step
  does not fit, the compiled step is None and the third value the first line of its error (how
  far over HBM).

  The optimized HLO comes from an XLA dump: the TPU executable cannot be printed (`as_text` fails
  on its async ops), and the compiler dumps it before it checks the memory.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from internvl_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(config, devices)
  with trainer.context(), tempfile.TemporaryDirectory() as dump:
    lowered = trainer.step.lower(trainer.factory.abstract(), trainer.abstract_batch())
    try:
      compiled = lowered.compile({"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      compiled, over_memory = None, str(error).strip().splitlines()[0]
    else:
      over_memory = None
    (path,) = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    with open(path, encoding="utf-8") as f:
      return compiled, f.read(), over_memory


_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:calls|body|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# Ops whose `to_apply` is a scalar combiner, not work of its own.
_SCALAR_APPLY = {"reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "map",
                 "all-reduce", "all-reduce-start", "reduce-scatter"}


def _dims(shape: str) -> list[int]:
  return [int(d) for d in _SHAPE.match(shape).group(1).split(",") if d]


def _operands(rest: str) -> list[str]:
  return [name.strip().lstrip("%") for name in rest.partition(")")[0].split(",") if name.strip()]


def _parse_instruction(line: str):
  """(name, shape, opcode, text after the opcode's parenthesis) of an HLO instruction line."""
  lhs, sep, rhs = line.partition(" = ")
  if not sep:
    return None
  if rhs.startswith("("):  # a tuple shape, which holds spaces
    depth = 0
    for end, char in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if not depth:
        break
    shape, rhs = rhs[:end + 1], rhs[end + 2:]
  else:
    shape, _, rhs = rhs.partition(" ")
  opcode, _, rest = rhs.partition("(")
  return lhs.split()[-1].lstrip("%"), shape, opcode, rest


def _parse_module(hlo: str):
  """({computation: {instruction: (shape, opcode, rest)}}, entry computation name)."""
  computations, entry, body = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      body = computations.setdefault(header.group(1), {})
      entry = header.group(1) if line.startswith("ENTRY") else entry
    elif body is not None and line.startswith("  "):
      parsed = _parse_instruction(line)
      if parsed:
        body[parsed[0]] = parsed[1:]
  return computations, entry


def _window(rest: str, key: str, rank: int, default: int) -> list[int]:
  found = re.search(rf"\b{key}=([\dx_]+)", rest)
  return [int(v) for v in found.group(1).split("x")] if found else [default] * rank


def _valid_taps(size: int, window: int, out: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
  """(output position, kernel position) pairs of one spatial dim that land on an input element,
  not on padding or a hole of a dilated input (XLA writes some dots as such convolutions)."""
  span = (size - 1) * lhs_dilate
  return sum(1 for o in range(out) for k in range(window)
             if 0 <= (x := o * stride + k * rhs_dilate - pad_lo) <= span and x % lhs_dilate == 0)


def _matmul_flops(shape: str, opcode: str, rest: str, instructions) -> int:
  out_dims = _dims(shape)
  lhs, rhs = (_dims(instructions[name][0]) for name in _operands(rest)[:2])
  if opcode == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    return 2 * math.prod(out_dims) * math.prod(lhs[int(d)] for d in contracting.split(",") if d)
  # A convolution: batch x output features x input features per group x, per spatial dim, the
  # (output, kernel) position pairs that read an input element.
  lhs_labels, kernel_labels, out_labels = re.search(
      r"dim_labels=(\w+)_(\w+)->(\w+)", rest).groups()
  spatial = [c for c in out_labels if c.isdigit()]
  rank = len(spatial)
  sizes, strides = _window(rest, "size", rank, 1), _window(rest, "stride", rank, 1)
  lhs_dilates, rhs_dilates = _window(rest, "lhs_dilate", rank, 1), _window(rest, "rhs_dilate", rank, 1)
  pads = re.search(r"\bpad=([\d_x-]+)", rest)
  pads_lo = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else [0] * rank
  taps = math.prod(
      _valid_taps(lhs[lhs_labels.index(c)], sizes[i], out_dims[out_labels.index(c)], strides[i],
                  pads_lo[i], lhs_dilates[i], rhs_dilates[i]) for i, c in enumerate(spatial))
  return (2 * out_dims[out_labels.index("b")] * out_dims[out_labels.index("f")] *
          rhs[kernel_labels.index("i")] * taps)


def _source(instructions, name: str) -> str:
  """`name` with copies and conversions looked through."""
  while name in instructions and instructions[name][1] in ("copy", "convert", "bitcast"):
    name = _operands(instructions[name][2])[0]
  return name


def _constant(instructions, name: str):
  """The value of scalar `name` if it is an integer constant (behind copies), else None."""
  shape_opcode_rest = instructions.get(_source(instructions, name))
  if shape_opcode_rest and shape_opcode_rest[1] == "constant":
    return int(shape_opcode_rest[2].partition(")")[0])
  return None


def _step(computations, body: str, index: int):
  """The constant that loop `body` adds to tuple element `index` each trip, else None."""
  instructions = computations[body]
  root = list(instructions.values())[-1]
  if root[1] != "tuple":
    return None
  _, opcode, rest = instructions[_source(instructions, _operands(root[2])[index])]
  if opcode != "add":
    return None
  for term, other in (_operands(rest), _operands(rest)[::-1]):
    counter = instructions.get(_source(instructions, other), ("", "", ""))
    if counter[1] == "get-tuple-element" and f"index={index}" in counter[2]:
      return _constant(instructions, term)
  return None


def _trip_count(computations, caller, line_rest: str) -> int:
  """A while loop's trip count: XLA's annotation, else from its condition `counter < N` (or <=),
  the counter's constant start and the constant its body adds (what the TPU compiler leaves)."""
  known = _TRIP_COUNT.search(line_rest)
  if known:
    return int(known.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", line_rest).group(1)
  body = re.search(r"body=%?([\w.\-]+)", line_rest).group(1)
  cond = computations[condition]
  _, opcode, rest = list(cond.values())[-1]  # the ROOT
  direction = re.search(r"direction=(\w+)", rest)
  if opcode == "compare" and direction:
    left, right = _operands(rest)
    bound, counter, direction = _constant(cond, right), left, direction.group(1)
    if bound is None:  # N > counter
      bound, counter = _constant(cond, left), right
      direction = {"GT": "LT", "GE": "LE"}.get(direction)
    index = re.search(r"index=(\d+)", cond.get(counter, ("", "", ""))[2])
    init = caller[_operands(line_rest)[0]]
    if bound is not None and index and init[1] == "tuple" and direction in ("LT", "LE"):
      index = int(index.group(1))
      start = _constant(caller, _operands(init[2])[index])
      step = _step(computations, body, index)
      if start is not None and step:
        return max(0, -(-(bound + (direction == "LE") - start) // step))
  raise ValueError(f"aot_plan: cannot find the trip count of a while loop (condition "
                   f"{condition}); its FLOPs would be counted once.")


def hlo_matmul_flops(hlo: str) -> int:
  """FLOPs of the dots and convolutions of an optimized HLO module, each value once: a
  computation's count includes what it calls, loop bodies times their trip count, the costlier
  branch of a conditional; recomputations by XLA's rematerialization pass are left out."""
  computations, entry = _parse_module(hlo)

  @functools.cache
  def flops(name: str) -> int:
    instructions, per_value = computations[name], {}
    for instruction, (shape, opcode, rest) in instructions.items():
      if opcode in ("dot", "convolution"):
        count = _matmul_flops(shape, opcode, rest, instructions)
      elif opcode == "conditional":
        branches = _BRANCHES.search(rest)
        names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
                 else _CALLEES.findall(rest))
        count = max(flops(b) for b in names)
      elif opcode not in _SCALAR_APPLY:
        count = sum(flops(callee) for callee in _CALLEES.findall(rest))
        if opcode == "while" and count:
          count *= _trip_count(computations, instructions, rest)
      else:
        count = 0
      # XLA's rematerialization (when the step does not fit) recomputes `x` as `x.remat`,
      # `x.remat2`, ... (the original may be gone): one value, counted once.
      value = instruction.partition(".remat")[0]
      per_value[value] = max(per_value.get(value, 0), count)
    return sum(per_value.values())

  return flops(entry)


def configured_attention(config) -> str:
  """Each tower's attention implementation as its config names it ("auto": by the platform
  compiled for, which `fused_kernels` then shows)."""
  chosen = []
  for path in _field_paths(config, "attention"):
    value = config
    for part in path.split("."):
      value = getattr(value, part)
    chosen.append(f"{path.split('.')[-2]} {value.implementation}")
  return ", ".join(chosen)


# A fused kernel as a custom call: Mosaic (Pallas on TPU, e.g. splash attention's kernels, each an
# instruction named after its kernel) or cuDNN's fused attention (named by its target).
_FUSED_KERNEL = re.compile(
    r'^\s*(?:ROOT )?%?([\w\-]+?)(?:\.\d+)? = .*custom_call_target="(tpu_custom_call|__cudnn\$fmha\w*)"',
    re.MULTILINE)


def fused_kernels(hlo: str) -> list[str]:
  """The distinct fused kernels of an optimized HLO module (none where attention runs as XLA's
  own ops): a Mosaic kernel's name, or a cuDNN custom call's target."""
  return sorted({name if target == "tpu_custom_call" else target
                 for name, target in _FUSED_KERNEL.findall(hlo)})


def model_flops_per_step(config, devices) -> float:
  """Per-device matmul FLOPs of one step in XLA's optimized HLO (module docstring)."""
  from internvl_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  base = config_lib.override(config, {p: "none" for p in _field_paths(config, "remat_policy")})
  # XLA's attention: the count reads the HLO's matmuls and cannot see inside a fused kernel.
  base = config_lib.override(
      base, {f"{p}.implementation": "xla" for p in _field_paths(config, "attention")})
  base = base.replace(accum_steps=1, global_batch_size=config.global_batch_size // config.accum_steps)
  # Without remat the step may not fit; its optimized HLO is all that is needed here.
  return hlo_matmul_flops(_compile(base, devices)[1]) * config.accum_steps


def main(argv=None):
  args = _parse(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"  # never initialize an attached accelerator: compile only
  # Compiling needs no TPU of its own, so libtpu need not lock out jobs that hold one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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
  compiled, hlo, over_memory = _compile(config, devices)
  per_device_batch = config.global_batch_size // len(devices)
  print(f"  compiled in {time.perf_counter() - start:.0f} s")
  print(f"  per device: {per_device_batch} examples per step = {config.accum_steps} micro-batches "
        f"of {per_device_batch // config.accum_steps}")
  kernels = fused_kernels(hlo)
  print(f"  attention: {configured_attention(config)}; fused kernels in the compiled step: "
        f"{', '.join(kernels) if kernels else 'none (XLA ops only)'}")
  capacity = args.memory_gb or hardware.memory_gb(kind)
  if compiled is None:
    print(f"  fits in {capacity:g} GB: NO (the TPU compiler: {over_memory})")
    return 0
  memory = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes -
           memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  print(f"  memory per device: arguments {gib(memory.argument_size_in_bytes):.2f} GiB, "
        f"outputs {gib(memory.output_size_in_bytes):.2f} GiB (aliased "
        f"{gib(memory.alias_size_in_bytes):.2f} GiB), temporaries "
        f"{gib(memory.temp_size_in_bytes):.2f} GiB, total {gib(total):.2f} GiB "
        f"({total / 1e9:.1f} GB)")
  if memory.host_temp_size_in_bytes:  # what offloading remat policies keep in host memory
    print(f"  host memory per device: temporaries {gib(memory.host_temp_size_in_bytes):.2f} GiB")
  if capacity is None:
    print(f"  fits: unknown (no memory size known for {kind!r}; pass --memory-gb)")
  else:
    verdict = "yes" if total <= capacity * 1e9 else "NO"
    print(f"  fits in {capacity:g} GB: {verdict} ({100 * total / (capacity * 1e9):.0f}% used)")

  if not args.no_flops:
    start = time.perf_counter()
    xla = model_flops_per_step(config, devices)
    analytic = config.stage.flops_per_example() * config.global_batch_size / len(devices)
    print(f"  FLOPs per step per device (XLA's optimized HLO, every layer, "
          f"{time.perf_counter() - start:.0f} s): {xla:.4g}; analytic {analytic:.4g}; "
          f"XLA / analytic = {xla / analytic:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

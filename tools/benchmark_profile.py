"""Where a compiled JAX function spends its time: a profiler trace summed by HLO op category.

The trace's events are named after the instructions of the optimized HLO that ran; each is put in
a category by the operations it computes (a fusion by the operations of the computation it calls),
so the breakdown reads "matmul 70%, transpose/copy 10%, ...". Control flow (while loops, calls)
is left out: its time is that of the instructions inside it.
"""

import collections
import glob
import re
import tempfile

import jax

# First match wins: a fusion holding a dot is a matmul whatever else it fused, and one that
# computes on arrays is elementwise even when it also reads or writes a scan's stacked slices.
ARITHMETIC = {"add", "subtract", "multiply", "divide", "exponential", "log", "tanh", "erf",
              "rsqrt", "sqrt", "power", "negate", "maximum", "minimum", "select", "compare",
              "logistic", "exponential-minus-one", "log-plus-one", "abs", "convert"}
CATEGORIES = (
    ("matmul", {"dot", "convolution"}),
    ("reduction", {"reduce", "reduce-window"}),
    ("elementwise", ARITHMETIC),
    ("scan slicing", {"dynamic-slice", "dynamic-update-slice"}),
    ("transpose/copy", {"transpose", "copy"}),
    ("zero init", {"broadcast"}),
)
CONTROL_FLOW = {"while", "call", "conditional", "tuple", "get-tuple-element", "parameter",
                "constant", "bitcast"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)[{ ].*?[\]}\)] ([a-z\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _parse(hlo_text: str):
  """{computation: [(instruction, opcode, called computation or None)]}; arithmetic on scalars
  (a dynamic slice's index clamping) is left out."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if (header := _COMPUTATION.match(line)) and not line.startswith(" "):
      current = computations.setdefault(header.group(1), [])
    elif current is not None and (instruction := _INSTRUCTION.match(line)):
      name, shape, opcode = instruction.groups()
      if opcode in ARITHMETIC and shape.endswith("[]"):
        continue
      called = _CALLS.search(line)
      current.append((name, opcode, called and called.group(1)))
  return computations


def op_categories(hlo_text: str) -> dict[str, str]:
  """{instruction name: category} for every instruction that runs as one step of the program."""
  computations = _parse(hlo_text)

  def opcodes(computation):
    found = set()
    for _, opcode, called in computations.get(computation, ()):
      found.add(opcode)
      if opcode == "fusion" and called:
        found |= opcodes(called)
    return found

  categories = {}
  for instructions in computations.values():
    for name, opcode, called in instructions:
      if opcode in CONTROL_FLOW:
        continue
      ops = opcodes(called) if opcode == "fusion" else {opcode}
      categories[name] = next((category for category, members in CATEGORIES if ops & members),
                              "elementwise")
  return categories


def breakdown(compiled, *args, steps: int = 2) -> dict[str, float]:
  """Seconds per step by category (summed over threads) of `compiled(*args)`, a
  `jax.stages.Compiled`, from a profiler trace of `steps` runs after one untraced run."""
  categories = op_categories(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        jax.block_until_ready(compiled(*args))
    profile = jax.profiler.ProfileData.from_file(
        glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
  seconds = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in categories:
          seconds[categories[event.name]] += event.duration_ns / 1e9 / steps
  return dict(seconds.most_common())

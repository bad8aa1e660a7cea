"""Peak memory of the converters on a synthetic checkpoint with real InternVL tensor shapes.

  python tools/benchmark.py convert [--model intern_vit|internvl] [--layers 5] [--text-layers 4]

Writes a random official-layout checkpoint: InternViT-6B layers (width 3200, MLP 12800: 492 MB
of float32 per layer) or InternVL-14B (those, plus QLLaMA layers of LLaMA-7B shapes with
cross-attention, and its 49954 x 4096 embedding and LM head) with fewer layers. Then runs each
converter in a fresh process and reads its peak resident memory (getrusage), next to that of a
process that only imports the same modules. The bound to meet is the baseline plus 1.5 times
the largest single tensor, whatever the size of the checkpoint.
"""

import argparse
import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np

from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.convert import formats, keymap
from internvl_jax.convert.pytorch import export_pytorch

TOOLS = os.path.dirname(os.path.abspath(__file__))
_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - start, code)
"""


def peak_rss(command: list[str]) -> tuple[int, float]:
  """Peak RSS in bytes and wall time of a command run in a fresh process tree."""
  out = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
  rss, seconds, code = out.stdout.split()
  if int(code):
    raise RuntimeError(f"{command} failed with exit status {code}")
  return int(rss), float(seconds)


def main(argv):
  parser = argparse.ArgumentParser(prog="benchmark.py convert")
  parser.add_argument("--model", default="intern_vit", choices=("intern_vit", "internvl"))
  parser.add_argument("--layers", type=int, default=5, help="InternViT layers")
  parser.add_argument("--text-layers", type=int, default=4, help="QLLaMA layers (internvl)")
  parser.add_argument("--workdir", default="/tmp/internvl_convert_bench")
  args = parser.parse_args(argv)
  shutil.rmtree(args.workdir, ignore_errors=True)
  src, orbax, back = (os.path.join(args.workdir, name) for name in ("torch", "orbax", "back"))

  config = vision_preset("6b-224", num_layers=args.layers)
  if args.model == "internvl":
    config = internvl_preset("14b-224", vision=config,
                             text=llama_preset("llama-7b", num_layers=args.text_layers))
  kind = formats.model_kind(config)
  abstract = kind.abstract_params(config)
  rng = np.random.default_rng(0)
  random_block = lambda path, index: rng.standard_normal(
      keymap.index_shape(keymap.flatten(abstract)[path].shape, index), np.float32)
  export_pytorch(config, random_block, src, layout="official")
  tensors = keymap.plan(formats.find(kind.name, "official").layout(config), abstract)
  largest = max(int(np.prod(t.torch_shape)) * 4 for t in tensors)
  total = sum(int(np.prod(t.torch_shape)) * 4 for t in tensors)
  print(f"synthetic official-layout {args.model} checkpoint, InternViT-6B shapes with {args.layers} "
        f"layers" + (f", QLLaMA (LLaMA-7B) shapes with {args.text_layers} layers"
                     if args.model == "internvl" else "") +
        f": {total / 2**30:.2f} GiB float32, largest tensor {largest / 2**20:.0f} MiB")

  baseline, _ = peak_rss([sys.executable, "-c", "import jax, internvl_jax.convert.pytorch; jax.devices()"])
  runs = {
      "convert_from_pytorch (torch -> orbax)":
          [sys.executable, os.path.join(TOOLS, "convert_from_pytorch.py"), "--src", src, "--out", orbax],
      "convert_to_pytorch (orbax -> official)":
          [sys.executable, os.path.join(TOOLS, "convert_to_pytorch.py"), "--checkpoint", orbax,
           "--out", back, "--format", "official"],
  }
  bound = baseline + 1.5 * largest
  print(f"{'command':<42}{'peak RSS MiB':>14}{'over baseline':>15}{'seconds':>9}  within bound")
  print(f"{'baseline (imports only)':<42}{baseline / 2**20:>14.0f}{0:>15.0f}{'':>9}")
  for name, command in runs.items():
    rss, seconds = peak_rss(command)
    print(f"{name:<42}{rss / 2**20:>14.0f}{(rss - baseline) / 2**20:>15.0f}{seconds:>9.1f}  "
          f"{'yes' if rss <= bound else 'NO'} (bound {bound / 2**20:.0f} MiB)")
  names = sorted(name for name in os.listdir(src) if name.endswith(".safetensors"))
  same = names == sorted(name for name in os.listdir(back) if name.endswith(".safetensors")) and all(
      filecmp.cmp(os.path.join(src, name), os.path.join(back, name), shallow=False) for name in names)
  print(f"round trip torch -> orbax -> torch byte-identical ({len(names)} files): {same}")
  shutil.rmtree(args.workdir, ignore_errors=True)

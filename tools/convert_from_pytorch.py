"""Converts a PyTorch InternViT checkpoint directory into an Orbax checkpoint internvl_jax loads.

  python tools/convert_from_pytorch.py --src DIR --out DIR [--allow-missing]

The layout (OpenGVLab `InternVisionModel` or transformers `InternVLVisionModel`) is detected from
config.json; weights may be safetensors or .bin/.pth (loaded with weights_only=True).
"""

import argparse
import sys
import time

import jax

from internvl_jax.convert.cli import cli_errors
from internvl_jax.pretrained import load_pretrained


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="PyTorch checkpoint directory (config.json + weights)")
  parser.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  parser.add_argument("--allow-missing", action="store_true",
                      help="initialize params whose keys are missing instead of failing")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  with cli_errors():
    model = load_pretrained(args.src, allow_missing=args.allow_missing)
    model.save(args.out)
  num_params = sum(x.size for x in jax.tree.leaves(model.params))
  print(f"Converted {args.src} -> {args.out} (Orbax): InternViT with {model.config.num_layers} "
        f"layers, width {model.config.hidden_size}, {num_params:,} params, "
        f"{time.perf_counter() - start:.1f}s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

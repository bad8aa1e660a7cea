"""Converts a PyTorch checkpoint directory into an Orbax checkpoint internvl_jax loads.

  python tools/convert_from_pytorch.py --src DIR --out DIR [--allow-missing]

The model and layout are detected from config.json's architectures: InternViT as OpenGVLab's
`InternVisionModel` or transformers' `InternVLVisionModel`, InternVL-14B as OpenGVLab's
`InternVLModel`, LLaMA as transformers' `LlamaForCausalLM`. Weights weights may be safetensors or .bin/.pth (loaded with weights_only=True). Tensors
are converted block by block, so memory stays near the largest tensor, not the checkpoint.
"""

import argparse
import sys
import time

from internvl_jax.convert.cli import cli_errors
from internvl_jax.convert.pytorch import pytorch_to_orbax


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
    config = pytorch_to_orbax(args.src, args.out, allow_missing=args.allow_missing)
  print(f"Converted {args.src} -> {args.out} (Orbax), {time.perf_counter() - start:.1f}s: {config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Converts an internvl_jax checkpoint into a PyTorch checkpoint directory.

  python tools/convert_to_pytorch.py --checkpoint PATH --out DIR --format FORMAT
      [--dtype float32|bfloat16|float16] [--prefix vision_model.]

InternViT has both formats, InternVL-14B (InternVL-C/G) OpenGVLab's `InternVLModel` (official),
a LLaMA-family LLM transformers' `LlamaForCausalLM` (transformers), `Qwen2ForCausalLM` (qwen2),
`Phi3ForCausalLM` (phi3) or the official `InternLM2ForCausalLM` (internlm2).

PATH is an Orbax checkpoint written by internvl_jax, read block by block (memory stays near the
largest tensor), or a PyTorch directory (loaded whole; this converts between the two layouts).
Output: config.json plus safetensors (sharded with an index above --max-shard-gb), and the
tokenizer.model if the checkpoint has one.
"""

import argparse
import sys
import time

from internvl_jax.convert.cli import cli_errors
from internvl_jax.convert import formats, orbax_io
from internvl_jax.convert.pytorch import EXPORT_DTYPES, export_pytorch, orbax_to_pytorch
from internvl_jax.pretrained import load_pretrained


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="checkpoint to convert")
  parser.add_argument("--out", required=True, help="PyTorch directory to write")
  parser.add_argument("--format", required=True, choices=sorted({f.name for f in formats.FORMATS}),
                      help="PyTorch layout")
  parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
  parser.add_argument("--prefix", default="", help="key prefix, e.g. 'vision_model.'")
  parser.add_argument("--max-shard-gb", type=float, default=5.0)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  with cli_errors():
    options = dict(layout=args.format, dtype=args.dtype, prefix=args.prefix,
                   max_shard_bytes=int(args.max_shard_gb * 2**30))
    if orbax_io.is_checkpoint(args.checkpoint):
      _, files = orbax_to_pytorch(args.checkpoint, args.out, **options)
    else:
      model = load_pretrained(args.checkpoint)
      files = export_pytorch(model.config, model.params, args.out, **options)
  print(f"Converted {args.checkpoint} -> {args.out} ({args.format} layout, {args.dtype}): "
        f"config.json + {', '.join(files)}, {time.perf_counter() - start:.1f}s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

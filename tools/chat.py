"""Asks an InternVL-Chat checkpoint a question about an image; prints the answer as it comes.

  python tools/chat.py --checkpoint PATH --image FILE --question "..." [--max-new-tokens N]
      [--sample [--temperature T] [--top-p P] [--top-k K] [--seed S]] [--system-message TEXT]
      [--template NAME]

PATH is anything `internvl_jax.load_pretrained` reads that holds an InternVL-Chat model and its
tokenizer.model. The image is tiled as the checkpoint's config says; the prompt follows its
template and system message (--template and --system-message override them). Greedy unless
--sample.
"""

import argparse
import sys

from PIL import Image

from internvl_jax.convert.cli import cli_errors
from internvl_jax.data import templates
from internvl_jax.pretrained import load_pretrained


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="InternVL-Chat checkpoint")
  parser.add_argument("--image", required=True, help="image file")
  parser.add_argument("--question", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--system-message", default=None)
  parser.add_argument("--template", default=None, choices=sorted(templates.TEMPLATES))
  args = parser.parse_args(argv)
  with cli_errors():
    model = load_pretrained(args.checkpoint)
    image = Image.open(args.image)
    pieces = model.stream_chat(
        image, args.question, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        system_message=args.system_message, template=args.template)
    for piece in pieces:
      print(piece, end="", flush=True)
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The foundation end to end on the CPU, in seconds: a tiny InternViT, saved as an Orbax checkpoint,
converted to both PyTorch layouts, loaded back, and checked against transformers.

  python tools/demo_vit.py [--workdir runs/demo_vit] [--preset tiny] [--seed 0]
"""

import argparse
import os
import shutil

import numpy as np

from internvl_jax.config import vision_preset
from internvl_jax.convert.pytorch import export_pytorch
from internvl_jax.models.intern_vit import init_params
from internvl_jax.pretrained import Pretrained, load_pretrained


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/demo_vit")
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  shutil.rmtree(args.workdir, ignore_errors=True)

  config = vision_preset(args.preset)
  model = Pretrained(config, init_params(config, seed=args.seed))
  model.save(os.path.join(args.workdir, "orbax"))
  pixels = np.random.default_rng(args.seed).normal(
      size=(2, config.image_size, config.image_size, 3)).astype(np.float32)
  reference = np.asarray(model.vision_features(pixels))
  print(f"InternViT {args.preset}: features {reference.shape} from pixels {pixels.shape}")

  rows = [("orbax", np.abs(np.asarray(load_pretrained(os.path.join(args.workdir, "orbax"))
                                      .vision_features(pixels)) - reference).max())]
  for layout in ("official", "transformers"):
    directory = os.path.join(args.workdir, layout)
    export_pytorch(config, model.params, directory, layout=layout)
    features = np.asarray(load_pretrained(directory).vision_features(pixels))
    rows.append((f"{layout} -> jax", np.abs(features - reference).max()))

  import torch
  import transformers

  torch_model = transformers.InternVLVisionModel.from_pretrained(os.path.join(args.workdir, "transformers"))
  with torch.no_grad():
    theirs = torch_model.eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  rows.append(("transformers.InternVLVisionModel", np.abs(theirs - reference).max()))

  print(f"{'checkpoint':<36}max |features - original|")
  for name, error in rows:
    print(f"{name:<36}{error:.3g}")
  print(f"Checkpoints written under {args.workdir}/")


if __name__ == "__main__":
  main()

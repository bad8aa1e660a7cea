"""Stage 1 (spec 4.1): contrastive pre-training of InternVL-C with the CLIP loss.

  python experiments/stage1_contrastive.py                     # demo: CPU, about 3 minutes
  python experiments/stage1_contrastive.py --preset paper --init /ckpt/multilingual-llama-7b \
      --set data.tokenizer=/ckpt/multilingual-llama-7b/tokenizer.model   # on every host
  python tools/aot_plan.py --experiment experiments/stage1_contrastive.py --preset paper \
      --topology v5p:4x4x4

"demo": a tiny InternVL-C on the built-in shapes data (built on first use); evaluates zero-shot
classification of held-out colour-shape pairs and retrieval every 250 steps.
"gpu": InternViT-300M at 224 px + a TinyLlama-1.1B-shaped text tower on one GPU.
"paper": InternViT-6B (random init) + LLaMA-7B (`--init` a PyTorch LLaMA checkpoint: the paper
starts from multilingual LLaMA-7B), all 13B params trainable, AdamW (0.9, 0.95), wd 0.1, peak lr
1e-3 (image) / 1e-4 (text), 5K warm-up, cosine over 175K steps of 163,840 pairs at 196 px with
half the image tokens dropped (FLIP), uniform drop path 0.2, bfloat16 compute, on the spec's
data mixture. "paper-224": the final 0.5B samples at 224 px without dropping, from "paper".
"""

import dataclasses

from internvl_jax import sharding
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.data.config import Source
from internvl_jax.optim import OptimizerConfig
from internvl_jax.stages.contrastive import TEXT_PARAMS, VISION_PARAMS, ContrastiveStage
from internvl_jax.train import cli, inputs
from internvl_jax.train import config as train_config


def demo_config() -> train_config.ExperimentConfig:
  train = train_config.TrainConfig(
      stage=ContrastiveStage(internvl_preset("demo"), text_len=32),
      optimizer=OptimizerConfig(
          learning_rate=1e-3, lr_groups=(("vision", VISION_PARAMS, 1e-3),
                                         ("text", TEXT_PARAMS, 1e-3)),
          b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=100, total_steps=1000),
      global_batch_size=64, mesh=sharding.MeshConfig(data=-1), log_every=20,
      checkpoint_every=250)
  # Zero-shot: the 6 held-out colour-shape pairs, classified among all 36 class names. 1000 steps,
  # because a longer run fits the seen pairs' colour-shape correlation and loses held-out accuracy.
  evaluation = train_config.EvalConfig(every=250, tasks=("zero_shot", "retrieval"))
  # No random crops: the captions name where the shape is.
  return train_config.ExperimentConfig(train=train, data=train_config.DataConfig(augment=False),
                                       eval=evaluation)


def gpu_config() -> train_config.ExperimentConfig:
  """One GPU: InternViT-300M at 224 px + a TinyLlama-1.1B-shaped text tower, bfloat16."""
  model = internvl_preset(
      "14b-224",
      vision=vision_preset("300m-448", image_size=224, dtype="bfloat16", remat_policy="full"),
      text=llama_preset("tinyllama-1.1b", dtype="bfloat16", remat_policy="full"))
  train = train_config.TrainConfig(
      stage=ContrastiveStage(model, text_len=80),
      optimizer=OptimizerConfig(
          learning_rate=1e-3, lr_groups=(("vision", VISION_PARAMS, 1e-3),
                                         ("text", TEXT_PARAMS, 1e-4)),
          b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=2000, total_steps=50_000),
      global_batch_size=1024, accum_steps=4, mesh=sharding.MeshConfig(data=-1), log_every=50,
      checkpoint_every=1000)
  return train_config.ExperimentConfig(train=train, data=_PAPER_DATA)


# Spec 4.1's mixture, weighted by size (millions of pairs), as TFDS datasets written by
# tools/build_dataset.py under these names; the text tower's tokenizer comes with --set.
_PAPER_DATA = train_config.DataConfig(sources=tuple(
    Source(name, weight=millions) for name, millions in (
        ("laion_en", 1940), ("laion_coco", 550), ("coyo", 535), ("cc12m", 11.1), ("cc3m", 2.6),
        ("sbu", 1.0), ("wukong", 69.4), ("laion_multi", 1870))), worker_count=8)


def paper_config() -> train_config.ExperimentConfig:
  model = internvl_preset(
      "14b-224",
      vision=vision_preset("6b-224", dtype="bfloat16", remat_policy="full", drop_path_rate=0.2,
                           drop_path_schedule="uniform"),
      text=llama_preset("llama-7b", dtype="bfloat16", remat_policy="full"))
  train = train_config.TrainConfig(
      stage=ContrastiveStage(model, image_size=196, text_len=80, keep_fraction=0.5),
      optimizer=OptimizerConfig(
          learning_rate=1e-3, lr_groups=(("vision", VISION_PARAMS, 1e-3),
                                         ("text", TEXT_PARAMS, 1e-4)),
          b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=5000, total_steps=175_000),
      # 64 chips (v5p:4x4x4) x 256 pairs per micro-batch x 10 micro-batches = 163,840 pairs, a
      # micro-batch that tools/aot_plan.py plans well inside a v5p chip's memory.
      global_batch_size=163_840, accum_steps=10, mesh=sharding.MeshConfig(data=1, fsdp=-1),
      log_every=10, checkpoint_every=1000)
  return train_config.ExperimentConfig(train=train, data=_PAPER_DATA)


def paper_224_config() -> train_config.ExperimentConfig:
  """The paper's last 0.5B samples: 224 px without token dropping, from the 196 px run."""
  config = paper_config()
  train = config.train
  # 0.5B samples / 163,840 per step; a short warm-up from the 196 px run's weights.
  train = train.replace(stage=dataclasses.replace(train.stage, image_size=224, keep_fraction=1.0),
                        optimizer=dataclasses.replace(train.optimizer, warmup_steps=100,
                                                      total_steps=3052))
  return config.replace(train=train, init="runs/stage1_contrastive-paper")


PRESETS = {"demo": demo_config, "gpu": gpu_config, "paper": paper_config,
           "paper-224": paper_224_config}


def get_config(preset: str) -> train_config.ExperimentConfig:
  return train_config.preset(PRESETS, preset)


def data(config: train_config.ExperimentConfig):
  """This process's batches of `config.data`: the demo shapes, or the TFDS sources."""
  return inputs.pair_batches(config)


def main(argv=None):
  cli.main(__doc__, "stage1_contrastive", PRESETS, data, argv)


if __name__ == "__main__":
  main()

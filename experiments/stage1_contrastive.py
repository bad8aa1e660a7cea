"""Stage 1 (spec 4.1): contrastive pre-training of InternVL-C with the CLIP loss.

  python experiments/stage1_contrastive.py --workdir runs/stage1_demo            # demo, CPU
  python experiments/stage1_contrastive.py --preset paper --workdir /shared/runs/stage1  # every host
  python tools/aot_plan.py --experiment experiments/stage1_contrastive.py --preset paper \
      --topology v5p:4x4x4

"demo": a tiny InternVL-C on the built-in shapes data (built on first use), minutes on a CPU.
"paper": InternViT-6B (random init) + LLaMA-7B, all 13B params trainable, AdamW (0.9, 0.95), wd
0.1, peak lr 1e-3 (image) / 1e-4 (text), 5K warm-up, cosine over 175K steps of 163,840 pairs at
196 px with half the image tokens dropped (FLIP), uniform drop path 0.2, bfloat16 compute.
"""

from internvl_jax import sharding
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.data import demo
from internvl_jax.optim import OptimizerConfig
from internvl_jax.stages.contrastive import TEXT_PARAMS, VISION_PARAMS, ContrastiveStage
from internvl_jax.train import cli
from internvl_jax.train import config as train_config


def demo_config() -> train_config.TrainConfig:
  model = internvl_preset("tiny", vision=vision_preset("tiny", image_size=64),
                          text=llama_preset("tiny", vocab_size=512))
  return train_config.TrainConfig(
      stage=ContrastiveStage(model, text_len=32),
      optimizer=OptimizerConfig(
          learning_rate=1e-3, lr_groups=(("vision", VISION_PARAMS, 1e-3),
                                         ("text", TEXT_PARAMS, 1e-3)),
          b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=20, total_steps=300),
      global_batch_size=64, mesh=sharding.MeshConfig(data=-1), log_every=20,
      checkpoint_every=100)


def paper_config() -> train_config.TrainConfig:
  model = internvl_preset(
      "14b-224",
      vision=vision_preset("6b-224", dtype="bfloat16", remat_policy="full", drop_path_rate=0.2,
                           drop_path_schedule="uniform"),
      text=llama_preset("llama-7b", dtype="bfloat16", remat_policy="full"))
  return train_config.TrainConfig(
      stage=ContrastiveStage(model, image_size=196, text_len=80, keep_fraction=0.5),
      optimizer=OptimizerConfig(
          learning_rate=1e-3, lr_groups=(("vision", VISION_PARAMS, 1e-3),
                                         ("text", TEXT_PARAMS, 1e-4)),
          b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=5000, total_steps=175_000),
      # 64 chips (v5p:4x4x4) x 256 pairs per micro-batch x 10 micro-batches = 163,840 pairs;
      # 19 GB per chip planned by tools/aot_plan.py (BENCHMARKS.md).
      global_batch_size=163_840, accum_steps=10, mesh=sharding.MeshConfig(data=1, fsdp=-1),
      log_every=10, checkpoint_every=1000)


PRESETS = {"demo": demo_config, "paper": paper_config}


def get_config(preset: str) -> train_config.TrainConfig:
  return train_config.preset(PRESETS, preset)


def data(config: train_config.TrainConfig, preset: str, seed: int):
  """This process's batches: the demo shapes for "demo"; for "paper", TFDS datasets built with
  tools/build_dataset.py (LAION-en, COYO, ... in the spec's mixture) replace the demo source."""
  if preset != "demo":
    raise ValueError(f"No dataset is wired for preset {preset!r}: build the paper's sources with "
                     "tools/build_dataset.py and list them here.")
  stage = config.stage
  return demo.pair_pipeline(stage.input_size, stage.model.text.vocab_size, stage.text_len,
                            config.global_batch_size, seed)


def main(argv=None):
  cli.main(__doc__, PRESETS, data, "runs/stage1_demo", argv)


if __name__ == "__main__":
  main()

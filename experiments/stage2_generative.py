"""Stage 2 (spec 4.2): generative pre-training of InternVL-G with ITC + ITM + ITG.

  python experiments/stage2_generative.py --workdir runs/stage2_demo            # demo, CPU
  python experiments/stage2_generative.py --preset paper --workdir gs://...     # every host
  python tools/aot_plan.py --experiment experiments/stage2_generative.py --preset paper \
      --topology v5p:2x4x4

"demo": a tiny InternVL-G, randomly initialized, on the built-in shapes data (built on first
use), with in-batch ITM negatives; minutes on a CPU.
"paper": InternViT-6B + QLLaMA (LLaMA-7B), only the queries, cross-attention blocks,
`clip_projector2`, ITM head and temperature trainable (about 1B of 14B params); AdamW (0.9,
0.98), wd 0.05, peak lr 5e-5, 2K warm-up, cosine over 80K steps of 20,000 pairs at 224 px, no drop
path, bfloat16 compute. It should start from stage 1's weights (not wired here: the step inits
every param at random).
"""

from internvl_jax import sharding
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.data import demo
from internvl_jax.optim import OptimizerConfig
from internvl_jax.stages.generative import TRAINABLE_PARAMS, GenerativeStage
from internvl_jax.train import cli
from internvl_jax.train import config as train_config


def demo_config() -> train_config.TrainConfig:
  model = internvl_preset("tiny", vision=vision_preset("tiny", image_size=64),
                          text=llama_preset("tiny", vocab_size=512))
  return train_config.TrainConfig(
      stage=GenerativeStage(model, text_len=32),
      optimizer=OptimizerConfig(learning_rate=1e-3, b1=0.9, b2=0.98, weight_decay=0.05,
                                warmup_steps=20, total_steps=300, trainable=(TRAINABLE_PARAMS,)),
      global_batch_size=64, mesh=sharding.MeshConfig(data=-1), log_every=20,
      checkpoint_every=100)


def paper_config() -> train_config.TrainConfig:
  model = internvl_preset(
      "14b-224", vision=vision_preset("6b-224", dtype="bfloat16", remat_policy="full"),
      text=llama_preset("llama-7b", dtype="bfloat16", remat_policy="full"))
  return train_config.TrainConfig(
      stage=GenerativeStage(model, text_len=80),
      optimizer=OptimizerConfig(learning_rate=5e-5, b1=0.9, b2=0.98, weight_decay=0.05,
                                warmup_steps=2000, total_steps=80_000,
                                trainable=(TRAINABLE_PARAMS,)),
      # 20,000 = 2^5 x 5^4: 32 chips (v5p:2x4x4) x 25 pairs per micro-batch x 25 micro-batches;
      # 24 GB per chip planned by tools/aot_plan.py (5 micro-batches of 125: 88 GB of 95). 64
      # chips would need 4-way tensor parallelism (a 4x4x4 torus cannot make a 2-wide mesh
      # axis), which the 49,954-token vocabulary does not divide.
      global_batch_size=20_000, accum_steps=25, mesh=sharding.MeshConfig(data=1, fsdp=-1),
      log_every=10, checkpoint_every=1000)


PRESETS = {"demo": demo_config, "paper": paper_config}


def get_config(preset: str) -> train_config.TrainConfig:
  return train_config.preset(PRESETS, preset)


def data(config: train_config.TrainConfig, preset: str, seed: int):
  """This process's batches: the demo shapes for "demo"; for "paper", TFDS datasets built with
  tools/build_dataset.py (the spec's 1.03B-pair mixture) replace the demo source."""
  if preset != "demo":
    raise ValueError(f"No dataset is wired for preset {preset!r}: build the paper's sources with "
                     "tools/build_dataset.py and list them here.")
  stage = config.stage
  return demo.pair_pipeline(stage.input_size, stage.model.text.vocab_size, stage.text_len,
                            config.global_batch_size, seed, itm_negatives="batch", itg=True)


def main(argv=None):
  cli.main(__doc__, PRESETS, data, "runs/stage2_demo", argv)


if __name__ == "__main__":
  main()

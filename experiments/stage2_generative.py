"""Stage 2 (spec 4.2): generative pre-training of InternVL-G with ITC + ITM + ITG.

  python experiments/stage2_generative.py         # demo: from the stage-1 demo's workdir
  python experiments/stage2_generative.py --preset paper --init runs/stage1_contrastive-paper-224 \
      --set data.tokenizer=/ckpt/multilingual-llama-7b/tokenizer.model   # on every host
  python tools/aot_plan.py --experiment experiments/stage2_generative.py --preset paper \
      --topology v5p:2x4x4

Starts from stage 1 (`init`): InternViT, `clip_projector`, `text_projection` and the text tower
(as QLLaMA's LLaMA weights) come from there; the queries and cross-attention start new.
"demo": the demo model, warm-started from runs/stage1_contrastive, in-batch ITM negatives, the
text tower trained too and so a second ITC term on InternVL-C's image embedding (`backbone_itc`);
evaluates InternVL-G retrieval and captioning (CIDEr, BLEU-4) every 500 steps.
"paper": InternViT-6B + QLLaMA (LLaMA-7B), only the queries, cross-attention blocks,
`clip_projector2`, ITM head and temperature trainable (about 1B of 14B params); AdamW (0.9,
0.98), wd 0.05, peak lr 5e-5, 2K warm-up, cosine over 80K steps of 20,000 pairs at 224 px, no drop
path, bfloat16 compute, on the spec's data mixture.
"""

from internvl_jax import sharding
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.data.config import Source
from internvl_jax.optim import OptimizerConfig
from internvl_jax.stages.generative import TRAINABLE_PARAMS, GenerativeStage
from internvl_jax.train import cli, inputs
from internvl_jax.train import config as train_config


def demo_config() -> train_config.ExperimentConfig:
  train = train_config.TrainConfig(
      # backbone_itc: the demo trains the text tower (DEMO_LM_PARAMS), so InternVL-C's image
      # embedding, half of InternVL-G's, is kept aligned with the moving text features.
      stage=GenerativeStage(internvl_preset("demo"), text_len=32, backbone_itc=True),
      # 2000 steps, twice stage 1's, because QLLaMA learns to caption from scratch here (see
      # DEMO_LM_PARAMS) and CIDEr still rises in the last quarter.
      optimizer=OptimizerConfig(learning_rate=1e-3, b1=0.9, b2=0.98, weight_decay=0.05,
                                warmup_steps=100, total_steps=2000,
                                trainable=(TRAINABLE_PARAMS, DEMO_LM_PARAMS)),
      global_batch_size=64, mesh=sharding.MeshConfig(data=-1), log_every=20,
      checkpoint_every=500)
  evaluation = train_config.EvalConfig(every=500, tasks=("retrieval", "caption"), mode="G")
  return train_config.ExperimentConfig(train=train, data=train_config.DataConfig(augment=False),
                                       eval=evaluation, init="runs/stage1_contrastive")


# The paper's LLaMA-7B arrives as a trained language model; the demo's stage-1 text tower was
# only ever a contrastive text encoder and has no LM head. So the demo also trains QLLaMA's LM
# head and LLaMA layers (at stage 2's learning rate); the paper preset keeps them frozen.
DEMO_LM_PARAMS = r"^qllama/(lm_head|layers|norm)/"


def paper_config() -> train_config.ExperimentConfig:
  model = internvl_preset(
      "14b-224", vision=vision_preset("6b-224", dtype="bfloat16", remat_policy="full"),
      text=llama_preset("llama-7b", dtype="bfloat16", remat_policy="full"))
  train = train_config.TrainConfig(
      stage=GenerativeStage(model, text_len=80),
      optimizer=OptimizerConfig(learning_rate=5e-5, b1=0.9, b2=0.98, weight_decay=0.05,
                                warmup_steps=2000, total_steps=80_000,
                                trainable=(TRAINABLE_PARAMS,)),
      # 20,000 = 2^5 x 5^4: 32 chips (v5p:2x4x4) x 25 pairs per micro-batch x 25 micro-batches;
      # small micro-batches, because tools/aot_plan.py plans 5 of 125 too close to a v5p chip's
      # memory. 64 chips would need 4-way tensor parallelism (a 4x4x4 torus cannot make a 2-wide
      # mesh axis), which the 49,954-token vocabulary does not divide.
      global_batch_size=20_000, accum_steps=25, mesh=sharding.MeshConfig(data=1, fsdp=-1),
      log_every=10, checkpoint_every=1000)
  # Spec 4.2's 1.03B-pair mixture (millions), as TFDS datasets from tools/build_dataset.py.
  data = train_config.DataConfig(sources=tuple(
      Source(name, weight=millions) for name, millions in (
          ("laion_en", 91), ("laion_coco", 550), ("coyo", 200), ("cc12m", 11.1), ("cc3m", 2.6),
          ("sbu", 1.0), ("wukong", 69.4), ("laion_multi", 100))), worker_count=8)
  return train_config.ExperimentConfig(train=train, data=data,
                                       init="runs/stage1_contrastive-paper-224")


PRESETS = {"demo": demo_config, "paper": paper_config}


def get_config(preset: str) -> train_config.ExperimentConfig:
  return train_config.preset(PRESETS, preset)


def data(config: train_config.ExperimentConfig):
  """This process's batches of `config.data` with in-batch ITM negatives and the ITG inputs."""
  return inputs.pair_batches(config, itm_negatives="batch", itg=True)


def main(argv=None):
  cli.main(__doc__, "stage2_generative", PRESETS, data, argv, previous="python experiments/stage1_contrastive.py")


if __name__ == "__main__":
  main()

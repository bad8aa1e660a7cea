"""Fine-tuning chat models (experiments/stage3_sft.py): a tiny model of each LLM family trains on
the demo conversations in its template through the command line, a LoRA fine-tune exports as a
plain checkpoint, and a checkpoint unlike the preset's model fails by the field's name."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from internvl_jax import loading
from internvl_jax.config import LoraConfig, chat_preset
from internvl_jax.models import chat
from internvl_jax.stages.sft import ChatStage

from scripts import REPO
from train_fixtures import load_experiment

EXPERIMENT = load_experiment("stage3_sft")


def train(preset: str, workdir: str, steps: int = 6) -> list[float]:
  """The losses of each step of `preset` run through the command line."""
  EXPERIMENT.main(["--preset", preset, "--workdir", workdir, "--set", f"train.steps={steps}",
                   "--set", "train.log_every=1"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.parametrize("family", ["llama", "internlm2", "qwen2", "phi3"])
def test_each_llm_family_fine_tunes_on_the_demo_conversations(tmp_path, family):
  losses = train(f"demo-{family}", str(tmp_path))
  assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses


def test_a_lora_fine_tune_trains_and_exports_a_plain_checkpoint(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "pytorch")
  losses = train("demo-lora", workdir)
  assert losses[-1] < losses[0] - 0.3, losses
  config, merged, _ = loading.load_workdir(workdir)
  assert config.lora is None
  assert jax.tree.structure(merged) == jax.tree.structure(chat.abstract_params(config))

  convert = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "convert_to_pytorch.py"), "--checkpoint",
       workdir, "--out", out, "--format", "official"], capture_output=True, text=True, check=False)
  assert convert.returncode == 0, convert.stderr
  exported_config, exported, _ = loading.load_arrays(out)
  assert exported_config.replace(template=config.template) == config
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), exported, merged)


def test_a_checkpoint_unlike_the_presets_model_fails_by_the_field():
  model = chat_preset("tiny-v1.5")
  stage = ChatStage(model, max_len=32)
  source = model.replace(llm=model.llm.replace(rope_base=1e6))
  params = chat.init_params(model)
  with pytest.raises(ValueError, match=r"llm\.rope_base=1000000\.0, this one 10000\.0"):
    stage.warm_start(params, source, params, "/ckpt/other")
  # How the model runs may differ: the dtype, the template.
  started = stage.warm_start(params, model.replace(template="internvl2_5", llm=model.llm.replace(
      dtype="bfloat16")), jax.tree.map(np.zeros_like, params), "/ckpt/same")
  assert not any(np.any(x) for x in jax.tree.leaves(started))


def test_finetune_presets_hold_the_official_recipe():
  full = EXPERIMENT.get_config("finetune-InternVL2_5-8B")
  stage, released = full.train.stage, chat_preset("InternVL2_5-8B")
  assert (stage.max_len, stage.max_tiles, stage.template) == (8192, 6, "internvl2_5")
  assert stage.model.llm.replace(dtype="float32", remat_policy="none") == released.llm
  assert full.train.global_batch_size == 128 and stage.model.lora is None
  lora = EXPERIMENT.get_config("finetune-InternVL2_5-8B-lora").train
  assert lora.stage.model.lora == LoraConfig(llm_rank=16, alpha_per_rank=2.0, dropout=0.05)
  assert lora.global_batch_size == 16
  assert "finetune-InternVL3-8B-lora" not in EXPERIMENT.PRESETS  # no official LoRA script

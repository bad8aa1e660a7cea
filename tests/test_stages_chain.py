"""The three stages' demo presets through their real command lines, chained 1 -> 2 -> 3 by warm
starts, with an evaluation in the run, and a resumed run continuing at the right step."""

import json
import os

import jax
import numpy as np
import pytest

from internvl_jax import loading
from internvl_jax.train import report
from internvl_jax.train.metrics import METRICS_FILE

from train_fixtures import load_experiment

# A few steps of small batches; evaluation on a few examples.
QUICK = ["--set", "train.steps=2", "--set", "train.global_batch_size=8", "--set",
         "train.log_every=1", "--set", "train.checkpoint_every=1"]


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("chain")
  dirs = {stage: str(root / stage) for stage in ("stage1", "stage2", "stage3")}
  load_experiment("stage1_contrastive").main(
      ["--workdir", dirs["stage1"], *QUICK, "--set", "eval.every=2", "--set", "eval.limit=8"])
  load_experiment("stage2_generative").main(
      ["--workdir", dirs["stage2"], "--init", dirs["stage1"], *QUICK, "--set", "eval.every=None"])
  load_experiment("stage3_sft").main(
      ["--workdir", dirs["stage3"], "--init", dirs["stage2"], *QUICK, "--set", "eval.every=None"])
  return dirs


def test_each_stage_writes_checkpoints_metrics_model_and_report(chain):
  for workdir in chain.values():
    assert loading.checkpoint_steps(workdir) == [1, 2]
    assert [r["step"] for r in records(workdir) if "loss" in r] == [1, 2]
    assert os.path.isfile(os.path.join(workdir, loading.MODEL_FILE))
    assert os.path.isfile(os.path.join(workdir, report.PLOT_FILE))
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_stage1_evaluated_during_the_run(chain):
  evals = [r for r in records(chain["stage1"]) if "eval/zero_shot/top1" in r]
  assert [r["step"] for r in evals] == [2]
  assert 0 <= evals[0]["eval/zero_shot/top1"] <= 100
  assert "eval/retrieval/i2t_r1" in evals[0]


def test_each_stage_started_from_the_previous_one(chain):
  vision = lambda workdir, step=None: loading.load_workdir(workdir, step)[1]["vision_model"]
  # Stage 2 took stage 1's vision tower and froze it; stage 3 took stage 2's and froze it.
  for tree in (vision(chain["stage2"], 1), vision(chain["stage2"]), vision(chain["stage3"], 1)):
    jax.tree.map(np.testing.assert_array_equal, tree, vision(chain["stage1"]))


def test_a_longer_run_on_a_workdir_resumes_at_its_checkpoint(chain):
  workdir = chain["stage3"]
  load_experiment("stage3_sft").main(
      ["--workdir", workdir, *QUICK, "--set", "train.steps=3", "--set", "eval.every=None"])
  assert loading.checkpoint_steps(workdir) == [1, 2, 3]
  assert [r["step"] for r in records(workdir) if "loss" in r] == [1, 2, 3]


def test_a_missing_previous_stage_names_the_command_to_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no runs/stage1_contrastive here
  with pytest.raises(FileNotFoundError, match="run `python experiments/stage1_contrastive.py`"):
    load_experiment("stage2_generative").main(["--workdir", str(tmp_path / "w"), *QUICK])

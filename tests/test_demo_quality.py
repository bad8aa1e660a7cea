"""tools/demo_quality.py: the last evaluation of a run and the per-seed table."""

import json

import pytest

from tools import demo_quality


def _write_metrics(workdir, records):
  workdir.mkdir(parents=True)
  with open(workdir / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)


def test_final_eval_is_the_last_evaluation_record(tmp_path):
  _write_metrics(tmp_path / "run", [
      {"step": 10, "eval/zero_shot/top1": 40.0}, {"step": 20, "loss": 1.0},
      {"step": 20, "eval/zero_shot/top1": 80.0}, {"step": 20, "loss": 0.9}])
  assert demo_quality.final_eval(str(tmp_path / "run"))["eval/zero_shot/top1"] == 80.0
  _write_metrics(tmp_path / "no_eval", [{"step": 1, "loss": 1.0}])
  with pytest.raises(ValueError, match="no evaluation"):
    demo_quality.final_eval(str(tmp_path / "no_eval"))


def test_summary_has_every_seed_and_the_median_min_max():
  per_seed = {}
  for seed, value in ((0, 80.0), (1, 90.0), (2, 70.0)):
    per_seed[seed] = {experiment: {"metrics": {name: value for name in names}, "seconds": 60.0}
                      for experiment, names in demo_quality.STAGES}
  row = next(line for line in demo_quality.summary(per_seed).splitlines()
             if "eval/zero_shot/top1" in line)
  assert row.split()[-6:] == ["80.0", "90.0", "70.0", "80.0", "70.0", "90.0"]


"""tools/demo_quality.py: the last evaluation of a run, the per-seed table, and the caption
templates' CIDEr ceilings."""

import json

import pytest

from internvl_jax.data import demo
from internvl_jax.evaluation import caption_metrics, prompts
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


def test_caption_ceilings_score_each_template_filled_in_right_and_with_a_random_attribute():
  rows = {line[:60].strip(): line[60:].split()
          for line in demo_quality.caption_ceilings(count=60).splitlines()[1:]}
  assert len(rows) == len(demo.CAPTION_TEMPLATES)
  # "a {colour} {shape}" is the caption-the-class baseline that the caption evaluation reports.
  texts = [demo.record_text(0, "test", index) for index in range(60)]
  baseline = caption_metrics.caption_scores(
      [prompts.with_articles(f"a {t['class_name']}") for t in texts],
      [t["captions"] for t in texts])["cider"]
  assert float(rows["a {colour} {shape}"][0]) == pytest.approx(baseline, abs=0.05)
  for template, scores in rows.items():
    true, random_position, random_background = map(float, scores)
    for attribute, guessed in (("position", random_position), ("background", random_background)):
      if "{" + attribute + "}" in template:
        assert guessed < true
      else:
        assert guessed == true

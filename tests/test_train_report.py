"""WORKDIR/curves.png: which metrics each panel plots."""

import json

from PIL import Image

from internvl_jax.train import report
from internvl_jax.train.metrics import METRICS_FILE

EVAL_METRICS = (
    "eval/zero_shot/top1", "eval/zero_shot/top5", "eval/zero_shot/num_examples",
    "eval/zero_shot/num_classes", "eval/retrieval/i2t_r1", "eval/retrieval/mean_recall",
    "eval/retrieval/num_images", "eval/retrieval/num_texts", "eval/caption/cider",
    "eval/caption/bleu4", "eval/caption/baseline_cider", "eval/caption/num_examples",
    "eval/chat/exact_match", "eval/chat/num_questions",
)


def test_eval_panels_keep_percentages_apart_from_cider_and_leave_out_counts():
  assert report.eval_panels(["loss", "data/image_missing", *EVAL_METRICS]) == {
      report.PERCENT_PANEL: ["eval/caption/bleu4", "eval/chat/exact_match",
                             "eval/retrieval/i2t_r1", "eval/retrieval/mean_recall",
                             "eval/zero_shot/top1", "eval/zero_shot/top5"],
      report.CIDER_PANEL: ["eval/caption/baseline_cider", "eval/caption/cider"],
  }
  assert report.eval_panels(["eval/zero_shot/top1", "eval/zero_shot/num_examples"]) == {
      report.PERCENT_PANEL: ["eval/zero_shot/top1"]}
  assert report.eval_panels(["loss", "eval/retrieval/num_images"]) == {}


def test_plot_draws_training_then_one_panel_per_scale(tmp_path):
  records = [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0},
             {"step": 20, **{name: 50.0 for name in EVAL_METRICS}}]
  with open(tmp_path / METRICS_FILE, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  report.report(str(tmp_path), "demo")
  with Image.open(tmp_path / report.PLOT_FILE) as plot:
    assert plot.size == (3 * 600, 400)  # 6 x 4 inches per panel at 100 dpi

"""What a finished run shows: a summary table on the console and WORKDIR/curves.png, both read
from WORKDIR/metrics.jsonl (so a resumed run reports its whole history)."""

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from internvl_jax.train.metrics import METRICS_FILE

PLOT_FILE = "curves.png"
# Training metrics worth a curve; every eval/* score gets one too.
_CURVES = ("loss", "itc_loss", "itm_loss", "itg_loss", "lm_loss", "accuracy")
PERCENT_PANEL = "evaluation (%)"
CIDER_PANEL = "evaluation (CIDEr x100)"


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; a step logged twice (a run resumed from an earlier
  checkpoint) keeps its last record."""
  by_step = {}
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      record = json.loads(line)
      by_step.setdefault(record["step"], {}).update(record)
  return [by_step[step] for step in sorted(by_step)]


def series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
  points = [(r["step"], r[name]) for r in records if name in r]
  return [s for s, _ in points], [v for _, v in points]


def summary(records: list[dict]) -> str:
  """A table: the first and last value of each training curve, the last of each eval metric."""
  names = [n for n in _CURVES if any(n in r for r in records)]
  names += sorted({n for r in records for n in r if n.startswith("eval/")})
  rows = [("metric", "first", "last", "at step")]
  for name in names:
    steps, values = series(records, name)
    first = f"{values[0]:.4g}" if not name.startswith("eval/") else ""
    rows.append((name, first, f"{values[-1]:.4g}", str(steps[-1])))
  rate = [r["samples_per_second"] for r in records if "samples_per_second" in r]
  if rate:
    rows.append(("samples/s (median)", "", f"{sorted(rate)[len(rate) // 2]:.4g}", ""))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def eval_panels(names) -> dict[str, list[str]]:
  """The eval/* metrics each evaluation panel plots, by panel title (panels without metrics
  left out). Rates and percentages (0-100) share one axis; CIDEr (x100, up to ~400) gets its own
  so it does not flatten them; counts ("num_*") are not scores and are not plotted."""
  panels = {PERCENT_PANEL: [], CIDER_PANEL: []}
  for name in sorted(n for n in names if n.startswith("eval/")):
    metric = name.rsplit("/", 1)[-1]
    if metric.startswith("num_"):
      continue
    panels[CIDER_PANEL if "cider" in metric else PERCENT_PANEL].append(name)
  return {title: panel for title, panel in panels.items() if panel}


def plot(records: list[dict], path: str, title: str):
  """Loss curves on the left, then the evaluation panels of `eval_panels` (if any)."""
  panels = eval_panels({n for r in records for n in r})
  fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 * (1 + len(panels)), 4),
                           squeeze=False)
  for name in _CURVES:
    steps, values = series(records, name)
    if steps:
      axes[0, 0].plot(steps, values, label=name)
  axes[0, 0].set(xlabel="step", title="training", yscale="log")
  axes[0, 0].legend()
  for axis, (panel, names) in zip(axes[0, 1:], panels.items()):
    for name in names:
      axis.plot(*series(records, name), marker="o", label=name.removeprefix("eval/"))
    axis.set(xlabel="step", title=panel)
    axis.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(workdir: str, title: str) -> str:
  """Writes WORKDIR/curves.png and returns the summary table."""
  records = read_metrics(workdir)
  plot(records, os.path.join(workdir, PLOT_FILE), title)
  return summary(records)

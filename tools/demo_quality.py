"""The demo's measured quality over seeds: stage 1 -> 2 -> 3 chained per seed, final evaluations.

  python tools/demo_quality.py                       # seeds 0 1 2 into runs/demo-quality/
  python tools/demo_quality.py --seeds 3 --root /tmp/q

Each seed runs the three demo experiments as a user would (their command lines, each stage
warm-started from the same seed's previous stage, `--set train.seed=SEED`: initialization and
data order), then prints the final evaluation of every stage per seed with the median, min and
max, and each run's wall time. Run again, a sweep resumes each workdir from its last checkpoint
(a finished stage only re-reads its metrics), so an interrupted sweep continues where it stopped.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (experiment, the metrics that README reports); the chain's order.
STAGES = (
    ("stage1_contrastive", ("eval/zero_shot/top1", "eval/retrieval/i2t_r1",
                            "eval/retrieval/t2i_r1")),
    ("stage2_generative", ("eval/retrieval/i2t_r1", "eval/retrieval/t2i_r1", "eval/caption/cider",
                           "eval/caption/baseline_cider", "eval/caption/bleu4")),
    ("stage3_sft", ("eval/chat/exact_match",)),
)


def final_eval(workdir: str) -> dict[str, float]:
  """The last evaluation record of a run's metrics.jsonl."""
  last = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if any(name.startswith("eval/") for name in record):
        last = record
  if not last:
    raise ValueError(f"{workdir}/metrics.jsonl holds no evaluation.")
  return last


def run_chain(seed: int, root: str) -> dict[str, dict]:
  """Runs the three stages for `seed`; returns experiment -> {"metrics", "seconds"}."""
  results, previous = {}, None
  for experiment, _ in STAGES:
    workdir = os.path.join(root, f"seed{seed}", experiment)
    command = [sys.executable, os.path.join(_ROOT, "experiments", f"{experiment}.py"),
               "--workdir", workdir, "--set", f"train.seed={seed}"]
    if previous is not None:
      command += ["--init", previous]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=_ROOT)
    results[experiment] = {"metrics": final_eval(workdir),
                           "seconds": time.perf_counter() - start}
    previous = workdir
  return results


def summary(per_seed: dict[int, dict[str, dict]]) -> str:
  seeds = sorted(per_seed)
  lines = [f"{'stage':20s} {'metric':28s} " + " ".join(f"{f'seed {s}':>8s}" for s in seeds)
           + f" {'median':>8s} {'min':>8s} {'max':>8s}"]
  for experiment, names in STAGES:
    for name in (*names, "seconds"):
      values = [per_seed[s][experiment]["seconds"] if name == "seconds"
                else per_seed[s][experiment]["metrics"][name] for s in seeds]
      lines.append(f"{experiment:20s} {name:28s} " + " ".join(f"{v:8.1f}" for v in values)
                   + f" {statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
  parser.add_argument("--root", default="runs/demo-quality", help="workdirs: ROOT/seedN/STAGE")
  args = parser.parse_args(argv)
  per_seed = {seed: run_chain(seed, os.path.abspath(args.root)) for seed in range(args.seeds)}
  print(summary(per_seed))


if __name__ == "__main__":
  main()

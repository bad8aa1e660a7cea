"""tools/aot_plan.py compiles an experiment's step for devices it does not run on, and its FLOPs
(scanned layers extrapolated) agree with the analytic count."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aot_plan_reports_memory_and_flops_for_the_demo_preset():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_plan.py"), "--experiment",
       os.path.join(REPO, "experiments", "stage1_contrastive.py"), "--preset", "demo",
       "--cpu-devices", "8", "--set", "train.accum_steps=2", "--memory-gb", "1"],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "per device: 8 examples per step = 2 micro-batches of 4" in out
  assert re.search(r"memory per device: arguments .* temporaries .* total", out)
  assert "fits in 1 GB: yes" in out
  ratio = float(re.search(r"XLA / analytic = ([0-9.]+)", out).group(1))
  # XLA also counts elementwise work (norms, softmax, AdamW): some percent at this tiny width;
  # 0.2% for the paper preset (BENCHMARKS.md).
  assert 1.0 <= ratio <= 1.1, out


def test_aot_plan_names_an_unknown_override_key():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_plan.py"), "--experiment",
       os.path.join(REPO, "experiments", "stage1_contrastive.py"), "--preset", "demo",
       "--cpu-devices", "8", "--set", "train.optimizer.lr=1"],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode != 0
  assert "Unknown config key 'train.optimizer.lr'" in result.stderr

"""tools/aot_plan.py compiles an experiment's step for devices it does not run on, and its FLOPs
(every layer, counted from XLA's optimized HLO) agree with the analytic count."""

import importlib.util
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot_plan(*args):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_plan.py"), *args],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _ratio(out):
  return float(re.search(r"XLA / analytic = ([0-9.]+)", out).group(1))


def test_aot_plan_reports_memory_and_flops_for_the_demo_preset():
  out = _aot_plan("--experiment", os.path.join(REPO, "experiments", "stage1_contrastive.py"),
                  "--preset", "demo", "--cpu-devices", "8", "--set", "train.accum_steps=2",
                  "--memory-gb", "1")
  assert "per device: 8 examples per step = 2 micro-batches of 4" in out
  assert re.search(r"memory per device: arguments .* temporaries .* total", out)
  assert "fits in 1 GB: yes" in out
  # The analytic count (3 x forward) includes the patch embedding's input gradient, which XLA
  # skips (pixels need none): 2.2% of the total at this tiny width, 1e-4 for the paper preset.
  assert 0.95 <= _ratio(out) <= 1.05, out


def test_aot_plan_counts_every_layer_of_a_stage_with_frozen_towers():
  from internvl_jax.stages.generative import TRAINABLE_PARAMS  # pylint: disable=import-outside-toplevel
  # The paper's trainable set (the demo also trains the LM), which the analytic count assumes.
  out = _aot_plan("--experiment", os.path.join(REPO, "experiments", "stage2_generative.py"),
                  "--preset", "demo", "--cpu-devices", "8", "--set", "train.accum_steps=2",
                  "--set", f"train.optimizer.trainable={(TRAINABLE_PARAMS,)!r}")
  assert 0.95 <= _ratio(out) <= 1.05, out


# A loop as the TPU compiler leaves it (no trip-count annotation, `i < 7` in its condition), and a
# value XLA rematerialized (`dot.remat`), which is counted once.
_TPU_LOOP_HLO = """\
HloModule jit_f

%body (param: (s32[], f32[16,128], bf16[128,128])) -> (s32[], f32[16,128], bf16[128,128]) {
  %param = (s32[], f32[16,128], bf16[128,128]) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %x = f32[16,128]{1,0:T(8,128)} get-tuple-element(%param), index=1
  %w = bf16[128,128]{1,0} get-tuple-element(%param), index=2
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[16,128]{1,0:T(8,128)} convolution(%x, %w), dim_labels=bf_io->bf
  ROOT %out = (s32[], f32[16,128], bf16[128,128]) tuple(%next, %y, %w)
}

%cond (param.1: (s32[], f32[16,128], bf16[128,128])) -> pred[] {
  %bound = s32[] constant(7)
  %param.1 = (s32[], f32[16,128], bf16[128,128]) parameter(0)
  %counter = s32[] get-tuple-element(%param.1), index=0
  ROOT %lt = pred[] compare(%counter, %bound), direction=LT
}

ENTRY %main (a: f32[16,128], b: bf16[128,128]) -> f32[16,16] {
  %a = f32[16,128] parameter(0)
  %b = bf16[128,128] parameter(1)
  %zero = s32[] constant(0)
  %start = s32[] copy(%zero)
  %init = (s32[], f32[16,128], bf16[128,128]) tuple(%start, %a, %b)
  %loop = (s32[], f32[16,128], bf16[128,128]) while(%init), condition=%cond, body=%body
  %last = f32[16,128] get-tuple-element(%loop), index=1
  %dot.remat = f32[16,16] dot(%last, %a), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %dot = f32[16,16] dot(%last, %a), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""


def test_hlo_matmul_flops_counts_a_loop_body_per_trip_and_a_value_once():
  spec = importlib.util.spec_from_file_location("aot_plan", os.path.join(REPO, "tools", "aot_plan.py"))
  aot_plan = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(aot_plan)
  assert aot_plan.hlo_matmul_flops(_TPU_LOOP_HLO) == 7 * 2 * 16 * 128 * 128 + 2 * 16 * 16 * 128


def test_aot_plan_names_an_unknown_override_key():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_plan.py"), "--experiment",
       os.path.join(REPO, "experiments", "stage1_contrastive.py"), "--preset", "demo",
       "--cpu-devices", "8", "--set", "train.optimizer.lr=1"],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode != 0
  assert "Unknown config key 'train.optimizer.lr'" in result.stderr

"""tools/aot_plan.py compiles an experiment's step for devices it does not run on, and its FLOPs
(every layer, counted from XLA's optimized HLO) agree with the analytic count."""

import os
import re
import subprocess
import sys

import scripts
from scripts import REPO


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


def test_aot_plan_plans_a_chat_fine_tune_on_rows_of_a_set_length():
  # One row per device, as the official packed recipe, at the LLM's full length.
  out = _aot_plan("--experiment", os.path.join(REPO, "experiments", "stage3_sft.py"),
                  "--preset", "demo", "--cpu-devices", "8", "--set", "train.stage.max_len=256",
                  "--set", "train.global_batch_size=8", "--memory-gb", "1", "--no-flops")
  assert "per device: 1 examples per step = 1 micro-batches of 1" in out
  assert ("attention: vision auto, llm auto; fused kernels in the compiled step: none (XLA ops "
          "only)") in out
  assert re.search(r"memory per device: arguments .* total", out)
  assert "fits in 1 GB: yes" in out
  assert "FLOPs" not in out


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
  aot_plan = scripts.load("tools/aot_plan.py")
  assert aot_plan.hlo_matmul_flops(_TPU_LOOP_HLO) == 7 * 2 * 16 * 128 * 128 + 2 * 16 * 16 * 128


def test_aot_plan_names_an_unknown_override_key():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_plan.py"), "--experiment",
       os.path.join(REPO, "experiments", "stage1_contrastive.py"), "--preset", "demo",
       "--cpu-devices", "8", "--set", "train.optimizer.lr=1"],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode != 0
  assert "Unknown config key 'train.optimizer.lr'" in result.stderr


# Two Mosaic kernels (splash attention's, named by their instructions), a cuDNN fused attention
# and a plain fusion, as optimized HLO writes them.
_FUSED_KERNELS_HLO = """\
  %splash_mha_fwd_no_residuals.1 = (f32[128,128]{1,0}, bf16[4,512,128]{2,1,0}) custom-call(%a, %b), custom_call_target="tpu_custom_call", backend_config={}
  %splash_mha_dkv_no_residuals.3 = bf16[4,512,128]{2,1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call"
  ROOT %custom-call.2 = (bf16[2,4,512,128]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", api_version=API_VERSION_STATUS_RETURNING
  %fusion.7 = f32[4,512,512]{2,1,0} fusion(%q, %k), kind=kOutput, calls=%fused_computation.7
"""


def test_fused_kernels_names_mosaic_kernels_and_cudnn_targets():
  aot_plan = scripts.load("tools/aot_plan.py")
  assert aot_plan.fused_kernels(_FUSED_KERNELS_HLO) == [
      "__cudnn$fmhaSoftmax", "splash_mha_dkv_no_residuals", "splash_mha_fwd_no_residuals"]
  assert aot_plan.fused_kernels(_FUSED_KERNELS_HLO.splitlines()[-1]) == []

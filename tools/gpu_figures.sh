#!/usr/bin/env bash
# Issue 20's GPU figures in one run on one NVIDIA GPU, each benchmark's output also written to
# $OUT (default /tmp/gpu_figures). Needs jax with CUDA, torch and transformers, and this tree's
# imports (sentencepiece; grain and TFDS are not needed); nothing is installed.
#
#   tools/gpu_figures.sh [vit|sft|all]   # about 9 minutes for all on an H200
#   tools/gpu_figures.sh --smoke         # the same commands on tiny models on the CPU
#
# vit: InternViT-6B at 224 px, bfloat16 compute on float32 params, remat dots_saveable, the XLA
#      and the cuDNN attention timed in turns in one process; then transformers'
#      InternVLVisionModel under bfloat16 autocast in a process of its own (two 6B models with
#      float32 params and gradients do not fit one card together).
# sft: one chat SFT step on a packed row of 8,192 tokens (InternViT-300M, frozen, and
#      TinyLlama-1.1B, 24 samples of one tile), bfloat16, JAX's two attentions and transformers in
#      turns in one process.
set -uo pipefail
cd "$(dirname "$0")/.."

which=${1:-all}
vit=(vit --preset 6b-224 --dtype bfloat16 --batch 16 --remat dots_saveable --steps 5)
sft=(sft --platform gpu --dtype bfloat16 --vision-layers 24 --llm-layers 22 --row 8192
     --samples 24 --steps 5)
attention=xla,cudnn
if [[ $which == --smoke ]]; then
  which=all
  vit=(vit --preset tiny --batch 2 --steps 2 --platform cpu)
  sft=(sft --vision-layers 1 --llm-layers 1 --row 256 --samples 2 --steps 2)
  attention=xla,auto
fi

out=${OUT:-/tmp/gpu_figures}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false

bench() {  # NAME SECONDS BENCHMARK-ARGS...
  local name=$1 seconds=$2
  shift 2
  echo "== $(date -u +%H:%M:%S) python tools/benchmark.py $*" | tee "$out/$name.txt"
  timeout "$seconds" python tools/benchmark.py "$@" 2>&1 | grep -v '^[WI][0-9]' |
      tee -a "$out/$name.txt"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

python -c 'import jax; print(jax.__version__, jax.devices())' | tee "$out/devices.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/devices.txt"
fi
if [[ $which == vit || $which == all ]]; then
  bench vit_jax 270 "${vit[@]}" --attention "$attention" --libraries jax
  bench vit_transformers 120 "${vit[@]}" --libraries transformers
fi
if [[ $which == sft || $which == all ]]; then
  bench sft 180 "${sft[@]}" --attention "$attention"
fi

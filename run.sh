#!/usr/bin/env bash
# The front door. Creates (or reuses) the Python environment in .venv, then runs:
#   ./run.sh demo [ARGS]     the main job: stage 1 on the built-in demo data (ARGS: --workdir, ...)
#   ./run.sh test [ARGS]     the test suite (pytest ARGS)
#   ./run.sh python ARGS     anything else inside the environment
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP="$VENV/.installed"
EXTRAS=torch,test,tpu
want=$( (cat setup.cfg constraints.txt; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "Setting up $VENV (first use, or setup.cfg / constraints.txt / EXTRAS changed)..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # constraints.txt pins versions known to install together; torch==2.13.0 is the CPU build;
  # libtpu lets the tests compile TPU steps ahead of time on this machine (tools/aot_plan.py).
  "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]" -c constraints.txt
  echo "$want" > "$STAMP"
fi

# Large buffers in transparent huge pages: XLA:CPU allocates a step's buffers at each run, glibc
# maps the large ones afresh, and with 4 KiB pages the kernel faults in and zeroes each page.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} exec "$VENV/bin/python" experiments/stage1_contrastive.py "$@" ;;
  test) exec "$VENV/bin/python" -m pytest tests "$@" ;;
  python) exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: ./run.sh [demo|test|python ARGS]" >&2; exit 2 ;;
esac

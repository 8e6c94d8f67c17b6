#!/usr/bin/env bash
# Everything a session with a GPU should run, in one call:
#   1. build the package with its CUDA kernels (pip install --no-build-isolation -e .)
#      and check that the CUDA kernels registered;
#   2. run the whole test suite (pytest tests -ra), CUDA tests included;
#   3. run the GPU benchmark (python -m benchmarks --device cuda), if the
#      benchmarks package has an entry point.
# Logs and a summary go to $RESULTS_DIR (default benchmarks/results), named
# gpu_check-<UTC timestamp>-*.  Exit status: 0 only when the build, the CUDA
# registration check and the tests all passed (and the benchmark, when run).
#
# Environment:
#   MAX_JOBS      parallel compile jobs (default: min(nproc, 8))
#   NVCC_THREADS  nvcc --threads per job (default 2)
#   RESULTS_DIR   where the logs go
#   PYTEST_ARGS   pytest arguments (default: "tests -ra")
#   SKIP_BUILD=1 / SKIP_TESTS=1 / SKIP_BENCH=1   skip a stage
#   PYTHON        interpreter (default: the first of python3, python that imports torch)
#
# On the device tool's machine (where $OUT is set) every stage's log is written
# into $OUT while the stage runs, and the summary after each stage: a run cut
# off at the tool's 10-minute limit still brings back everything so far.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  # The GPU machines' torch is in the interpreter that `python3` names there.
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PYTHON="$c"; break; fi
  done
  PYTHON="${PYTHON:-python3}"
fi
export PYTHONUNBUFFERED=1
OUT_DIR=""
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then OUT_DIR="$OUT"; fi
RESULTS_DIR="${RESULTS_DIR:-benchmarks/results}"
mkdir -p "$RESULTS_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
PREFIX="$RESULTS_DIR/gpu_check-$STAMP"
SUMMARY="$PREFIX-summary.txt"
START_MARK="$(mktemp)"  # files newer than this were written by this run
NPROC="$(nproc 2>/dev/null || echo 4)"
export MAX_JOBS="${MAX_JOBS:-$((NPROC < 8 ? NPROC : 8))}"
export NVCC_THREADS="${NVCC_THREADS:-2}"

status=0
# The summary goes back with every stage (at most 8 files come back from $OUT:
# the summary, 4 stage logs and the benchmark's .md/.json/.png).
sync_out() { if [[ -n "$OUT_DIR" ]]; then cp "$SUMMARY" "$OUT_DIR/" 2>/dev/null || true; fi; }
note() { echo "$*" | tee -a "$SUMMARY"; sync_out; }

# Runs a stage with its output in $PREFIX-<name>.log (and on the console).
stage() {
  local name="$1"; shift
  local t0=$SECONDS rc
  echo "=== $name: $*"
  local logs=("$PREFIX-$name.log")
  if [[ -n "$OUT_DIR" ]]; then logs+=("$OUT_DIR/gpu_check-$name.log"); fi
  "$@" 2>&1 | tee "${logs[@]}"
  rc=${PIPESTATUS[0]}
  note "$name: exit $rc, $((SECONDS - t0)) s, log $PREFIX-$name.log"
  return "$rc"
}

{
  echo "gpu_check $STAMP  (git: $(git rev-parse --short HEAD 2>/dev/null || echo none))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  echo "PYTHON=$PYTHON MAX_JOBS=$MAX_JOBS NVCC_THREADS=$NVCC_THREADS"
} 2>&1 | tee "$SUMMARY"
sync_out

if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  # --no-deps: the GPU machine has no network; torch is already there.
  stage build "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . || status=1
fi

# A CPU-only build (no CUDA torch or no nvcc) would make every CUDA test skip
# and look green; fail loudly instead.
stage cuda_kernels "$PYTHON" -c "
import torch, torch_fastaccum
from torch_fastaccum import _ops
assert torch.cuda.is_available(), 'torch sees no CUDA device'
assert _ops.has_kernel_for('cuda'), 'torch_fastaccum was built without CUDA kernels'
print('CUDA kernels registered on', torch.cuda.get_device_name())
" || status=1

if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
  # shellcheck disable=SC2086
  stage pytest "$PYTHON" -m pytest ${PYTEST_ARGS:-tests -ra} --junitxml="$PREFIX-junit.xml" || status=1
fi

if [[ "${SKIP_BENCH:-0}" != "1" ]]; then
  if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('benchmarks.__main__') is None)" 2>/dev/null; then
    stage bench "$PYTHON" -m benchmarks --device cuda --out "$RESULTS_DIR" || status=1
  else
    note "bench: skipped (no benchmarks/__main__.py yet)"
  fi
fi

note "gpu_check: $([[ $status -eq 0 ]] && echo PASS || echo FAIL)"

# On the device tool's machine, what is written under $OUT comes back (at most
# 8 files): the logs and summary are there already; add the benchmark's table.
if [[ -n "$OUT_DIR" ]]; then
  find "$RESULTS_DIR" -maxdepth 1 -newer "$START_MARK" \( -name '*.md' -o -name '*.json' -o -name '*.png' \) \
    ! -name 'gpu_check-*' -exec cp {} "$OUT_DIR/" \;
fi
rm -f "$START_MARK"
exit "$status"

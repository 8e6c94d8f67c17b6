#!/usr/bin/env bash
# What a visit to a GPU machine runs: two commands, each bounded to end within
# 5 minutes of wall time. Run them verbatim, from the repository root, in this
# order, the second right after the first returns:
#
#   bash benchmarks/gpu_check.sh test
#   bash benchmarks/gpu_check.sh bench
#
# test  (ends within GPU_CHECK_LIMIT, default 290 s)
#   info          nvidia-smi, nvcc, torch, compute-sanitizer: into the summary
#   build         pip install --no-build-isolation --no-deps -v -e . with
#                 TORCH_CUDA_ARCH_LIST=9.0 (default; set it for other archs) and
#                 MAX_JOBS=$(nproc); the interpreter's bin/ first on PATH (ninja).
#                 A failed build stops the command: no tests after it.
#   cuda_kernels  torch sees a GPU and torch_fastaccum registered CUDA kernels
#                 (a CPU-only build would make every CUDA test skip and look
#                 green); a failure stops the command too.
#   pytest        the CUDA share of the suite: `pytest tests --cuda-only`
#                 (tests/conftest.py: all of tests/test_cuda.py, every test with
#                 a "cuda" device parameter, every test skipped without CUDA;
#                 the CPU-only tests are deselected, CPU CI runs them). With
#                 pytest-xdist, 8 workers (PYTEST_WORKERS=0: serial); with
#                 pytest-timeout, 60 s per test.
#   memcheck      compute-sanitizer --tool memcheck and
#   racecheck     --tool racecheck, each on three fast tests of tests/test_cuda.py
#                 (one check op, one fused SGD, one norm pass), with PYTORCH_NO_CUDA_MEMORY_CACHING=1
#                 so memcheck sees every allocation. Skipped, and said so, where
#                 there is no compute-sanitizer (PATH, $CUDA_HOME/bin,
#                 /usr/local/cuda*/bin) or it cannot attach to the GPU there
#                 (seen on gVisor machines: "Device not supported").
# bench (ends within GPU_CHECK_LIMIT, default 210 s)
#   info, cuda_kernels as above; when the kernels are missing (the machine was
#   given back between the commands and this one is fresh): build, cuda_kernels.
#   bench         python -m benchmarks --device cuda --out $RESULTS_DIR
#                 --time-budget B, B = what is left of the limit less 35 s (Python,
#                 torch and CUDA start-up, the plot), at most BENCH_BUDGET (180 s).
#                 The benchmark fits itself into B and writes down what it cut.
#
# Time limits: every stage runs under `timeout` (coreutils). A stage's limit is
# what is left of the command's limit less the budgets held back for the stages
# after it (and at most its own budget where it has a cap), so a stage that
# hangs cannot eat a later stage's budget and the command always ends in time.
#
# Budgets (s), and what each stage took on the H200 machine (16 cores, torch
# 2.11+cu130, nvcc 13.0, /opt/gcc) on 2026-11-30, the first visit
# (benchmarks/results/nvidia-h200-2026-11-30-notes.md):
#
#   test, limit 290:
#     held back for the later stages: cuda_kernels 15 + pytest 85 + memcheck 20
#     + racecheck 20 = 140; info and build share the first 150.
#     info          bounded by its own timeouts (5 s + 15 s); took ~5 s.
#     build         cap 100; took 34-41 s (16 jobs: about the slowest nvcc).
#     cuda_kernels  cap 15; took 4-5 s.
#     pytest        85 plus whatever the stages before it left (~190 s after a
#                   40 s build). ~1,150 tests: with 4 workers not done at 160 s
#                   (3 worker crashes, each restarting a worker, since fixed);
#                   with 8 workers 94% done at 125 s with one crash. Hence 8
#                   workers and smaller sanitizer budgets.
#     memcheck      20 plus what pytest left; racecheck 20. Took 7 s each.
#   bench, limit 210:
#     info (~5 s), cuda_kernels (cap 15); on a fresh machine also build (cap
#     100) and cuda_kernels again; then bench with a limit of what is left
#     less 5 s and --time-budget of that less 35 s: ~155 s when no build was
#     needed, ~75 s after a 40 s build.
#     bench         took 70 s of measurement (77 s with start-up; parity 9 s,
#                   4 speed cases 47 s of which 34 s the host-bound 10,000 x
#                   1,000 case, host time 10 s, end-to-end 1 s): the whole
#                   benchmark fits even after a build.
#
# A visit (15 minutes of machine time, start and idle waits included):
#   start ~2 min + test <= 4.8 min + turnaround <= 0.5 min (the machine stays
#   warm 30 s after a call) + bench <= 3.5 min = 10.8 min at worst, 4.2 min
#   to spare: a rerun of bench fits. Seen on 2026-11-30: start ~0.5 min, test
#   3.7 min (cut by the crashes since fixed), bench 1 min: 5.3 min held. If bench starts
#   more than 30 s after test, the machine is fresh: add ~2 min of start (bench
#   then rebuilds within its own limit), and no machine starts with under 4
#   minutes of the visit left.
#
# Output: logs and a summary in $RESULTS_DIR (default benchmarks/results), named
# gpu_check-<UTC stamp>-*. Where $OUT is a folder (the device tool's machine)
# these also go there, as each stage runs (logs) and ends (summary), so a run
# cut off still brings back everything so far. At most 8 files come back:
#   test:  gpu_check-test-summary.txt, gpu_check-{build,cuda_kernels,pytest,
#          memcheck,racecheck}.log, gpu_check-pytest-junit.xml          (7)
#   bench: gpu_check-bench-summary.txt, gpu_check-{cuda_kernels,build,bench}.log,
#          <gpu>-<date>.{json,md,png}                                   (<= 7)
# Exit status: 0 when every stage that ran passed (a sanitizer that is missing
# or cannot attach is reported, not failed); 1 otherwise; 2 on a usage error.
#
# Environment (all optional):
#   PYTHON                interpreter (default: /opt/torch/.venv/bin/python3 if it
#                         exists, else the first of python3, python with torch)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (the H200)
#   MAX_JOBS              default $(nproc)
#   NVCC_THREADS          default 1 (one arch: nothing to split)
#   RESULTS_DIR           default benchmarks/results
#   GPU_CHECK_LIMIT       the command's time limit in seconds (defaults above)
#   PYTEST_SELECTION      what pytest runs (default: "tests --cuda-only")
#   PYTEST_WORKERS        pytest-xdist workers when it is installed (default 8; 0: serial)
#   SANITIZER_TESTS       the tests run under compute-sanitizer (node ids)
#   BENCH_BUDGET          cap of the benchmark's --time-budget (default 180)
#   BENCH_ARGS            extra arguments for python -m benchmarks
#   GPU_CHECK_DRY_RUN=1   CPU rehearsal of this script (tests/test_gpu_check_script.py):
#                         no build (pip --version instead), a CPU-only build
#                         accepted, FASTACCUM_TEST_CUDA_AS=cpu and tiny pytest and
#                         benchmark selections. Never set it on the GPU machine.
set -uo pipefail

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  echo "usage: bash benchmarks/gpu_check.sh test|bench" >&2
  exit 2
}
[[ $# -eq 1 ]] || usage
CMD="$1"
case "$CMD" in test | bench) ;; *) usage ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
START=$SECONDS
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
if [[ "$CMD" == test ]]; then LIMIT="${GPU_CHECK_LIMIT:-290}"; else LIMIT="${GPU_CHECK_LIMIT:-210}"; fi
DEADLINE=$((START + LIMIT))

# --- interpreter, tools ----------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x /opt/torch/.venv/bin/python3 ]]; then
    PYTHON=/opt/torch/.venv/bin/python3  # the GPU machines' torch lives here
  else
    for c in python3 python; do
      if command -v "$c" >/dev/null 2>&1 \
        && "$c" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
        PYTHON="$c"
        break
      fi
    done
  fi
  PYTHON="${PYTHON:-python3}"
fi
# Its bin/ first on PATH: ninja (and pip's scripts) come from the same environment.
if PY_BIN="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)"; then
  export PATH="$PY_BIN:$PATH"
fi
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export NVCC_THREADS="${NVCC_THREADS:-1}"

find_sanitizer() {
  local c d
  if c="$(command -v compute-sanitizer 2>/dev/null)"; then echo "$c"; return 0; fi
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [[ -n "$d" && -x "$d/bin/compute-sanitizer" ]]; then echo "$d/bin/compute-sanitizer"; return 0; fi
  done
  while IFS= read -r c; do
    if [[ -x "$c" ]]; then echo "$c"; return 0; fi
  done < <(compgen -G '/usr/local/cuda*/bin/compute-sanitizer' | sort -rV)
  return 1
}

# --- where things go ----------------------------------------------------------------
OUT_DIR=""
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then OUT_DIR="$OUT"; fi
RESULTS_DIR="${RESULTS_DIR:-benchmarks/results}"
mkdir -p "$RESULTS_DIR" || exit 1
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
PREFIX="$RESULTS_DIR/gpu_check-$STAMP"
SUMMARY="$PREFIX-$CMD-summary.txt"
START_MARK="$(mktemp)"  # files newer than this were written by this run
trap 'rm -f "$START_MARK"' EXIT
status=0

# The summary goes to $OUT after every stage.
sync_summary() { if [[ -n "$OUT_DIR" ]]; then cp "$SUMMARY" "$OUT_DIR/gpu_check-$CMD-summary.txt" 2>/dev/null || true; fi; }
note() { echo "$*" | tee -a "$SUMMARY"; sync_summary; }
# Copies a finished file to $OUT under a name of its own (the stage logs are
# there already: stage() writes them to $OUT as they grow).
to_out() { if [[ -n "$OUT_DIR" && -f "$1" ]]; then cp "$1" "$OUT_DIR/$2" 2>/dev/null || true; fi; }

# stage NAME CAP HELD_BACK CMD...: runs CMD under `timeout` with the limit
# min(CAP, time left until the deadline - HELD_BACK), HELD_BACK being the sum of
# the budgets of the stages after this one; a stage left with under 5 s is
# skipped. Output goes to $PREFIX-NAME.log and, live, to $OUT/gpu_check-NAME.log.
# Returns CMD's exit status (124/137: killed at the limit).
stage() {
  local name="$1" cap="$2" held="$3"
  shift 3
  local limit=$((DEADLINE - SECONDS - held))
  if ((limit > cap)); then limit=$cap; fi
  local log="$PREFIX-$name.log" t0=$SECONDS rc verdict
  local logs=("$log")
  if [[ -n "$OUT_DIR" ]]; then logs+=("$OUT_DIR/gpu_check-$name.log"); fi
  if ((limit < 5)); then
    note "$name: SKIPPED: out of time (${limit} s left for it)"
    return 1
  fi
  echo "=== $name (time limit ${limit} s): $*" | tee "${logs[@]}"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "${logs[@]}"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict="PASS" ;;
    124 | 137) verdict="TIMEOUT (killed at its ${limit} s limit)" ;;
    *) verdict="FAIL (exit $rc)" ;;
  esac
  note "$name: $verdict, $((SECONDS - t0)) s, log $(basename "$log")"
  return "$rc"
}

# --- info ----------------------------------------------------------------------------
info() {
  local rev
  if rev="$(git rev-parse --short HEAD 2>/dev/null)"; then
    git diff --quiet HEAD 2>/dev/null || rev+=", uncommitted changes"
  else
    rev="none: not a git checkout"
  fi
  echo "gpu_check $CMD $STAMP (git $rev)"
  [[ "$DRY_RUN" == 1 ]] && echo "DRY RUN (GPU_CHECK_DRY_RUN=1): CPU rehearsal, no build, no GPU"
  timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2 | head -n 1; else echo "nvcc: not on PATH"; fi
  if SANITIZER="$(find_sanitizer)"; then echo "compute-sanitizer: $SANITIZER"; else echo "compute-sanitizer: none found"; fi
  timeout 15 "$PYTHON" -c "
import importlib.util as u, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPU available', torch.cuda.is_available())
print('optional:', ', '.join(m + ('' if u.find_spec(m) else ' (missing)') for m in
      ('xdist', 'pytest_timeout', 'hypothesis', 'expecttest', 'matplotlib')))" 2>&1 | tail -n 3 \
    || echo "torch: no answer within 15 s (a cold start?); the stages below will say more"
  echo "PYTHON=$PYTHON TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS NVCC_THREADS=$NVCC_THREADS"
  echo "limit ${LIMIT} s; logs: $PREFIX-*; \$OUT: ${OUT_DIR:-(none)}"
}

# --no-deps: the GPU machine has no network; torch is already there.
BUILD=("$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .)
if [[ "$DRY_RUN" == 1 ]]; then
  # The rehearsal checks the interpreter and its pip, and leaves the build alone.
  BUILD=("$PYTHON" -m pip --version)
fi

KERNEL_CHECK='
import os, torch, torch_fastaccum
from torch_fastaccum import _ops
if os.environ.get("GPU_CHECK_DRY_RUN") == "1":
    print("dry run: CUDA kernels registered:", _ops.has_kernel_for("cuda"), "(a CPU-only build is accepted)")
else:
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    assert _ops.has_kernel_for("cuda"), "torch_fastaccum was built without CUDA kernels"
    print("CUDA kernels registered on", torch.cuda.get_device_name())
'

# --- test ------------------------------------------------------------------------------
# Budgets (s). Held back for the later stages: 15 + 85 + 20 + 20 = 140 of the
# default limit of 290; info and build share the first 110. The build and the
# check are capped at their budgets; pytest and memcheck also get what the
# stages before them left unused.
B_BUILD=100 B_KERNELS=15 B_PYTEST=85 B_MEMCHECK=20 B_RACECHECK=20
NO_CAP=100000

sanitize() {  # sanitize TOOL HELD_BACK
  local tool="$1" held="$2" rc log="$PREFIX-$1.log"
  local -a tests
  read -r -a tests <<<"$SANITIZER_TESTS"
  # --error-exitcode 86: errors the sanitizer found, told apart from test failures.
  # PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own cudaMalloc, so
  # memcheck sees out-of-bounds accesses that the caching allocator would hide.
  stage "$tool" "$NO_CAP" "$held" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 86 \
    "$PYTHON" -m pytest -p no:cacheprovider -q -o addopts="" "${tests[@]}"
  rc=$?
  if ((rc == 0)); then
    note "$tool: no errors reported ($(grep -h 'ERROR SUMMARY' "$log" | tail -n 1))"
    return 0
  elif ((rc == 86)); then
    note "$tool: ERRORS FOUND ($(grep -h 'ERROR SUMMARY' "$log" | tail -n 1)); see gpu_check-$tool.log"
  elif grep -qi 'device not supported\|not supported on this' "$log"; then
    note "$tool: skipped: compute-sanitizer cannot attach to this GPU here (see its log); not counted"
    return 0
  fi
  return 1
}

run_test() {
  info 2>&1 | tee "$SUMMARY"
  sync_summary
  local held=$((B_KERNELS + B_PYTEST + B_MEMCHECK + B_RACECHECK))
  stage build "$B_BUILD" "$held" "${BUILD[@]}"
  local rc=$?
  if ((rc != 0)); then
    note "build failed: no tests run"
    return 1
  fi
  held=$((B_PYTEST + B_MEMCHECK + B_RACECHECK))
  stage cuda_kernels "$B_KERNELS" "$held" "$PYTHON" -c "$KERNEL_CHECK"
  rc=$?
  if ((rc != 0)); then
    note "no CUDA kernels: no tests run"
    return 1
  fi

  local -a sel extra=()
  read -r -a sel <<<"${PYTEST_SELECTION:-tests --cuda-only}"
  if "$PYTHON" -c "import xdist" 2>/dev/null && [[ "${PYTEST_WORKERS:-8}" != 0 ]]; then
    # loadfile: each module in one worker (module-scoped fixtures, e.g. the DDP
    # launch, run once).
    extra+=(-n "${PYTEST_WORKERS:-8}" --dist loadfile)
  fi
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout 60); fi
  held=$((B_MEMCHECK + B_RACECHECK))
  stage pytest "$NO_CAP" "$held" "$PYTHON" -m pytest -p no:cacheprovider -v -ra \
    --junitxml="$PREFIX-pytest-junit.xml" "${extra[@]}" "${sel[@]}" || status=1
  to_out "$PREFIX-pytest-junit.xml" gpu_check-pytest-junit.xml
  local result
  result="$(grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$PREFIX-pytest.log" | tail -n 1)"
  note "pytest result: ${result:-none (cut off before its summary line; see the log)}"

  if SANITIZER="$(find_sanitizer)"; then
    sanitize memcheck "$B_RACECHECK" || status=1
    sanitize racecheck 0 || status=1
  else
    note "memcheck, racecheck: skipped: no compute-sanitizer (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
  fi
  return "$status"
}

# --- bench ---------------------------------------------------------------------------
BENCH_MARGIN=35  # Python, torch and CUDA start-up, the plot: outside the benchmark's budget

run_bench() {
  info 2>&1 | tee "$SUMMARY"
  sync_summary
  stage cuda_kernels "$B_KERNELS" 0 "$PYTHON" -c "$KERNEL_CHECK"
  local rc=$?
  if ((rc != 0)); then
    note "no CUDA kernels (a fresh machine?): building them first"
    # Held back: the second check and the smallest benchmark worth running.
    stage build "$B_BUILD" "$((B_KERNELS + BENCH_MARGIN + 25))" "${BUILD[@]}"
    rc=$?
    if ((rc != 0)); then
      note "build failed: no benchmark"
      return 1
    fi
    stage cuda_kernels "$B_KERNELS" 0 "$PYTHON" -c "$KERNEL_CHECK" || {
      note "no CUDA kernels after the build: no benchmark"
      return 1
    }
  fi
  local left=$((DEADLINE - SECONDS - 5))
  local budget=$((left - BENCH_MARGIN))
  if ((budget < 20)); then
    note "bench: SKIPPED: ${left} s left, too little for a benchmark"
    return 1
  fi
  if ((budget > ${BENCH_BUDGET:-180})); then budget=${BENCH_BUDGET:-180}; fi
  local -a extra
  read -r -a extra <<<"${BENCH_ARGS:-}"
  note "bench: --time-budget $budget (of ${left} s left)"
  stage bench "$NO_CAP" 5 "$PYTHON" -m benchmarks --device cuda --out "$RESULTS_DIR" \
    --time-budget "$budget" "${extra[@]}" || status=1
  local f n=0
  while IFS= read -r f; do
    to_out "$f" "$(basename "$f")"
    note "bench wrote $f"
    n=$((n + 1))
  done < <(find "$RESULTS_DIR" -maxdepth 1 -type f -newer "$START_MARK" \
    \( -name '*.md' -o -name '*.json' -o -name '*.png' \) ! -name 'gpu_check-*' | sort)
  ((n > 0)) || { note "bench: wrote no results"; status=1; }
  return "$status"
}

if [[ "$DRY_RUN" == 1 ]]; then
  export GPU_CHECK_DRY_RUN=1 FASTACCUM_TEST_CUDA_AS=cpu
  PYTEST_SELECTION="${PYTEST_SELECTION:-tests/test_cuda.py --cuda-only -k test_check_ops_empty_list_and_errors}"
  PYTEST_WORKERS="${PYTEST_WORKERS:-0}"
  BENCH_ARGS="${BENCH_ARGS:---device cpu --quick --updates 2 --e2e-blocks 0}"
fi
SANITIZER_TESTS="${SANITIZER_TESTS:-tests/test_cuda.py::test_nonfinite_check_matches_cpu[torch.float32-basic] tests/test_cuda.py::test_fused_sgd_matches_cpu[torch.float32-sizes-m0.9-d0.0-n0-wd0.0-max0-device-write_grads] tests/test_cuda.py::test_norm_check_matches_cpu[torch.float32-l2-scale_device_factor]}"

if [[ "$CMD" == test ]]; then run_test; else run_bench; fi
status=$?
note "gpu_check $CMD: $([[ $status -eq 0 ]] && echo PASS || echo FAIL) in $((SECONDS - START)) s (limit ${LIMIT} s)"
exit "$status"

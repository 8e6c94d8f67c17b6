#!/usr/bin/env bash
# Compile-check of the CUDA sources on a machine without a GPU (and with a
# CPU-only torch): every csrc/cuda/*.cu goes through `nvcc -c` with the flags
# torch.utils.cpp_extension and setup.py would give it, for sm_80 and sm_90.
# Objects go to a temporary directory and are thrown away.
#
#   .ci/compile_cuda.sh             # all csrc/cuda/*.cu, 2 at a time
#   JOBS=4 .ci/compile_cuda.sh      # more parallel nvcc processes
#   PTXAS_VERBOSE=1 .ci/compile_cuda.sh   # print registers/spills per kernel
#   .ci/compile_cuda.sh csrc/cuda/fused_sgd_cuda.cu   # selected files
#
# nvcc is looked up in $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH, then the newest
# /usr/local/cuda*/bin. Exit status: 0 when every file compiled, 1 when one
# failed (or torch is missing); 0 with "SKIP" only when no nvcc exists at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
JOBS="${JOBS:-2}"

find_nvcc() {
  local d c
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [[ -n "$d" && -x "$d/bin/nvcc" ]]; then echo "$d/bin/nvcc"; return 0; fi
  done
  if c="$(command -v nvcc 2>/dev/null)"; then echo "$c"; return 0; fi
  for c in $(ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null | sort -rV); do
    if [[ -x "$c" ]]; then echo "$c"; return 0; fi
  done
  return 1
}

if ! NVCC="$(find_nvcc)"; then
  echo "SKIP: no nvcc found (looked in \$CUDA_HOME, \$CUDA_PATH, \$PATH and" \
       "/usr/local/cuda*/bin); CUDA sources were not compile-checked."
  exit 0
fi

# Flags that depend on the installed torch, computed by torch itself.
if ! TORCH_FLAGS="$("$PYTHON" - <<'EOF'
import torch
from torch.utils import cpp_extension as ce
flags = ["-I" + p for p in ce.include_paths()]
flags += list(ce.COMMON_NVCC_FLAGS)
flags.append("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(" ".join(flags))
EOF
)"; then
  echo "FAIL: could not import torch with '$PYTHON' to get its include paths" >&2
  exit 1
fi

# The rest mirrors setup.py's CUDAExtension (nvcc flags, define_macros) and
# what cpp_extension's BuildExtension adds on top.
# shellcheck disable=SC2206
FLAGS=(
  -c -std=c++20 -O3 -DNDEBUG -lineinfo
  --extended-lambda --expt-relaxed-constexpr
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  -DPy_LIMITED_API=0x030A0000 -DFASTACCUM_WITH_CUDA=1
  --compiler-options -fPIC
  -Werror cross-execution-space-call
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  $TORCH_FLAGS
)
if [[ "${PTXAS_VERBOSE:-0}" == "1" ]]; then FLAGS+=(-Xptxas -v); fi

if [[ $# -gt 0 ]]; then
  SOURCES=("$@")
else
  mapfile -t SOURCES < <(ls csrc/cuda/*.cu 2>/dev/null | sort)
fi
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "FAIL: no CUDA sources (csrc/cuda/*.cu) to compile" >&2
  exit 1
fi

OUT="$(mktemp -d "${TMPDIR:-/tmp}/fastaccum_nvcc.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT

echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 2 | head -n 1))"
echo "compiling ${#SOURCES[@]} file(s), $JOBS at a time, for sm_80 and sm_90"
START=$SECONDS

compile_one() {
  local src="$1" name
  name="$(basename "$src" .cu)"
  local t0=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "$src" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1; then
    echo "ok   $src ($((SECONDS - t0)) s)" >>"$OUT/$name.log"
    echo "ok" >"$OUT/$name.status"
  else
    echo "FAIL $src ($((SECONDS - t0)) s)" >>"$OUT/$name.log"
    echo "fail" >"$OUT/$name.status"
  fi
}

running=0
for src in "${SOURCES[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if [[ $running -ge $JOBS ]]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

failed=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  cat "$OUT/$name.log"
  if [[ "$(cat "$OUT/$name.status" 2>/dev/null || echo fail)" != "ok" ]]; then
    failed=$((failed + 1))
  fi
done

echo "compile_cuda: ${#SOURCES[@]} file(s), $failed failed, $((SECONDS - START)) s"
[[ $failed -eq 0 ]]

#!/usr/bin/env bash
# The wheel as a user gets it: `make wheel`, then install dist/*.whl into a
# fresh virtualenv (pip resolves its pinned torch) and run tests against the
# installed copy, from a directory where the checkout cannot shadow it.
#
#   bash .ci/wheel_check.sh               # uses the Makefile's python to build
#   TORCH_PIP_ARGS="--find-links DIR" ... # where pip finds that torch
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BASE_PYTHON="${BASE_PYTHON:-python3}"
rm -rf dist
make --no-print-directory wheel
whl=$(ls dist/torch_fastaccum-*.whl)
echo "wheel: $whl ($(du -k "$whl" | cut -f1) KB)"
case "$whl" in *manylinux*) ;; *) echo "error: $whl is not manylinux-tagged" >&2; exit 1 ;; esac
unzip -p "$whl" 'torch_fastaccum-*.dist-info/METADATA' | grep -E '^(Requires-Dist: torch|License-Expression)'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$BASE_PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
# shellcheck disable=SC2086
"$py" -m pip install -q ${TORCH_PIP_ARGS:-} "$whl" pytest hypothesis expecttest numpy
cd "$work"
"$py" - <<'PY'
import os, torch, torch_fastaccum
where = os.path.dirname(torch_fastaccum.__file__)
assert "site-packages" in where, where
print("installed torch_fastaccum from", where, "with torch", torch.__version__)
PY
"$py" -m pytest -q -p no:cacheprovider -k "not cuda" "$ROOT/tests/test_ops.py" "$ROOT/tests/test_optimizer_parity.py"

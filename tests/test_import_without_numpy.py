"""`import torch_fastaccum` where numpy is not installed.

torch runs without numpy and says so once, with a "Failed to initialize NumPy"
UserWarning. Importing this package must not add to that: no more NumPy
warning lines than `import torch` alone prints, and no more attempts to import
numpy (each one is a chance for another message: a half-installed or
ABI-mismatched numpy prints on every attempt). The package once imported
torch._dynamo at import time (through torch.compiler.assume_constant_result),
which pulls in inductor, sympy and a dozen more numpy imports.

Each import runs in a fresh interpreter where a meta-path wrapper makes
numpy look absent (`import numpy` raises ModuleNotFoundError,
importlib.util.find_spec gives None), as in an environment without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from _module_hider import hider_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs before the import under test: numpy hidden (tests/_module_hider.py),
# then a counting finder in front (it finds nothing itself).
HIDE_NUMPY = hider_source(["numpy"]) + '''
class _Count:
    lookups = 0
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            _Count.lookups += 1
        return None

sys.meta_path.insert(0, _Count())

import %s
print("numpy lookups:", _Count.lookups)
'''


def _import_without_numpy(module: str) -> tuple[list[str], int]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONSTARTUP")}
    # The work tree's package first (cwd is on sys.path for -c).
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_NUMPY % module],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"import {module} failed without numpy:\n{proc.stderr[-4000:]}"
    m = re.search(r"numpy lookups: (\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    numpy_lines = [line for line in proc.stderr.splitlines() if "numpy" in line.lower()]
    return numpy_lines, int(m.group(1))


@pytest.fixture(scope="module")
def plain_torch():
    return _import_without_numpy("torch")


def test_no_numpy_warning_beyond_torchs(plain_torch):
    torch_lines, _ = plain_torch
    ours, _ = _import_without_numpy("torch_fastaccum")
    assert len(ours) <= len(torch_lines), (
        "import torch_fastaccum printed more NumPy lines than import torch:\n"
        + "\n".join(ours) + "\n--- import torch alone:\n" + "\n".join(torch_lines)
    )


def test_no_numpy_import_attempts_beyond_torchs(plain_torch):
    _, torch_lookups = plain_torch
    _, ours = _import_without_numpy("torch_fastaccum")
    assert torch_lookups >= 1  # the counter works: torch itself tries numpy
    assert ours <= torch_lookups, (
        f"import torch_fastaccum tried to import numpy {ours} times, import torch alone "
        f"{torch_lookups}: something the package imports at import time (e.g. torch._dynamo, "
        "through torch.compiler.assume_constant_result) touches numpy"
    )

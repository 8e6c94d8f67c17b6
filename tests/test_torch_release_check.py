"""torch_fastaccum refuses a torch of another minor release than it was built
against (README, "Wheels and the torch ABI"): a 2.13 build on 2.12 imported and
then failed on every call, registered under the wrong dispatch keys."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_with_torch_version(version):
    # Another torch is simulated by patching torch.__version__ before the
    # import; the check runs before _C is loaded.
    code = (
        "import torch; torch.__version__ = %r\n"
        "import torch_fastaccum\n" % version
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _built():
    try:
        from torch_fastaccum._build_info import TORCH_VERSION
    except ImportError:
        pytest.skip("torch_fastaccum was not built by setup.py (no _build_info)")
    return TORCH_VERSION


def test_build_info_names_the_running_torch():
    assert _built() == torch.__version__


def test_another_minor_release_is_refused_before_the_extension_loads():
    major, minor = (int(x) for x in _built().split("+")[0].split(".")[:2])
    out = _import_with_torch_version(f"{major}.{minor - 1}.1")
    assert out.returncode != 0
    assert f"torch_fastaccum was built against torch {_built()}" in out.stderr
    assert "--no-build-isolation" in out.stderr


def test_another_patch_release_or_build_is_accepted():
    major, minor = (int(x) for x in _built().split("+")[0].split(".")[:2])
    for v in (f"{major}.{minor}.9", f"{major}.{minor}.0+cu130"):
        out = _import_with_torch_version(v)
        assert out.returncode == 0, out.stderr

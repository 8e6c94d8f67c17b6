"""setup.py without a visible torch says why and what to run (README,
"Building"): pip's isolated build cannot see the installed torch."""

import os
import subprocess
import sys

from _module_hider import hider_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs setup.py as pip would, with torch made unimportable.
_RUN = hider_source(["torch"]) + """
if {isolated}:
    sys.path.append("/tmp/pip-build-env-abc123/overlay/lib/python3/site-packages")
sys.argv = ["setup.py", "--name"]
import runpy
runpy.run_path("setup.py", run_name="__main__")
"""


def _run(isolated):
    return subprocess.run([sys.executable, "-c", _RUN.format(isolated=isolated)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_an_isolated_build_is_told_to_build_without_isolation():
    out = _run(isolated=True)
    assert out.returncode != 0
    assert "isolated environment, which cannot see" in out.stderr
    for cmd in ("pip install --no-build-isolation .", "pip install --no-build-isolation -e ."):
        assert cmd in out.stderr


def test_an_environment_without_torch_is_told_to_install_it_first():
    out = _run(isolated=False)
    assert out.returncode != 0
    assert "and there is none" in out.stderr and "pip install torch" in out.stderr
    assert "isolated environment" not in out.stderr

"""Which Python the Makefile uses (README, "Two commands, on a fresh machine").

The full stock-machine run (`env -i PATH=/usr/bin:/bin make test / bench` from a
clean clone) is in .ci/run; these check the choice itself in a second.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _python_chosen(env_extra=None, args=()):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "MAKEFLAGS")}
    env.update(env_extra or {})
    out = subprocess.run(["make", "-s", "-C", ROOT, "print-python", *args], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_outside_any_environment_the_project_venv_is_used():
    assert _python_chosen() == ".venv/bin/python"


def test_an_active_virtualenv_or_conda_env_is_used_as_is():
    assert _python_chosen({"VIRTUAL_ENV": "/some/venv"}) == "python"
    assert _python_chosen({"CONDA_PREFIX": "/opt/conda"}) == "python"


def test_an_explicit_python_wins():
    assert _python_chosen(args=["PYTHON=/usr/local/bin/python3.12"]) == "/usr/local/bin/python3.12"
    assert _python_chosen({"PYTHON": "py311"}) == "py311"
    assert _python_chosen(args=["VENV=/tmp/other"]) == "/tmp/other/bin/python"


@pytest.fixture
def checkout(tmp_path):
    """A copy of what the build reads, with a python that records pip calls
    instead of running them (so no test here compiles or installs)."""
    root = tmp_path / "repo"
    for name in ("Makefile", "setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), root / name if root.exists() else _mkdir(root) / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), root / "csrc")
    shutil.copytree(os.path.join(ROOT, "torch_fastaccum"), root / "torch_fastaccum",
                    ignore=shutil.ignore_patterns("__pycache__"))
    log = tmp_path / "pip.log"
    py = tmp_path / "python"
    py.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {log}; exit 0; fi
exec {sys.executable} "$@"
""")
    py.chmod(0o755)
    return root, str(py), log


def _mkdir(p):
    p.mkdir()
    return p


def _setup(root, py):
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    out = subprocess.run(["make", "-C", str(root), "setup", f"PYTHON={py}"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _pip_installs(log):
    return [line for line in log.read_text().splitlines() if "-e ." in line] if log.exists() else []


def test_the_extension_is_rebuilt_only_when_its_inputs_change(checkout):
    root, py, log = checkout
    # A first run: no stamp, so it builds (here: records the pip call).
    assert "compiling the extension" in _setup(root, py)
    assert len(_pip_installs(log)) == 1
    # Nothing changed: no build.
    assert "up to date, no source changed" in _setup(root, py)
    assert len(_pip_installs(log)) == 1
    # A kernel source changed: build again.
    stamp = root / "build" / "installed.stamp"
    old = os.stat(stamp).st_mtime
    src = next((root / "csrc").rglob("*.cpp"))
    os.utime(src, (old + 10, old + 10))
    assert "compiling the extension" in _setup(root, py)
    assert len(_pip_installs(log)) == 2
    # Another torch (or another python) than the stamp records: build again.
    stamp.write_text("torch 0.0.0 python /elsewhere\n")
    assert "compiling the extension" in _setup(root, py)
    assert len(_pip_installs(log)) == 3


@pytest.fixture
def pypi_cuda_torch(tmp_path):
    """A python whose torch looks like PyPI's CUDA build: torch.__version__
    carries a local label (2.13.0+cu130) that its distribution version
    (2.13.0, what pip compares) does not; pip calls are recorded, not run."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text('__version__ = "2.13.0+cu130"\n')
    info = site / "torch-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    log = tmp_path / "pip.log"
    py = tmp_path / "python"
    py.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {log}; exit 0; fi
PYTHONPATH={site} exec {sys.executable} "$@"
""")
    py.chmod(0o755)
    return str(py), log


def test_test_deps_keep_a_pypi_cuda_torch(pypi_cuda_torch):
    """make test installs accelerate and lightning with torch pinned to the
    installed distribution: a pin pip cannot satisfy with it (torch's
    __version__, 2.13.0+cu130) makes pip fail at once on a stock machine."""
    from pip._vendor.packaging.requirements import Requirement

    py, log = pypi_cuda_torch
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "VIRTUAL_ENV", "CONDA_PREFIX")}
    out = subprocess.run(["make", "-s", "-C", ROOT, "test-deps", f"PYTHON={py}"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and "accelerate" in calls[0] and "lightning" in calls[0], calls
    pins = [Requirement(a) for a in calls[0].split() if a.startswith("torch")]
    assert len(pins) == 1, calls
    assert pins[0].specifier.contains("2.13.0"), f"pip cannot keep the installed torch 2.13.0 with {pins[0]}"

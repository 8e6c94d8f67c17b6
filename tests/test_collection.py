"""Collecting the suite where optional packages are missing, and what
`--cuda-only` (tests/conftest.py) selects.

The GPU machines have no network: expecttest (which torch's test helpers
need), hypothesis or accelerate may be absent there. Every test module must
then skip visibly, never fail collection. One `pytest --collect-only
--cuda-only` run in a subprocess, with those packages hidden from the import
system, checks both: modules are imported before the selection deselects
anything, so a collection error shows either way."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from _module_hider import hider_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = ("expecttest", "hypothesis", "accelerate", "numpy", "torch.testing._internal.common_optimizers")

# Loaded with -p before any test module: wraps every finder on sys.meta_path so
# that the hidden modules are not found, as if not installed
# (importlib.util.find_spec gives None, `import` raises ModuleNotFoundError).
HIDER = hider_source(HIDDEN)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    d = tmp_path_factory.mktemp("hider")
    (d / "_hide_optional.py").write_text(HIDER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(d)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # Entry-point plugins (hypothesis registers one) would import what we hide
    # before -p runs; without the package they would not be there at all.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "_hide_optional", "-p", "no:cacheprovider",
         "--collect-only", "-q", "-rs", "--cuda-only", "tests"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    return proc


def _dropin_modules() -> tuple[list[str], list[str]]:
    """tests/test_dropin_*.py: (those that import the SGD option matrix, the others)."""
    tests = os.path.join(ROOT, "tests")
    names = sorted(n for n in os.listdir(tests) if n.startswith("test_dropin_") and n.endswith(".py"))
    needs = {n: "from _sgd_matrix import" in open(os.path.join(tests, n)).read() for n in names}
    return [n for n in names if needs[n]], [n for n in names if not needs[n]]


def test_collection_survives_missing_optional_packages(collected):
    out = collected.stdout
    assert collected.returncode == 0, out[-5000:]
    assert not re.search(r"\berrors?\b during collection|^ERROR ", out, re.M), out[-5000:]
    # The modules that need them say so.
    assert re.search(r"SKIPPED .*test_fuzz\.py.*hypothesis is not installed", out), out[-3000:]
    # Those driven by torch's SGD option matrix (tests/_sgd_matrix.py, from
    # torch's test helpers, which import expecttest) skip under their own
    # names; the other drop-in modules do not need it and are collected.
    matrix, other = _dropin_modules()
    assert matrix and other, (matrix, other)
    for name in matrix:
        assert re.search(rf"^SKIPPED \[1\] tests/{re.escape(name)}:\d+: .*expecttest", out, re.M), (name, out[-3000:])
    for name in other:
        assert not re.search(rf"^SKIPPED .*tests/{re.escape(name)}:", out, re.M), (name, out[-3000:])


def test_cuda_only_selection(collected):
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert ids, collected.stdout[-3000:]
    modules = {i.split("::")[0] for i in ids}
    # All of test_cuda.py, and the CUDA cases of the parity modules.
    assert sum(i.startswith("tests/test_cuda.py::") for i in ids) > 100
    for mod in ("test_optimizer_parity.py", "test_grad_scaler_parity.py", "test_state_dict.py",
                "test_ops.py", "test_api_compat.py", "test_ddp.py", "test_dropin_cuda.py"):
        assert f"tests/{mod}" in modules, sorted(modules)
    # requires_cuda tests without a device parameter are in too.
    assert "tests/test_api_compat.py::test_params_on_several_devices" in ids
    # No CPU device parametrization outside test_cuda.py (whose "cpu" parameters
    # say where a scalar lives in a CUDA test), and no CPU-only module.
    assert not [i for i in ids if re.search(r"[\[-]cpu\]$", i) and not i.startswith("tests/test_cuda.py::")]
    assert "tests/test_readme.py" not in modules and "tests/test_bitwise_parity.py" not in modules

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state (models/data use their
    own seeded generators anyway)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture
def single_thread():
    """Run tiny-model training loops on one intra-op thread: on a loaded 2-core
    machine OpenMP's barrier spinning makes small convolutions 20-50x slower with
    2 threads. (Parallel kernel paths are exercised by test_ops.py, which keeps
    the default thread count.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --cuda-only: the CUDA share of the suite, for a GPU visit with little time
# (benchmarks/gpu_check.sh test). A test is kept when any of these holds:
#   * it is in tests/test_cuda.py (every test there needs CUDA);
#   * one of its parameters (fixture parameters too) is the device "cuda",
#     e.g. the DEVICES parametrization of the parity modules;
#   * it carries a skipif mark whose reason names CUDA (requires_cuda and the
#     like): it is skipped on a machine without CUDA, so it is a CUDA test.
# Everything else runs on the CPU alone and is deselected (the CPU CI runs it).


def pytest_addoption(parser):
    parser.addoption(
        "--cuda-only",
        action="store_true",
        default=False,
        help="run only tests that use CUDA (tests/test_cuda.py, 'cuda' device parameters, "
        "tests skipped without CUDA); the CPU-only tests are deselected",
    )


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def is_cuda_test(item) -> bool:
    if item.path.name == "test_cuda.py":
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda_device(v) for v in callspec.params.values()):
        return True
    return any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--cuda-only"):
        return
    keep, drop = [], []
    for item in items:
        (keep if is_cuda_test(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

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

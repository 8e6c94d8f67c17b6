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

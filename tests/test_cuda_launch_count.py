"""The CUDA launches of one step, checked on the CPU: ``_ops.cuda_launch_count``
computes them with the C++ plan the launchers run (NOTE: [launch counts] in
csrc/launch_plan.h), and the emulator programs check that the launchers make
exactly those launches (tests/emulator/launch_modes.h). The expected numbers
here are worked out by hand from the capacities, not by calling the plan.

On a GPU, tests/test_cuda.py counts the launches a real step makes.
"""

from __future__ import annotations

import math

import pytest
import torch

import torch_fastaccum  # noqa: F401
from torch_fastaccum import _ops
from test_launch_plan import plan

CHUNK = 65536
SMALL, LARGE = 4096, 32764
# Tensors per by-value launch by depth, blocks per launch, step counters per
# step launch (NOTE: [kernel-argument budgets]).
TENSORS = {SMALL: {1: 110, 2: 64, 3: 48}, LARGE: {1: 1200, 2: 800, 3: 448}}
BLOCKS = {SMALL: 320, LARGE: 2048}
STEPS = {SMALL: 480, LARGE: 4000}


def by_value(numels, depth, arg_bytes):
    """Launches of one by-value pass over tensors that each fit in one launch's blocks."""
    live = [n for n in numels if n > 0]
    chunks = sum(-(-n // CHUNK) for n in live)
    return max(math.ceil(len(live) / TENSORS[arg_bytes][depth]), math.ceil(chunks / BLOCKS[arg_bytes]))


CASES = {
    "10000x1000": [1000] * 10_000,
    "100M_in_200": [500_000] * 200,
    "337_tensors": [((i * 7919) % 300_000) + 1 for i in range(337)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("momentum", [True, False])
def test_eager_step_is_two_launches_at_any_size(case, momentum, dtype):
    c = _ops.cuda_launch_count(CASES[case], dtype, momentum=momentum)
    assert c == {"check": 1, "norm": 1, "update": 1, "steps": 0, "step": 2, "step_with_clip": 2}


def test_over_2_31_elements():
    n = 2**31 + 5
    chunks = -(-n // CHUNK)
    assert chunks == 32769
    assert _ops.cuda_launch_count([3, n, 0], torch.float16)["step"] == 2
    for arg_bytes in (SMALL, LARGE):
        c = _ops.cuda_launch_count([n], torch.float16, captured=True, arg_bytes=arg_bytes)
        want = math.ceil(chunks / BLOCKS[arg_bytes])
        assert (c["check"], c["update"], c["steps"]) == (want, want, 1)
        assert c["norm"] == want + 1  # the finishing block
    assert {17, 103} == {
        _ops.cuda_launch_count([n], torch.float32, captured=True, arg_bytes=a)["update"]
        for a in (SMALL, LARGE)}


@pytest.mark.parametrize("arg_bytes", [SMALL, LARGE])
@pytest.mark.parametrize("case", list(CASES))
def test_captured_step_launches(case, arg_bytes):
    numels = CASES[case]
    c = _ops.cuda_launch_count(numels, torch.float32, captured=True, arg_bytes=arg_bytes)
    assert c["check"] == by_value(numels, 1, arg_bytes)
    assert c["norm"] == c["check"] + 1
    assert c["update"] == by_value(numels, 3, arg_bytes)
    assert c["steps"] == math.ceil(len(numels) / STEPS[arg_bytes])
    plain = _ops.cuda_launch_count(numels, torch.float32, momentum=False, captured=True, arg_bytes=arg_bytes)
    assert plain["update"] == by_value(numels, 2, arg_bytes) and plain["steps"] == 0


def test_the_issue_numbers():
    """10,000 x 1,000 fp32: 4 KB metadata took 91 check + 209 update + 21
    counter launches per step; 32 KB takes 9 + 23 + 3 when captured, and an
    eager step takes 2."""
    numels = CASES["10000x1000"]
    small = _ops.cuda_launch_count(numels, torch.float32, captured=True, arg_bytes=SMALL)
    large = _ops.cuda_launch_count(numels, torch.float32, captured=True, arg_bytes=LARGE)
    assert (small["check"], small["update"], small["steps"]) == (91, 209, 21)
    assert (large["check"], large["update"], large["steps"]) == (9, 23, 3)
    assert _ops.cuda_launch_count(numels, torch.float32)["step"] == 2


def test_by_value_counts_are_the_plans_launches():
    """The counts come from the plan the by-value launcher walks: the same
    number of launches as the debug op's plan, with the 32 KB capacities."""
    numels = [0, 5, 3 * CHUNK + 1, 0] + [777] * 1500 + [CHUNK * 2100, 9]
    for depth, key in ((1, "check"), (3, "update")):
        launches = plan(numels, depth, arg_bytes=LARGE)
        got = _ops.cuda_launch_count(numels, torch.float32, captured=True, arg_bytes=LARGE)[key]
        assert got == len(launches)
        assert max(len(s) for s, _ in launches) <= TENSORS[LARGE][depth]
        assert max(len(b) for _, b in launches) <= BLOCKS[LARGE]


def test_empty_lists():
    assert _ops.cuda_launch_count([], torch.float32) == {
        "check": 0, "norm": 1, "update": 0, "steps": 0, "step": 0, "step_with_clip": 1}
    # Empty tensors with momentum still get one block each: it advances their
    # step counters, as the by-value counter launch does.
    assert _ops.cuda_launch_count([0, 0], torch.float32)["update"] == 1
    assert _ops.cuda_launch_count([0, 0], torch.float32, momentum=False)["update"] == 0
    assert _ops.cuda_launch_count([0, 0], torch.float32, captured=True)["steps"] == 1


def test_bad_input():
    with pytest.raises(TypeError, match="dtype must be one of"):
        _ops.cuda_launch_count([1], torch.int32)
    with pytest.raises(ValueError, match="non-negative ints"):
        _ops.cuda_launch_count([1, -2], torch.float32)
    with pytest.raises(RuntimeError, match="arg_bytes must be 4096 or 32764"):
        _ops.cuda_launch_count([1], torch.float32, captured=True, arg_bytes=8192)


def test_table_stats_without_cuda_kernels():
    if _ops.has_kernel_for("cuda"):
        pytest.skip("this build has CUDA kernels: tests/test_cuda.py checks the cache's counters")
    assert set(_ops.cuda_table_stats().values()) == {0}

"""The CUDA launcher's chunking plan (csrc/launch_plan.h), checked on the CPU
through the debug op ``fastaccum::_launch_plan`` (csrc/launch_plan_debug.cpp).

No tensor is allocated: the plan only sees numels, so a 3e9-element tensor and
thousands of tensors cost nothing here.
"""

from __future__ import annotations

import random

import pytest
import torch

import torch_fastaccum  # noqa: F401  (registers torch.ops.fastaccum.*)

MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
MAX_BLOCKS = 320
CHUNK = 65536


def plan(numels, depth, chunk_size=0, max_blocks=0, max_tensors=0, arg_bytes=4096):
    """Decoded plan: a list of launches, each (slots [(tensor, numel)], blocks [(slot, chunk)])."""
    flat = torch.ops.fastaccum._launch_plan(list(numels), depth, chunk_size, max_blocks, max_tensors, arg_bytes)
    it = iter(flat)
    launches = []
    for _ in range(next(it)):
        slots = [(next(it), next(it)) for _ in range(next(it))]
        blocks = [(next(it), next(it)) for _ in range(next(it))]
        launches.append((slots, blocks))
    assert next(it, None) is None, "trailing data in the flat encoding"
    return launches


def reference_plan(numels, cap_tensors, cap_blocks, chunk):
    """An independent model of NOTE: [launch plan]."""
    out, slots, blocks = [], [], []
    for t, n in enumerate(numels):
        if n == 0:
            continue
        nchunks = -(-n // chunk)
        slots.append((t, n))
        for c in range(nchunks):
            blocks.append((len(slots) - 1, c))
            last = c == nchunks - 1
            if len(blocks) == cap_blocks or (len(slots) == cap_tensors and last):
                out.append((list(slots), list(blocks)))
                blocks = []
                slots = [] if last else [slots[-1]]
    if blocks:
        out.append((slots, blocks))
    return out


def check_invariants(numels, launches, cap_tensors, cap_blocks, chunk):
    seen = []  # (tensor, chunk) in traversal order
    where = {}  # tensor -> launch indices
    for li, (slots, blocks) in enumerate(launches):
        assert 1 <= len(blocks) <= cap_blocks, f"launch {li}: {len(blocks)} blocks"
        assert 1 <= len(slots) <= cap_tensors, f"launch {li}: {len(slots)} slots"
        tensors = [t for t, _ in slots]
        assert len(set(tensors)) == len(tensors), f"launch {li}: a tensor has two slots"
        used = set()
        for t, n in slots:
            assert numels[t] == n > 0, f"launch {li}: slot of tensor {t} has numel {n}"
            where.setdefault(t, []).append(li)
        for s, c in blocks:
            assert 0 <= s < len(slots)
            used.add(s)
            t, n = slots[s]
            start = c * chunk  # Python ints: the int64 offset the kernel computes
            assert 0 <= start < n, f"launch {li}: chunk {c} of tensor {t} starts past its end"
            seen.append((t, c))
        assert used == set(range(len(slots))), f"launch {li}: a slot has no block"
        # Only the last launch may be partly filled (no premature flush).
        if li != len(launches) - 1:
            assert len(blocks) == cap_blocks or len(slots) == cap_tensors, f"launch {li} flushed early"
    # Every chunk of every non-empty tensor exactly once (chunks tile the
    # tensor, so every element is covered exactly once).
    expected = {(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))}
    assert len(seen) == len(set(seen)), "a chunk is processed twice"
    assert set(seen) == expected, "chunks missing or extra"
    # Traversal order: (tensor, chunk) ascending.
    assert seen == sorted(seen)
    # A tensor spans consecutive launches only, and a cut tensor is the last
    # slot of one launch and slot 0 of the next.
    for t, lis in where.items():
        assert lis == list(range(lis[0], lis[-1] + 1)), f"tensor {t} is not in consecutive launches"
        for a, b in zip(lis, lis[1:]):
            assert launches[a][0][-1][0] == t, f"cut tensor {t} is not the last slot of launch {a}"
            assert launches[b][0][0][0] == t, f"cut tensor {t} is not slot 0 of launch {b}"


def check(numels, depth):
    launches = plan(numels, depth)
    check_invariants(numels, launches, MAX_TENSORS[depth], MAX_BLOCKS, CHUNK)
    assert launches == reference_plan(numels, MAX_TENSORS[depth], MAX_BLOCKS, CHUNK)
    return launches


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_capacity_per_depth(depth):
    n = 3 * MAX_TENSORS[depth] + 7
    launches = check([1000] * n, depth)
    assert [len(s) for s, _ in launches] == [MAX_TENSORS[depth]] * 3 + [7]


LARGE_TENSORS = {1: 1200, 2: 800, 3: 448, 4: 384, 5: 320}
LARGE_BLOCKS = 2048


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_32k_capacity_per_depth(depth):
    """The 32 KB kernel-argument budget (NOTE: [kernel-argument budgets])."""
    numels = [1000] * (2 * LARGE_TENSORS[depth] + 7) + [CHUNK * 2100 + 3]
    launches = plan(numels, depth, arg_bytes=32764)
    check_invariants(numels, launches, LARGE_TENSORS[depth], LARGE_BLOCKS, CHUNK)
    assert launches == reference_plan(numels, LARGE_TENSORS[depth], LARGE_BLOCKS, CHUNK)
    assert max(len(b) for _, b in launches) == LARGE_BLOCKS


def test_unknown_budget_is_refused():
    with pytest.raises(RuntimeError, match="budget must be 4096 or 32764"):
        plan([5], 1, arg_bytes=8000)


def test_more_than_110_tensors():
    numels = [random.Random(0).randint(1, 3 * CHUNK) for _ in range(1000)]
    launches = check(numels, 1)
    assert len(launches) > 1000 // 110


def test_empty_list_and_all_empty():
    assert plan([], 1) == []
    assert plan([0, 0, 0], 3) == []


def test_empty_tensors_skipped():
    # Leading, middle and trailing empties: apex's launcher drops the queued
    # work when the last tensor is empty.
    numels = [0, 5, 0, 0, 70000, 0]
    launches = check(numels, 1)
    assert len(launches) == 1
    slots, blocks = launches[0]
    assert sorted(t for t, _ in slots) == [1, 4]
    assert len(blocks) == 1 + 2


def test_trailing_empty_after_full_launch():
    # The last non-empty tensor ends a partial launch, then only empties follow.
    numels = [CHUNK * 330] + [0] * 5
    launches = check(numels, 2)
    assert [len(b) for _, b in launches] == [320, 10]


def test_cut_tensor_is_carried():
    numels = [CHUNK * 300, CHUNK * 50 + 1]
    launches = check(numels, 1)
    (s0, b0), (s1, b1) = launches
    assert s0 == [(0, CHUNK * 300), (1, CHUNK * 50 + 1)] and len(b0) == 320
    assert s1 == [(1, CHUNK * 50 + 1)] and b1 == [(0, c) for c in range(20, 51)]


def test_tensor_ending_exactly_on_full_launch_is_not_carried():
    (s0, b0), (s1, b1) = check([CHUNK * 320, 5], 1)
    assert s0 == [(0, CHUNK * 320)] and len(b0) == 320
    assert s1 == [(1, 5)] and b1 == [(0, 0)]


def test_slots_full_waits_for_last_chunk():
    # 47 one-chunk tensors, then a 48th (slots now full at depth 3) of 5 chunks:
    # its chunks all go in the same launch before it is emitted.
    numels = [10] * 47 + [CHUNK * 5, 10]
    (s0, b0), (s1, b1) = check(numels, 3)
    assert len(s0) == 48 and len(b0) == 47 + 5
    assert s1 == [(48, 10)]


def test_huge_tensor_int64_offsets():
    n = 3_000_000_000  # > 2**31 elements; numels only, nothing is allocated
    launches = check([7, n, 3], 3)
    chunks = [c for slots, blocks in launches for s, c in blocks if slots[s][0] == 1]
    assert len(chunks) == -(-n // CHUNK) == 45777
    last = max(chunks)
    assert last * CHUNK > 2**31 and last * CHUNK < n <= (last + 1) * CHUNK


def test_tensors_and_chunks_first_to_last():
    numels = [CHUNK * 3, 100, CHUNK * 3]
    (slots, blocks), = plan(numels, 1)
    assert slots == [(0, CHUNK * 3), (1, 100), (2, CHUNK * 3)]
    assert blocks == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2)]


def test_schema():
    """The arguments plan() passes positionally; the plan has one traversal
    order, so no order flag."""
    args = [a.name for a in torch.ops.fastaccum._launch_plan.default._schema.arguments]
    assert args == ["numels", "depth", "chunk_size", "max_blocks", "max_tensors", "arg_bytes"]


@pytest.mark.parametrize("seed", range(40))
def test_random_small_capacities(seed):
    rng = random.Random(seed)
    chunk, blocks, tensors = rng.randint(1, 5), rng.randint(1, 7), rng.randint(1, 4)
    numels = [rng.choice([0, 0, 1, rng.randint(1, 40)]) for _ in range(rng.randint(0, 30))]
    got = plan(numels, 1, chunk, blocks, tensors)
    check_invariants(numels, got, tensors, blocks, chunk)
    assert got == reference_plan(numels, tensors, blocks, chunk)


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="depth"):
        plan([1], 0)
    with pytest.raises(RuntimeError, match="depth"):
        plan([1], 6)
    with pytest.raises(RuntimeError, match="negative numel"):
        plan([1, -1], 1)

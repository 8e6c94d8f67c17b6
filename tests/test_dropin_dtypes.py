"""Dtypes and memory layouts, for every SGD option set torch tests SGD with:
AccumOptimizer's steps are torch.optim.SGD's (bit for bit for float32 and
float64; within torch's default tolerances for float16 and bfloat16, whose
update ours computes in float32) through a run with steps without any grad
and a layer frozen for a while; whatever the default dtype; with mixed dtypes
in one group; and on params that are strided, channels_last, empty or 0-dim.

(Half-precision math against a float32 emulation, and longer mixed-dtype
runs: tests/test_optimizer_parity.py and tests/test_fuzz.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _dropin import (
    MATRIX_MODULE,
    MATRIX_REASON,
    Float32Shadow,
    Pair,
    assert_same,
    buffers,
    half_step_tolerance,
    net_batch,
    net_loss,
    random_grads,
    sgd,
    small_net_pair,
    values,
)
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import option_names, options  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.float16, torch.bfloat16)

# what each iteration of the trajectory does besides zero_grad() and step()
SCRIPT = ["train", "train", "no-backward", "freeze-out", "train", "unfreeze-out", "train", "train"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("option", option_names())
def test_trajectory_matches_sgd(option, dtype):
    """A training run with an iteration without backward (no grads at all)
    and a layer frozen for a while. float32/float64: SGD's run in the same
    dtype, bit for bit. float16/bfloat16: at every step, SGD's float32 step
    from our point, rounded to the half type (within one unit in the last
    place at most: float32 math, half storage)."""
    half = dtype in HALF
    ours_net, ref_net = small_net_pair(dtype=dtype, seed=41)
    ours = AccumOptimizer(ours_net.parameters(), **options(option))
    if half:
        shadow = Float32Shadow(ours_net.parameters(), options(option))
    else:
        ref = sgd(ref_net.parameters(), **options(option))
    for i, action in enumerate(SCRIPT):
        x, y = net_batch(dtype=dtype, seed=200 + i)
        for net, opt in ((ours_net, ours),) if half else ((ours_net, ours), (ref_net, ref)):
            if action in ("freeze-out", "unfreeze-out"):
                net.out.requires_grad_(action == "unfreeze-out")
            opt.zero_grad()
            if action != "no-backward":
                net_loss(net, x, y).backward()
            if half:
                shadow.step(opt)
            opt.step()
        ps = list(ours_net.parameters())
        if half:
            want_params, want_buffers = shadow.expected()
            tol = half_step_tolerance(dtype)
        else:
            ref_ps = list(ref_net.parameters())
            want_params, want_buffers, tol = values(ref_ps), buffers(ref, ref_ps), {}
        assert_same(values(ps), want_params, f"iteration {i} ({action}) params", **tol)
        assert_same(buffers(ours, ps), want_buffers, f"iteration {i} ({action}) buffers", **tol)


@pytest.mark.parametrize("default", [torch.float64, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("option", option_names())
def test_default_dtype_does_not_leak_into_the_update(option, default):
    """Under torch.set_default_dtype(float64 / float16), float32 and float64
    params still step as SGD's, and the state holds what SGD's holds, in the
    params' dtypes."""

    def make():
        return [nn.Parameter(torch.randn(6, 2, dtype=torch.float32)),
                nn.Parameter(torch.randn(5, dtype=torch.float64))]

    gen = torch.Generator().manual_seed(43)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        pair = Pair(make, options(option))
        for step in range(4):
            pair.step(random_grads(pair.params, gen))
            pair.check(f"step {step}")
        ours_state, ref_state = pair.ours.state_dict()["state"], pair.ref.state_dict()["state"]
    finally:
        torch.set_default_dtype(previous)
    assert {i: sorted(s) for i, s in ours_state.items()} == {i: sorted(s) for i, s in ref_state.items()}
    for p in pair.params:
        for v in pair.ours.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                assert v.dtype == p.dtype


@pytest.mark.parametrize("option", option_names())
def test_one_group_of_mixed_dtypes(option):
    """float64, float32, float16 and bfloat16 params in one group, 7 steps:
    float64/float32 as SGD's bit for bit, each half param step by step as
    SGD's float32 step from our point, rounded."""
    params = [nn.Parameter(torch.rand(2, 3, dtype=dt)) for dt in DTYPES]
    refs = [nn.Parameter(p.detach().clone()) for p in params[:2]]
    ours = AccumOptimizer(params, **options(option))
    ref = sgd(refs, **options(option))
    shadows = [Float32Shadow([p], options(option)) for p in params[2:]]
    gen = torch.Generator().manual_seed(47)
    for step in range(7):
        grads = random_grads(params, gen)
        for p, g in zip(params + refs, grads + grads[:2]):
            p.grad = g.clone()
        for shadow in shadows:
            shadow.step(ours)
        ours.step()
        ref.step()
        assert_same(values(params[:2]), values(refs), f"step {step} params")
        assert_same(buffers(ours, params[:2]), buffers(ref, refs), f"step {step} buffers")
        for p, shadow in zip(params[2:], shadows):
            want_p, want_b = shadow.expected()
            tol = half_step_tolerance(p.dtype)
            assert_same([p.detach()], want_p, f"step {step} {p.dtype} param", **tol)
            assert_same(buffers(ours, [p]), want_b, f"step {step} {p.dtype} buffer", **tol)


def _odd_layouts():
    return [
        nn.Parameter(torch.randn(5, 7).t()),  # transposed: dense, not contiguous
        nn.Parameter(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)),
        nn.Parameter(torch.randn(6, 4, 2)[..., 1]),  # gaps between elements
        nn.Parameter(torch.randn(3, 8)[:, ::2]),
        nn.Parameter(torch.empty(0)),
        nn.Parameter(torch.empty(3, 0)),
        nn.Parameter(torch.randn(())),
    ]


def _odd_grads(gen):
    return [
        torch.randn(7, 5, generator=gen),  # contiguous grad for a transposed param
        torch.randn(2, 3, 4, 4, generator=gen),  # contiguous grad for a channels_last param
        torch.randn(4, 6, generator=gen).t(),  # transposed grad for a gapped param
        torch.randn(3, 4, generator=gen),
        torch.empty(0),
        torch.empty(3, 0),
        torch.randn((), generator=gen),
    ]


@pytest.mark.parametrize("option", option_names())
def test_memory_layouts_match_sgd(option):
    """Each param keeps its storage and strides, and steps as SGD's."""
    pair = Pair(_odd_layouts, options(option))
    layout = [(p.data_ptr(), p.stride()) for p in pair.params]
    gen = torch.Generator().manual_seed(53)
    for step in range(4):
        pair.step(_odd_grads(gen))
        pair.check(f"step {step}")
    assert [(p.data_ptr(), p.stride()) for p in pair.params] == layout

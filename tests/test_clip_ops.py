"""The two op-level pieces of the fused clip: fastaccum::norm_check_ (the norm
pass, NOTE: [norm check] in csrc/ops.cpp) and fused_sgd_'s clip_coef, against
pure-torch references; opcheck; torch.compile of a clipped step."""

from __future__ import annotations

import math

import pytest
import torch

import torch_fastaccum  # noqa: F401
from _helpers import DEVICES

ops = torch.ops.fastaccum
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 33, 16_385, 100]


def _grads(dtype, device="cpu", seed=0, sizes=SIZES, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype).to(device) for n in sizes]


def _out(dtype, device="cpu"):
    return torch.full((), -1.0, dtype=torch.float64 if dtype is torch.float64 else torch.float32, device=device)


def _reference(grads, norm_type, mul):
    """x = g * mul rounded to the grad dtype (what .grad holds after an
    unscale), then sum x^2 / max |x| in float64."""
    xs = [(g.double() * mul).to(g.dtype).double() if mul != 1.0 else g.double() for g in grads]
    if not xs or sum(x.numel() for x in xs) == 0:
        return 0.0
    flat = torch.cat([x.flatten() for x in xs])
    return float(flat.abs().max()) if norm_type == math.inf else float(flat.square().sum())


def _inv(scale):
    return float(torch.tensor(1.0 / scale, dtype=torch.float32))  # inv_scale: float(1/double(scale))


MODES = {  # name -> (grad_scale, factor, the multiplier the kernels form)
    "plain": (None, 1.0, 1.0),
    "factor": (None, 0.25, 0.25),
    "scale_factor": (3000.0, 0.25, _inv(3000.0) * 0.25),
    "scale": (1024.0, 1.0, 1 / 1024),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_check_matches_reference(dtype, norm_type, mode, device):
    scale, factor, mul = MODES[mode]
    grads = _grads(dtype, device)
    before = [g.clone() for g in grads]
    found, out = torch.zeros((), device=device), _out(dtype, device)
    kw = dict(norm_type=norm_type, factor=factor)
    if scale is not None:
        kw["grad_scale"] = torch.tensor(scale, device=device)
    ops.norm_check_(grads, found, out, **kw)
    want = _reference([g.cpu() for g in grads], norm_type, float(torch.tensor(mul, dtype=torch.float32))
                      if dtype is not torch.float64 else mul)
    if norm_type == math.inf:
        assert out.item() == pytest.approx(want, rel=1e-7 if dtype is torch.float64 else 1e-6)
    else:
        # Squares summed in float32 lanes (float64 for float64 grads) for at
        # most 64 vectors at a time, then in float64.
        rel = 1e-12 if dtype is torch.float64 else 1e-6
        assert out.item() == pytest.approx(want, rel=rel)
    assert found.item() == 0.0
    for a, b in zip(grads, before):  # read only
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_norm_check_flags_nonfinite(norm_type, value):
    grads = _grads(torch.float32)
    grads[4][16_384] = value  # the tail of a multi-chunk tensor
    found, out = torch.zeros(()), _out(torch.float32)
    ops.norm_check_(grads, found, out, norm_type=norm_type)
    assert found.item() == 1.0
    if math.isnan(value):
        assert math.isnan(out.item())
    else:
        assert out.item() == math.inf


def test_norm_check_overflow_of_the_unscaled_value_is_flagged():
    found, out = torch.zeros(()), _out(torch.float32)
    ops.norm_check_([torch.full((4,), 3e38)], found, out, factor=4.0)
    assert found.item() == 1.0 and out.item() == math.inf


def test_norm_check_empty_list_writes_zero():
    found, out = torch.zeros(()), _out(torch.float32)
    ops.norm_check_([], found, out)
    assert out.item() == 0.0 and found.item() == 0.0


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(norm_type=1.0), "norm_type must be 2.0 or inf"),
        (dict(out=torch.zeros((), dtype=torch.float64)), "norm_out must be Float for Float grads"),
        (dict(out=torch.zeros(2)), "norm_out must have one element"),
        (dict(found=torch.zeros((), dtype=torch.float64)), "found_inf must be float32"),
    ],
)
def test_norm_check_argument_errors(args, match):
    grads = _grads(torch.float32)
    before = [g.clone() for g in grads]
    found = args.get("found", torch.zeros(()))
    out = args.get("out", torch.zeros(()))
    with pytest.raises(RuntimeError, match=match):
        ops.norm_check_(grads, found, out, norm_type=args.get("norm_type", 2.0))
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def _sgd(params, grads, clip_coef=None, write_grads=True, found_inf=None, grad_factor=0.5):
    ops.fused_sgd_(params, grads, [], [], lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
                   maximize=False, grad_factor=grad_factor, grad_scale=torch.tensor(4.0), found_inf=found_inf,
                   write_grads=write_grads, clip_coef=clip_coef)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_sgd_clip_is_a_second_rounding(dtype):
    """(g * grad_mul) * coef, each rounded, as torch's unscale then clip."""
    params, grads = _grads(dtype, seed=1), _grads(dtype, seed=2)
    coef = torch.tensor(0.3711)
    p, g = [t.clone() for t in params], [t.clone() for t in grads]
    _sgd(p, g, coef)
    c = coef.to(dtype)
    for p0, g0, p1, g1 in zip(params, grads, p, g):
        want_g = (g0 * (1 / 8)) * c  # grad_mul 1/4 * 1/2 is exact
        assert torch.equal(g1, want_g)
        assert torch.equal(p1, p0.add(want_g, alpha=-0.1))


def test_fused_sgd_clip_of_one_changes_nothing_and_writes_nothing():
    params, grads = _grads(torch.float32, seed=1), _grads(torch.float32, seed=2)
    a = ([t.clone() for t in params], [t.clone() for t in grads])
    b = ([t.clone() for t in params], [t.clone() for t in grads])
    _sgd(*a, clip_coef=torch.tensor(1.0), grad_factor=1.0)
    _sgd(*b, clip_coef=None, grad_factor=1.0)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    grads_in = _grads(torch.float32, seed=2)
    for x, y in zip(a[1], grads_in):  # grad_mul 1/4 here: unscaled, not clipped
        assert torch.equal(x, y * 0.25)


@pytest.mark.parametrize("coef", [0.25, 0.0, float("nan")])
def test_fused_sgd_skipped_step_leaves_clipped_grads(coef):
    """A skipped step leaves .grad as the reference's unscale_ + clip did."""
    params, grads = _grads(torch.float32, seed=1), _grads(torch.float32, seed=2)
    p, g = [t.clone() for t in params], [t.clone() for t in grads]
    _sgd(p, g, torch.tensor(coef), found_inf=torch.ones(()))
    for p0, g0, p1, g1 in zip(params, grads, p, g):
        assert torch.equal(p1, p0)
        torch.testing.assert_close(g1, (g0 * (1 / 8)) * coef, rtol=0, atol=0, equal_nan=True)


def test_fused_sgd_clip_coef_must_be_a_float32_scalar_on_the_cpu():
    params, grads = _grads(torch.float32, seed=1), _grads(torch.float32, seed=2)
    for bad, match in ((torch.tensor(0.5, dtype=torch.float64), "clip_coef must be float32"),
                       (torch.tensor([0.5, 0.5]), "clip_coef must have one element"),
                       (torch.tensor(0.5, device="meta"), "")):
        if bad.device.type == "meta":
            continue  # a meta tensor dispatches to the fake impl
        with pytest.raises(RuntimeError, match=match):
            _sgd(params, grads, bad)


def _opcheck(op, args, kwargs=None):
    result = torch.library.opcheck(op, args, kwargs or {})
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_norm_check(dtype, norm_type, device):
    grads = _grads(dtype, device, sizes=[0, 1, 7, 33])
    _opcheck(ops.norm_check_.default, (grads, torch.zeros((), device=device), _out(dtype, device)),
             dict(norm_type=norm_type, grad_scale=torch.tensor(8.0, device=device), factor=0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused_sgd_with_clip(device):
    params, grads = _grads(torch.float32, device, seed=1, sizes=[0, 1, 7, 33]), _grads(torch.float32, device, seed=2,
                                                                                      sizes=[0, 1, 7, 33])
    bufs = [torch.zeros_like(p) for p in params]
    steps = [torch.ones((), device=device) for _ in params]
    kw = dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
              grad_factor=0.5, grad_scale=torch.tensor(4.0, device=device), found_inf=torch.zeros((), device=device),
              write_grads=True, clip_coef=torch.tensor(0.3, device=device))
    _opcheck(ops.fused_sgd_.default, (params, grads, bufs, steps), kw)


def _clipped_step(params, grads, bufs, steps, scale, found_inf, max_norm):
    out = torch.empty((), device=found_inf.device)
    ops.norm_check_(grads, found_inf, out, norm_type=2.0, grad_scale=scale, factor=0.5)
    coef = torch.clamp(max_norm / (out.sqrt() + 1e-6), max=1.0)
    ops.fused_sgd_(params, grads, bufs, steps, lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0,
                   nesterov=True, maximize=False, grad_factor=0.5, grad_scale=scale, found_inf=found_inf,
                   write_grads=True, clip_coef=coef)
    return out


def _step_inputs(poison):
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=g) for n in (1, 7, 300)]
    grads = [torch.randn(n, generator=g) * 8 for n in (1, 7, 300)]
    if poison:
        grads[1][3] = float("inf")
    bufs = [torch.randn(n, generator=g) for n in (1, 7, 300)]
    steps = [torch.tensor(1.0) for _ in range(3)]
    return params, grads, bufs, steps, torch.tensor(4.0), torch.zeros(())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "inf"])
def test_fullgraph_compile_of_a_clipped_step_matches_eager(poison, backend):
    torch._dynamo.reset()
    eager, compiled = _step_inputs(poison), _step_inputs(poison)
    norm_e = _clipped_step(*eager, 0.5)
    norm_c = torch.compile(_clipped_step, fullgraph=True, backend=backend)(*compiled, 0.5)
    torch.testing.assert_close(norm_c, norm_e, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(eager[0] + eager[1] + eager[2] + eager[3], compiled[0] + compiled[1] + compiled[2] + compiled[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert compiled[5].item() == (1.0 if poison else 0.0)
    if not poison:
        assert norm_e.sqrt().item() > 0.5  # the clip is active

"""torch.ops.fastaccum.* against pure-torch references, plus torch.library.opcheck.

* nonfinite_check_(grads, found_inf, sumsq=None): read-only; found_inf <- 1 if any
  inf/NaN; sumsq += sum(g^2).
* unscale_check_(grads, found_inf, grad_scale, *, factor=1.0, sumsq=None): in place
  g <- g * float32(1/scale) * factor, with the same check (on the unscaled values).
* fused_sgd_(params, grads, momentum_buffers, steps, *, lr, lr_tensor=None,
  weight_decay, momentum, dampening, nesterov, maximize, grad_factor=1.0,
  grad_scale=None, found_inf=None): SGD's update; steps[i] (float32 0-dim) counts
  real updates, 0 -> b = g; a set found_inf changes nothing.

dtypes fp32/fp64/fp16/bf16; sizes 0, 1, 7, 8, 16, 33, 65537 (straddling SIMD widths
and the CPU chunk size) and a list of 130 tensors (> the 110-tensor launch limit).
"""

from __future__ import annotations

import pytest
import torch

import torch_fastaccum  # noqa: F401  (registers torch.ops.fastaccum)
from _helpers import DEVICES

ops = torch.ops.fastaccum

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 8, 16, 33, 65537]
N_MANY = 130


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(n, dtype, gen, device="cpu", scale=1.0):
    t = torch.randn(n, generator=gen) * scale
    t = t + torch.sign(t) * 0.01 * scale  # never exactly zero
    return t.to(dtype=dtype, device=device)


def _lists(sizes, dtype, seed, device="cpu", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [_randn(n, dtype, gen, device, scale) for n in sizes]


def _many_sizes(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 300, (N_MANY,), generator=gen).tolist()
    sizes[7] = 0
    sizes[50] = 17000  # crosses a 16K-element CPU chunk
    return sizes


def _scalar(v, device="cpu"):
    return torch.tensor(float(v), dtype=torch.float32, device=device)


def _ref_sumsq(grads):
    if not grads:
        return 0.0
    return sum(float((g.to(_opmath(g.dtype)).double() ** 2).sum()) for g in grads)


def _poison_positions(n):
    return sorted({0, n // 2, n - 1}) if n else []


# --------------------------------------------------------------------------
# nonfinite_check_
# --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_check_finite(dtype, size, device):
    grads = _lists([size, size + 3], dtype, seed=size, device=device)
    before = [g.clone() for g in grads]
    found = _scalar(0, device)
    sumsq = _scalar(0.5, device)
    ops.nonfinite_check_(grads, found, sumsq)
    assert found.item() == 0.0
    expected = 0.5 + _ref_sumsq(before)
    assert sumsq.item() == pytest.approx(expected, rel=2e-4)
    for g, b in zip(grads, before):
        assert torch.equal(g, b), "nonfinite_check_ must not write the grads"
    # without sumsq
    found2 = _scalar(0, device)
    ops.nonfinite_check_(grads, found2, None)
    assert found2.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("size", [s for s in SIZES if s])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_check_detects(dtype, size, bad, device):
    """One poisoned element at the start, middle or end (vector body or scalar
    tail) of the LAST tensor of the list is found."""
    val = float(bad)
    for pos in _poison_positions(size):
        grads = _lists([33, size], dtype, seed=pos, device=device)
        grads[-1][pos] = val
        before = [g.clone() for g in grads]
        found = _scalar(0, device)
        ops.nonfinite_check_(grads, found, _scalar(0, device))
        assert found.item() == 1.0, f"missed {bad} at {pos} of {size}"
        for g, b in zip(grads, before):
            assert torch.equal(g, b) or (g.isnan() == b.isnan()).all() and torch.equal(g.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_check_many_tensors(dtype):
    sizes = _many_sizes()
    grads = _lists(sizes, dtype, seed=1)
    found, sumsq = _scalar(0), _scalar(0)
    ops.nonfinite_check_(grads, found, sumsq)
    assert found.item() == 0.0
    assert sumsq.item() == pytest.approx(_ref_sumsq(grads), rel=2e-4)
    for idx in (0, 50, N_MANY - 1):  # first, the one cut across chunks, last
        grads = _lists(sizes, dtype, seed=1)
        grads[idx][-1] = float("nan")
        found = _scalar(0)
        ops.nonfinite_check_(grads, found, None)
        assert found.item() == 1.0, idx


def test_nonfinite_check_only_sets_found_inf():
    """found_inf is only ever set to 1 (the caller zeroes it): a finite pass leaves
    an already-set flag alone; an empty list is a no-op."""
    grads = _lists([10], torch.float32, seed=0)
    found = _scalar(1)
    ops.nonfinite_check_(grads, found, None)
    assert found.item() == 1.0
    found, sumsq = _scalar(0), _scalar(2.0)
    ops.nonfinite_check_([], found, sumsq)
    assert found.item() == 0.0 and sumsq.item() == 2.0


# --------------------------------------------------------------------------
# unscale_check_
# --------------------------------------------------------------------------


def _ref_unscale(g, scale, factor):
    op = _opmath(g.dtype)
    inv = float(torch.tensor(1.0 / float(scale), dtype=torch.float32))  # float32(1/double(scale))
    mul = inv * factor
    return (g.to(op) * torch.tensor(mul, dtype=op)).to(g.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale, factor", [(2.0**16, 1.0), (3.0, 0.25), (1e-3, 1 / 3)], ids=["pow2", "3-quarter", "small-third"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_check(dtype, size, scale, factor, device):
    # values scaled like a loss-scaled grad, but representable in every dtype
    grads = _lists([size, 5], dtype, seed=size + 1, device=device, scale=min(scale, 100.0))
    expected = [_ref_unscale(g.cpu(), scale, factor) for g in grads]
    found, sumsq = _scalar(0, device), _scalar(0, device)
    ops.unscale_check_(grads, found, _scalar(scale, device), factor=factor, sumsq=sumsq)
    assert found.item() == 0.0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g.cpu(), e)
    # sumsq is of the unscaled values; for half types the kernel may square the
    # float32 product before it is rounded to the stored type, which moves each
    # square by up to 2 ulp of that type
    rel = {torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}.get(dtype, 2e-4)
    assert sumsq.item() == pytest.approx(_ref_sumsq(expected), rel=rel)


@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("size", [1, 7, 33, 65537])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_check_detects(dtype, size, bad):
    for pos in _poison_positions(size):
        grads = _lists([size], dtype, seed=pos)
        grads[0][pos] = float(bad)
        found = _scalar(0)
        ops.unscale_check_(grads, found, _scalar(2.0**10), factor=0.5)
        assert found.item() == 1.0
        assert not torch.isfinite(grads[0][pos])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_check_many_tensors(dtype):
    sizes = _many_sizes(1)
    grads = _lists(sizes, dtype, seed=2, scale=64.0)
    expected = [_ref_unscale(g, 2.0**6, 0.25) for g in grads]
    found = _scalar(0)
    ops.unscale_check_(grads, found, _scalar(2.0**6), factor=0.25)
    assert found.item() == 0.0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------
# fused_sgd_
# --------------------------------------------------------------------------


def _unscaled(g, mul):
    """What the op leaves in a grad with write_grads: g * mul in opmath."""
    if mul == 1.0:
        return g.clone()
    op = _opmath(g.dtype)
    return (g.to(op) * torch.tensor(mul, dtype=op)).to(g.dtype)


def _ref_fused_sgd(params, grads, bufs, steps, *, lr, lr_tensor=None, weight_decay, momentum, dampening,
                   nesterov, maximize, grad_factor=1.0, grad_scale=None, found_inf=None, write_grads=False):
    """Pure-torch reference (opmath float32 for half types, float64 for fp64):
    params, buffers, steps and grads after the call."""
    mul = grad_factor
    if grad_scale is not None:
        mul *= float(torch.tensor(1.0 / grad_scale.item(), dtype=torch.float32))
    out_g = [_unscaled(g, mul) if write_grads else g.clone() for g in grads]
    if found_inf is not None and found_inf.item() != 0:
        return [p.clone() for p in params], [b.clone() for b in bufs], [s.clone() for s in steps], out_g
    if lr_tensor is not None:
        lr = lr_tensor.item()
    out_p, out_b, out_s = [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        op = _opmath(p.dtype)
        gg = g.to(op)
        if mul != 1.0:
            gg = gg * torch.tensor(mul, dtype=op)
        if maximize:
            gg = -gg
        pf = p.to(op)
        if weight_decay != 0:
            gg = gg + weight_decay * pf
        if momentum != 0:
            if steps[i].item() == 0:
                b = gg.clone()
            else:
                b = momentum * bufs[i].to(op) + (1 - dampening) * gg
            gg = gg + momentum * b if nesterov else b
            out_b.append(b.to(p.dtype))
            out_s.append(steps[i] + 1)
        out_p.append((pf - lr * gg).to(p.dtype))
    return out_p, out_b, out_s, out_g


SGD_CASES = {
    "plain": dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    "wd-maximize-nomomentum": dict(lr=0.1, weight_decay=1e-2, momentum=0.0, dampening=0.0, nesterov=False, maximize=True),
    "momentum-first-step": dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=False, _steps="zero"),
    "momentum-later": dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=False),
    "nesterov-maximize-mixed-first": dict(lr=0.05, weight_decay=1e-3, momentum=0.8, dampening=0.0, nesterov=True, maximize=True, _steps="mixed"),
    "scaled-factor": dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                          grad_factor=0.25, _scale=2.0**10, _found=0.0),
    "scaled-inexact": dict(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.3, nesterov=False, maximize=False,
                           grad_factor=1 / 3, _scale=3.0, _found=0.0),
    "lr-tensor": dict(lr=123.0, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=True, maximize=False, _lr_tensor=0.3),
    "skip-found-inf": dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=False,
                           _scale=2.0**10, _found=1.0),
    "skip-found-inf-first-step": dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False,
                                      maximize=False, _scale=2.0**10, _found=1.0, _steps="zero"),
}


def _sgd_inputs(case, sizes, dtype, device="cpu", seed=0):
    cfg = dict(SGD_CASES[case])
    steps_mode = cfg.pop("_steps", "later")
    scale = cfg.pop("_scale", None)
    found = cfg.pop("_found", None)
    lr_t = cfg.pop("_lr_tensor", None)
    params = _lists(sizes, dtype, seed, device)
    grad_mag = scale if scale is not None else 1.0
    grads = _lists(sizes, dtype, seed + 1, device, scale=min(grad_mag, 100.0))
    if cfg["momentum"] != 0:
        bufs = _lists(sizes, dtype, seed + 2, device, scale=0.5)
        if steps_mode == "zero":
            # never-written buffers: must not be read at all (NaN would show it)
            for b in bufs:
                b.fill_(float("nan"))
            steps = [_scalar(0, device) for _ in sizes]
        elif steps_mode == "mixed":
            steps = [_scalar(0 if i % 2 == 0 else 5, device) for i in range(len(sizes))]
            for b, s in zip(bufs, steps):
                if s.item() == 0:
                    b.fill_(float("nan"))
        else:
            steps = [_scalar(3, device) for _ in sizes]
    else:
        bufs, steps = [], []
    kwargs = dict(cfg)
    kwargs["lr_tensor"] = None if lr_t is None else _scalar(lr_t, device)
    kwargs["grad_scale"] = None if scale is None else _scalar(scale, device)
    kwargs["found_inf"] = None if found is None else _scalar(found, device)
    kwargs.setdefault("grad_factor", 1.0)
    return params, grads, bufs, steps, kwargs


def _check_sgd(params, grads, bufs, steps, kwargs):
    cpu = lambda ts: [t.detach().cpu().clone() for t in ts]  # noqa: E731
    cpu_kwargs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    exp_p, exp_b, exp_s, exp_g = _ref_fused_sgd(cpu(params), cpu(grads), cpu(bufs), cpu(steps), **cpu_kwargs)
    skipped = kwargs["found_inf"] is not None and kwargs["found_inf"].item() != 0
    bufs_before = cpu(bufs)
    ops.fused_sgd_(params, grads, bufs, steps, **kwargs)
    # The grads: untouched, or exactly g * grad_mul (skipped step or not).
    for i, (g, e) in enumerate(zip(grads, exp_g)):
        assert torch.equal(g.cpu(), e), f"grad {i} (write_grads={kwargs.get('write_grads', False)})"
    for i, (p, e) in enumerate(zip(params, exp_p)):
        if skipped:
            assert torch.equal(p.cpu(), e), "a set found_inf must leave params untouched"
        else:
            torch.testing.assert_close(p.cpu(), e, msg=lambda m: f"param {i}: {m}")
    for i, (b, e) in enumerate(zip(bufs, exp_b)):
        if skipped:
            assert torch.equal(b.cpu().nan_to_num(), bufs_before[i].nan_to_num())
            assert torch.equal(b.cpu().isnan(), bufs_before[i].isnan())
        else:
            torch.testing.assert_close(b.cpu(), e, msg=lambda m: f"momentum buffer {i}: {m}")
    for s, e in zip(steps, exp_s):
        assert s.item() == e.item()


# Every case as the optimizer calls it without a factor (grads kept), and with
# write_grads where a factor makes the write real (at grad_mul == 1 the kernels
# skip it, which the kept cases already show).
SGD_RUNS = [(c, False) for c in SGD_CASES] + [
    (c, True) for c, cfg in SGD_CASES.items() if "_scale" in cfg or "grad_factor" in cfg
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,write_grads", SGD_RUNS, ids=[c + ("-write_grads" if w else "") for c, w in SGD_RUNS])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd(dtype, size, case, write_grads, device):
    params, grads, bufs, steps, kwargs = _sgd_inputs(case, [size, 9], dtype, device, seed=size)
    _check_sgd(params, grads, bufs, steps, dict(kwargs, write_grads=write_grads))


@pytest.mark.parametrize("case,write_grads", SGD_RUNS, ids=[c + ("-write_grads" if w else "") for c, w in SGD_RUNS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_many_tensors(dtype, case, write_grads):
    params, grads, bufs, steps, kwargs = _sgd_inputs(case, _many_sizes(2), dtype, seed=3)
    _check_sgd(params, grads, bufs, steps, dict(kwargs, write_grads=write_grads))


def test_fused_sgd_repeated_steps_match_sgd():
    """50 calls of the op with the step counters it maintains itself == 50
    torch.optim.SGD steps (first call sets b = g, then momentum/dampening)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 7, 33, 1000]
    params = [torch.randn(n, generator=gen) for n in sizes]
    ref_params = [torch.nn.Parameter(p.clone()) for p in params]
    bufs = [torch.zeros(n) for n in sizes]
    steps = [_scalar(0) for _ in sizes]
    kw = dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-2, nesterov=False, maximize=False)
    ref = torch.optim.SGD(ref_params, foreach=False, **kw)
    for _ in range(50):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        ops.fused_sgd_(params, grads, bufs, steps, lr_tensor=None, **kw)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)
    assert all(s.item() == 50 for s in steps)


# argument checks at the op boundary ------------------------------------------------


def _sgd_kw(**over):
    kw = dict(lr=0.1, lr_tensor=None, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    kw.update(over)
    return kw


def test_op_argument_checks():
    p = [torch.randn(5), torch.randn(3)]
    g = [torch.randn(5), torch.randn(3)]
    b = [torch.zeros(5), torch.zeros(3)]
    s = [_scalar(0), _scalar(0)]
    before = [t.clone() for t in p]
    with pytest.raises(RuntimeError, match="grads"):
        ops.fused_sgd_(p, g[:1], b, s, **_sgd_kw())
    with pytest.raises(RuntimeError, match="shape"):
        ops.fused_sgd_(p, [torch.randn(5), torch.randn(4)], b, s, **_sgd_kw())
    with pytest.raises(RuntimeError, match="dtype|Double"):
        ops.fused_sgd_(p, [g[0], g[1].double()], b, s, **_sgd_kw())
    with pytest.raises(RuntimeError, match="steps"):
        ops.fused_sgd_(p, g, b, s[:1], **_sgd_kw())
    with pytest.raises(RuntimeError, match="empty|momentum"):
        ops.fused_sgd_(p, g, b, s, **_sgd_kw(momentum=0.0))
    with pytest.raises(RuntimeError, match="found_inf|float"):
        ops.fused_sgd_(p, g, b, s, **_sgd_kw(found_inf=torch.zeros((), dtype=torch.float64)))
    for t, u in zip(p, before):
        assert torch.equal(t, u)
    with pytest.raises(RuntimeError, match="found_inf|float"):
        ops.nonfinite_check_(g, torch.zeros((), dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="dtype|Double|device"):
        ops.nonfinite_check_([g[0], g[1].double()], _scalar(0), None)


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------

OPCHECK_SIZES = [0, 1, 7, 33]


def _opcheck(op, args, kwargs=None):
    # The full default set: schema (mutation annotations vs. what the kernel
    # writes), autograd registration, fake tensor and aot_dispatch_dynamic.
    # None needs restricting: the ops return () and mutate only what their
    # schema annotates.
    result = torch.library.opcheck(op, args, kwargs or {})
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_nonfinite_check(dtype, poison, device):
    grads = _lists(OPCHECK_SIZES, dtype, seed=0, device=device)
    if poison:
        grads[2][3] = float("inf")
    _opcheck(ops.nonfinite_check_.default, (grads, _scalar(0, device), _scalar(0, device)))
    _opcheck(ops.nonfinite_check_.default, (grads, _scalar(0, device), None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_unscale_check(dtype, device):
    grads = _lists(OPCHECK_SIZES, dtype, seed=0, device=device)
    _opcheck(ops.unscale_check_.default, (grads, _scalar(0, device), _scalar(8.0, device)),
             {"factor": 0.5, "sumsq": _scalar(0, device)})
    _opcheck(ops.unscale_check_.default, (grads, _scalar(0, device), _scalar(2.0, device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["plain", "momentum-first-step", "momentum-later", "scaled-factor", "lr-tensor", "skip-found-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_fused_sgd(dtype, case, device):
    params, grads, bufs, steps, kwargs = _sgd_inputs(case, OPCHECK_SIZES, dtype, device)
    # opcheck compares outputs/mutations across runs: NaN-filled never-written
    # buffers would compare unequal to themselves, so use finite ones here
    for b in bufs:
        b.nan_to_num_(0.5)
    _opcheck(ops.fused_sgd_.default, (params, grads, bufs, steps), kwargs)
    _opcheck(ops.fused_sgd_.default, (params, grads, bufs, steps), dict(kwargs, write_grads=True))

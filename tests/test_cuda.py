"""CUDA parity tests: the CUDA kernels against the CPU kernels on the same data,
and AccumOptimizer + GradScaler on CUDA against torch.optim.SGD +
torch.amp.GradScaler("cuda").

Every test here needs a CUDA device and is skipped, visibly, without one.
``FASTACCUM_TEST_CUDA_AS=cpu`` runs the tests that do not need real CUDA
features on the CPU instead (the "device" side then is the CPU too): a dry run
of the test code itself on machines without a GPU, not a test of the kernels.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from _helpers import (
    assert_params_changed,
    assert_params_close,
    make_batches,
    make_model,
    run_ours,
    run_ref,
)
import torch_fastaccum._ops
from torch_fastaccum import AccumOptimizer, GradScaler

DEV = os.environ.get("FASTACCUM_TEST_CUDA_AS", "cuda")
REAL_CUDA = DEV == "cuda"
pytestmark = pytest.mark.skipif(
    REAL_CUDA and not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels are not tested"
)
needs_real_cuda = pytest.mark.skipif(not REAL_CUDA, reason="needs a real CUDA device (dry run on the CPU)")

ops = torch.ops.fastaccum
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 8, 65537]
CHUNK = 65536


def _sync():
    if REAL_CUDA:
        torch.cuda.synchronize()


def _tol(dtype):
    """CUDA vs CPU after one update: both compute in opmath with the same
    order of operations (csrc/sgd_math.h); nvcc may contract a*b+c into one
    FMA where the CPU rounds twice, so fp32/fp64 differ by an ulp or so, and a
    half type by one ulp when that lands on a rounding boundary."""
    return {
        torch.float32: dict(rtol=1e-6, atol=1e-6),
        torch.float64: dict(rtol=1e-13, atol=1e-13),
        torch.float16: dict(rtol=2e-3, atol=1e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    }[dtype]


def _randn_list(sizes, dtype, seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype).to(device) for n in sizes]


def _many_sizes(seed=0, n=130):
    """More tensors than one launch holds at any depth, with empties inside
    and at the end, and a few multi-chunk ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 3000, (n,), generator=g).tolist()
    for i in (3, 50, 111):
        sizes[i] = 0
    sizes[20] = CHUNK * 2 + 3
    sizes[115] = CHUNK + 1
    return sizes + [0]


def _same(a, b):
    """Bitwise-equal values, NaN matching NaN."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    )


def _to(ts, device):
    """Copies, also to the device the tensors are on: a run that writes them
    must not change the input of the next run."""
    return [t.to(device, copy=True) for t in ts]


def _clone(ts, device=None):
    return [t.detach().clone() if device is None else t.detach().to(device, copy=True) for t in ts]


# ---------------------------------------------------------------------------
# ops: CUDA against CPU
# ---------------------------------------------------------------------------


def _inject(ts, where, value):
    if where is None:
        return
    i, j = where
    ts[i].view(-1)[j] = value


CHECK_CASES = [
    ("basic", SIZES, None),
    ("inf_in_tail", SIZES, (4, 65536)),  # last element of a 65537 tensor: the tail chunk
    ("nan_small", SIZES, (2, 3)),
    ("many_inf_late", _many_sizes(), (125, 0)),  # a tensor in a later launch
    ("many_clean", _many_sizes(), None),
]


@pytest.mark.parametrize("case,sizes,where", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_check_matches_cpu(dtype, case, sizes, where):
    grads = _randn_list(sizes, dtype, seed=1)
    _inject(grads, where, float("nan") if "nan" in case else float("-inf"))
    results = []  # [cpu run, device run]: under the CPU dry run both are CPU runs
    for device in ("cpu", DEV):
        gs = _to(grads, device)
        before = _clone(gs)
        found_inf = torch.zeros((), device=device)
        sumsq = torch.full((), 0.5, device=device)  # accumulates onto what is there
        ops.nonfinite_check_(gs, found_inf, sumsq)
        _sync()
        for a, b in zip(gs, before):  # read-only pass
            assert _same(a, b)
        results.append((found_inf.item(), sumsq.item()))
    (inf_cpu, sq_cpu), (inf_dev, sq_dev) = results
    assert inf_dev == inf_cpu == (1.0 if where is not None else 0.0)
    if where is None:
        # Float sums in a different order: CPU lanes + double, GPU tree + atomics.
        assert math.isclose(sq_dev, sq_cpu, rel_tol=1e-4)


@pytest.mark.parametrize("scale_on", ["device", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_check_matches_cpu(dtype, scale_on):
    grads = _randn_list(_many_sizes(1), dtype, seed=2, scale=1024.0)
    out = []  # [cpu run, device run]: under the CPU dry run both are CPU runs
    for device in ("cpu", DEV):
        gs = _to(grads, device)
        found_inf = torch.zeros((), device=device)
        sumsq = torch.zeros((), device=device)
        scale = torch.tensor(3000.0, device=device if scale_on == "device" else "cpu")
        ops.unscale_check_(gs, found_inf, scale, factor=0.25, sumsq=sumsq)
        out.append((_clone(gs, "cpu"), found_inf.item(), sumsq.item()))
    (g_cpu, inf_cpu, sq_cpu), (g_dev, inf_dev, sq_dev) = out
    # One multiply in opmath per element: bitwise equal.
    for a, b in zip(g_cpu, g_dev):
        assert torch.equal(a, b)
    assert inf_cpu == inf_dev == 0.0
    assert math.isclose(sq_cpu, sq_dev, rel_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_check_flags_overflow_and_nan(dtype):
    for value, scale in ((float("nan"), 2.0), (1.0, 1e-40)):  # float(1/1e-40) is inf
        grads = _randn_list([7, 65537], dtype, seed=3)
        grads[1].view(-1)[-1] = value
        flags = []
        for device in ("cpu", DEV):
            found_inf = torch.zeros((), device=device)
            ops.unscale_check_(_to(grads, device), found_inf, torch.tensor(scale, device=device))
            flags.append(found_inf.item())
        assert flags == [1.0, 1.0]


def test_check_ops_empty_list_and_errors():
    found_inf = torch.zeros((), device=DEV)
    ops.nonfinite_check_([], found_inf)
    ops.unscale_check_([], found_inf, torch.ones((), device=DEV))
    assert found_inf.item() == 0.0
    if REAL_CUDA:
        g = [torch.randn(10, device="cuda")]
        with pytest.raises(RuntimeError, match="found_inf"):
            ops.nonfinite_check_(g, torch.zeros(()))  # CPU flag for CUDA grads
        # The whole message, index included: a build with a second libstdc++
        # lost it after "grads[" or crashed here (tests/test_libstdcxx.py).
        for check in (lambda gs, f: ops.nonfinite_check_(gs, f),
                      lambda gs, f: ops.unscale_check_(gs, f, torch.ones((), device="cuda"))):
            with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu but grads\[0\] is on cuda:0"):
                check([g[0], torch.randn(3)], torch.zeros((), device="cuda"))


# norm_check_ (NOTE: [norm check]): where the loss scale lives, and the factor.
NORM_MODES = {
    "scale_device_factor": ("device", 3000.0, 0.25),
    "scale_cpu_factor": ("cpu", 3000.0, 0.25),
    "factor": (None, None, 1.0 / 3.0),
    "plain": (None, None, 1.0),
}
NORM_TYPES = [2.0, math.inf]


def _norm_sum_rtol(dtype):
    """Sums of squares in another order (NOTE: [deterministic norm]): the CPU
    adds a chunk in float lanes, then the partials in double; the GPU adds
    128 elements per thread, a block tree, then double. fp16/bf16 squares have
    few significant bits, so the CPU's long float lane sums round with a bias:
    measured 2e-6 from the exact sum on this list (fp32: 6e-8)."""
    return {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-5)


def _norm_reference(grads, dtype, scale, factor):
    """sum x^2 (in double) and max |x| of x = g * mul rounded to the grads'
    dtype, mul = factor * float(1/scale) formed in double, then in opmath."""
    mul = factor if scale is None else float(torch.tensor(1.0 / scale, dtype=torch.float32)) * factor
    op = torch.float64 if dtype is torch.float64 else torch.float32
    xs = [g if mul == 1.0 else (g.to(op) * torch.tensor(mul, dtype=torch.float64).to(op)).to(dtype) for g in grads]
    sq = sum(float(x.double().square().sum()) for x in xs)
    mx = max((float(x.double().abs().max()) for x in xs if x.numel()), default=0.0)
    return sq, mx


def _norm_check(grads, device, dtype, norm_type, mode):
    """One norm_check_ on copies of grads on `device`: (found_inf, norm)."""
    where, scale, factor = NORM_MODES[mode]
    gs = _to(grads, device)
    before = _clone(gs)
    found_inf = torch.zeros((), device=device)
    out = torch.full((), -7.0, dtype=torch.float64 if dtype is torch.float64 else torch.float32, device=device)
    grad_scale = None if where is None else torch.tensor(scale, device=device if where == "device" else "cpu")
    ops.norm_check_(gs, found_inf, out, norm_type=norm_type, grad_scale=grad_scale, factor=factor)
    _sync()
    for a, b in zip(gs, before):  # read-only pass
        assert _same(a, b)
    return found_inf.item(), out.item()


@pytest.mark.parametrize("mode", list(NORM_MODES))
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_check_matches_cpu(dtype, norm_type, mode):
    grads = _randn_list(_many_sizes(6), dtype, seed=5, scale=1024.0)
    runs = [_norm_check(grads, device, dtype, norm_type, mode) for device in ("cpu", DEV)]  # [cpu, device]
    (inf_cpu, n_cpu), (inf_dev, n_dev) = runs
    assert inf_cpu == inf_dev == 0.0
    sq, mx = _norm_reference(grads, dtype, *NORM_MODES[mode][1:])
    if norm_type == math.inf:
        # The same rounded x on both, and max is exact.
        assert n_cpu == n_dev == mx
    else:
        rtol = _norm_sum_rtol(dtype)
        assert math.isclose(n_dev, n_cpu, rel_tol=rtol)
        for n in (n_cpu, n_dev):
            assert math.isclose(n, sq, rel_tol=rtol)


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_check_flags_nonfinite(dtype, norm_type, value):
    sizes = _many_sizes(6)
    for where in ((20, CHUNK * 2 + 2), (125, 0)):  # the tail chunk of a cut tensor; a later launch
        grads = _randn_list(sizes, dtype, seed=6)
        _inject(grads, where, value)
        for mode in ("scale_device_factor", "plain"):
            runs = [_norm_check(grads, device, dtype, norm_type, mode) for device in ("cpu", DEV)]
            assert [r[0] for r in runs] == [1.0, 1.0], f"{where} {mode}"
            for _, n in runs:
                if math.isnan(value):
                    assert math.isnan(n), f"{where} {mode}: {n}"
                else:
                    assert n == math.inf, f"{where} {mode}: {n}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_check_run_to_run_deterministic(dtype):
    """NOTE: [deterministic norm]: no float atomics, so the same call gives the
    same bits every time (several launches, cut tensors, a device scale)."""
    grads = _to(_randn_list(_many_sizes(7, n=300), dtype, seed=7, scale=1024.0), DEV)
    out_dtype = torch.float64 if dtype is torch.float64 else torch.float32
    for norm_type in NORM_TYPES:
        outs = []
        for _ in range(3):
            out = torch.empty((), dtype=out_dtype, device=DEV)
            ops.norm_check_(grads, torch.zeros((), device=DEV), out, norm_type=norm_type,
                            grad_scale=torch.tensor(3000.0, device=DEV), factor=0.25)
            outs.append(out)
        _sync()
        assert all(torch.equal(outs[0], o) for o in outs[1:]), [o.item() for o in outs]
        assert outs[0].item() > 0


def test_norm_check_empty_list_and_errors():
    for norm_type in NORM_TYPES:
        found_inf = torch.zeros((), device=DEV)
        out = torch.full((), -7.0, device=DEV)
        ops.norm_check_([], found_inf, out, norm_type=norm_type, grad_scale=torch.ones((), device=DEV), factor=0.5)
        assert out.item() == 0.0 and found_inf.item() == 0.0
    if REAL_CUDA:
        g = [torch.randn(10, device="cuda")]
        with pytest.raises(RuntimeError, match="norm_out is on cpu"):
            ops.norm_check_(g, torch.zeros((), device="cuda"), torch.zeros(()))
        with pytest.raises(RuntimeError, match="found_inf is on cpu"):
            ops.norm_check_(g, torch.zeros(()), torch.zeros((), device="cuda"))
        with pytest.raises(RuntimeError, match="norm_out must be"):
            ops.norm_check_(g, torch.zeros((), device="cuda"), torch.zeros((), dtype=torch.float64, device="cuda"))
        with pytest.raises(RuntimeError, match="norm_type must be 2.0 or inf"):
            ops.norm_check_(g, torch.zeros((), device="cuda"), torch.zeros((), device="cuda"), norm_type=1.0)


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1, maximize=True),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.2, nesterov=False, weight_decay=1e-2, maximize=False),
    dict(momentum=0.8, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=True),
]
# Where grad_scale / found_inf (0) / lr_tensor live on the device run.
SCALARS = ["none", "device", "device_lr64", "cpu"]


def _sgd_inputs(sizes, dtype, momentum, seed):
    params = _randn_list(sizes, dtype, seed)
    grads = _randn_list(sizes, dtype, seed + 1, scale=64.0)
    if momentum == 0:
        return params, grads, [], []
    bufs = _randn_list(sizes, dtype, seed + 2)
    steps = [torch.tensor(0.0 if i % 3 == 0 else float(i)) for i in range(len(sizes))]
    for b, s in zip(bufs, steps):  # never read on a first update
        if s.item() == 0:
            b.fill_(float("nan"))
    return params, grads, bufs, steps


def _run_sgd(device, params, grads, bufs, steps, cfg, scalars, dtype_lr=torch.float32, write_grads=False,
             clip_coef=None, found_inf=0.0):
    """clip_coef: None or (value, "device" | "cpu"); found_inf: the flag's
    value where scalars are given."""
    p, g, b, s = (_to(x, device) for x in (params, grads, bufs, steps))
    p, g, b, s = _clone(p), _clone(g), _clone(b), _clone(s)
    kw = dict(cfg, lr=0.1, lr_tensor=None, grad_factor=1.0, grad_scale=None, found_inf=None,
              write_grads=write_grads)
    if scalars != "none":
        where = "cpu" if scalars == "cpu" else device
        lr_dtype = torch.float64 if scalars == "device_lr64" else dtype_lr
        kw.update(
            lr=1.0,
            lr_tensor=torch.tensor(0.05, dtype=lr_dtype, device=where),
            grad_factor=0.25,
            grad_scale=torch.tensor(48.0, device=where),
            found_inf=torch.full((), found_inf, device=where),
        )
    if clip_coef is not None:
        value, on = clip_coef
        kw["clip_coef"] = torch.tensor(value, device=device if on == "device" else "cpu")
    ops.fused_sgd_(p, g, b, s, **kw)
    _sync()
    return _clone(p, "cpu"), _clone(b, "cpu"), _clone(s, "cpu"), _clone(g, "cpu")


def _assert_sgd_equal(cpu, dev, dtype, exact=False):
    tol = dict(rtol=0, atol=0) if exact else _tol(dtype)
    for what, xs, ys in zip(("params", "bufs"), cpu[:2], dev[:2]):
        for i, (x, y) in enumerate(zip(xs, ys)):
            torch.testing.assert_close(y, x, **tol, msg=lambda m: f"{what}[{i}]: {m}")
    for x, y in zip(cpu[2], dev[2]):
        assert torch.equal(x, y), "steps differ"


# write_grads only where a factor applies (SCALARS other than "none").
@pytest.mark.parametrize("scalars,write_grads", [(s, False) for s in SCALARS] + [(s, True) for s in SCALARS if s != "none"],
                         ids=lambda v: {True: "write_grads", False: "grads_kept"}.get(v, v) if isinstance(v, bool) else v)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "m{momentum}-d{dampening}-n{nesterov:d}-wd{weight_decay}-max{maximize:d}".format(**c))
@pytest.mark.parametrize("sizes", [SIZES, _many_sizes(2)], ids=["sizes", "many"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_matches_cpu(dtype, sizes, cfg, scalars, write_grads):
    inputs = _sgd_inputs(sizes, dtype, cfg["momentum"], seed=10)
    cpu = _run_sgd("cpu", *inputs, cfg, scalars, write_grads=write_grads)
    dev = _run_sgd(DEV, *inputs, cfg, scalars, write_grads=write_grads)
    _assert_sgd_equal(cpu, dev, dtype)
    for g0, g1 in zip(cpu[3], dev[3]):  # kept, or the same single multiply on both
        assert torch.equal(g0, g1)
    if not write_grads:
        for g0, g1 in zip(inputs[1], dev[3]):
            assert torch.equal(g0, g1), "grads must be untouched"
    if cfg["momentum"]:
        assert [s.item() for s in dev[2]] == [s.item() + 1 for s in inputs[3]]
        for b in dev[1]:
            assert torch.isfinite(b).all(), "a first update read the never-written buffer"


# (scalars, write_grads, found_inf) of a fused clip's update: grad_scale and
# 1/K with the coefficient, the grads kept or written back; the coefficient
# alone (only it decides the write-back); a skipped step that still leaves the
# grads unscaled and clipped, as the reference loop leaves them.
CLIP_MODES = {
    "grads_kept": ("device", False, 0.0),
    "write_grads": ("device", True, 0.0),
    "clip_only_write_grads": ("none", True, 0.0),
    "skipped_write_grads": ("device", True, 1.0),
}


@pytest.mark.parametrize("mode", list(CLIP_MODES))
@pytest.mark.parametrize("coef", [0.37, 1.0])
@pytest.mark.parametrize("coef_on", ["device", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_clip_coef_matches_cpu(dtype, coef_on, coef, mode):
    cfg = SGD_CONFIGS[3]
    scalars, write_grads, found_inf = CLIP_MODES[mode]
    inputs = _sgd_inputs(_many_sizes(5), dtype, cfg["momentum"], seed=15)
    kw = dict(write_grads=write_grads, found_inf=found_inf)
    cpu = _run_sgd("cpu", *inputs, cfg, scalars, clip_coef=(coef, coef_on), **kw)
    dev = _run_sgd(DEV, *inputs, cfg, scalars, clip_coef=(coef, coef_on), **kw)
    if found_inf:
        untouched = (inputs[0], inputs[2], inputs[3])  # params, bufs, steps: as _run_sgd returns them
        for xs, ys, zs in zip(untouched, cpu[:3], dev[:3]):
            for x, y, z in zip(xs, ys, zs):
                assert _same(x, y) and _same(x, z)
    else:
        _assert_sgd_equal(cpu, dev, dtype)
    for g0, g1 in zip(cpu[3], dev[3]):  # kept, or the same multiplies on both
        assert torch.equal(g0, g1)
    if coef == 1.0:
        # Exactly 1 changes nothing: the same bits as no coefficient at all.
        plain = _run_sgd(DEV, *inputs, cfg, scalars, **kw)
        for xs, ys in zip(plain, dev):
            for x, y in zip(xs, ys):
                assert _same(x, y), "a coefficient of 1 changed a result"
    elif not write_grads:
        for g0, g1 in zip(inputs[1], dev[3]):
            assert torch.equal(g0, g1), "grads must be untouched"
    elif dtype in (torch.float32, torch.float64):
        # The unscaled grad, then the clip, each rounded (opmath is the
        # storage type here, so storage and opmath roundings coincide).
        mul = 1.0 if scalars == "none" else 0.25 * float(torch.tensor(1.0 / 48.0).float())
        for g0, g1 in zip(inputs[1], dev[3]):
            want = g0 if mul == 1.0 else g0 * torch.tensor(mul, dtype=torch.float64).to(dtype)
            assert torch.equal(g1, want * torch.tensor(coef, dtype=torch.float32).to(dtype))


def test_fused_sgd_cut_tensor_first_update():
    """A tensor cut between launches, on its first real update: every chunk,
    in either launch, must see steps == 0 (b = g with no dampening), and the
    counter must advance exactly once."""
    sizes = [CHUNK * 321 + 3, 17, CHUNK * 2]
    cfg = dict(momentum=0.9, dampening=0.5, nesterov=False, weight_decay=0.0, maximize=False)
    p, g, b, s = _sgd_inputs(sizes, torch.float32, 0.9, seed=30)
    s = [torch.tensor(0.0) for _ in sizes]
    for x in b:
        x.fill_(float("nan"))
    dev = _run_sgd(DEV, p, g, b, s, cfg, "none")
    for g0, b1 in zip(g, dev[1]):
        assert torch.equal(b1, g0)
    for p0, g0, p1 in zip(p, g, dev[0]):
        torch.testing.assert_close(p1, p0 - 0.1 * g0, rtol=1e-6, atol=1e-6)
    assert [x.item() for x in dev[2]] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("where", ["device", "cpu"])
def test_fused_sgd_skips_everything_on_found_inf(where):
    cfg = SGD_CONFIGS[4]
    p, g, b, s = _sgd_inputs(_many_sizes(4), torch.float32, cfg["momentum"], seed=40)
    pd, gd, bd, sd = (_to(x, DEV) for x in (p, g, b, s))
    loc = DEV if where == "device" else "cpu"
    ops.fused_sgd_(pd, gd, bd, sd, lr=0.1, lr_tensor=None, grad_factor=0.5,
                   grad_scale=torch.tensor(4.0, device=loc), found_inf=torch.ones((), device=loc), **cfg)
    _sync()
    for xs, ys in ((p, pd), (b, bd), (s, sd)):
        for x, y in zip(xs, ys):
            assert _same(x, y.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_sgd_misaligned_and_strided(dtype):
    """Views at odd storage offsets take the scalar path (on every list, or on
    one list only); channels_last tensors are walked in storage order."""
    cfg = SGD_CONFIGS[3]
    sizes = [CHUNK + 5, 8, 64]
    p = _randn_list(sizes, dtype, seed=50)
    g = _randn_list(sizes, dtype, seed=51)
    b = _randn_list(sizes, dtype, seed=52)
    steps = [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(3.0), torch.tensor(2.0)]

    def offset_view(t, device, offset):
        return torch.empty(t.numel() + offset, dtype=dtype, device=device)[offset:].copy_(t)

    cl = torch.randn(4, 6, 5, 3, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
    results = []
    for device in ("cpu", DEV):
        pd = [offset_view(p[0], device, 1), offset_view(p[1], device, 3), p[2].to(device, copy=True)]
        gd = [offset_view(g[0], device, 1), offset_view(g[1], device, 1), offset_view(g[2], device, 1)]
        bd = [offset_view(b[0], device, 2), b[1].to(device, copy=True), b[2].to(device, copy=True)]
        pd.append(cl.to(device, copy=True))
        gd.append(torch.randn(cl.shape, generator=torch.Generator().manual_seed(53)).to(dtype)
                  .contiguous(memory_format=torch.channels_last).to(device))
        bd.append(torch.ones_like(pd[-1]) * 0.5)
        sd = [t.to(device, copy=True) for t in steps]
        assert all(t.data_ptr() % 16 != 0 for t in pd[:2] + gd[:3])
        assert pd[3].is_contiguous(memory_format=torch.channels_last) and not pd[3].is_contiguous()
        ops.fused_sgd_(pd, gd, bd, sd, lr=0.1, lr_tensor=None, **cfg)
        results.append(([t.cpu() for t in pd], [t.cpu() for t in bd], [t.cpu() for t in sd]))
    _assert_sgd_equal(results[0], results[1], dtype)


@needs_real_cuda
def test_fused_sgd_device_errors():
    p = [torch.randn(10, device="cuda")]
    g = [torch.randn(10, device="cuda")]
    with pytest.raises(RuntimeError, match="params are on cpu"):
        ops.fused_sgd_([torch.randn(3)], [torch.randn(3)], [], [], lr=0.1, weight_decay=0.0, momentum=0.0,
                       dampening=0.0, nesterov=False, maximize=False, found_inf=torch.zeros((), device="cuda"))
    with pytest.raises(RuntimeError, match="steps"):
        ops.fused_sgd_(p, g, [torch.zeros(10, device="cuda")], [torch.zeros(())], lr=0.1, weight_decay=0.0,
                       momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu but params\[0\] is on cuda:0"):
        ops.fused_sgd_(p + [torch.randn(3)], g + [torch.randn(3)], [], [], lr=0.1, weight_decay=0.0,
                       momentum=0.0, dampening=0.0, nesterov=False, maximize=False)


@needs_real_cuda
def test_fused_sgd_lr_tensor_other_dtype():
    """A bf16 CUDA lr_tensor is converted on the device (no host read)."""
    cfg = SGD_CONFIGS[2]
    inputs = _sgd_inputs(SIZES, torch.float32, cfg["momentum"], seed=60)
    cpu = _run_sgd("cpu", *inputs, cfg, "device", dtype_lr=torch.bfloat16)
    dev = _run_sgd(DEV, *inputs, cfg, "device", dtype_lr=torch.bfloat16)
    _assert_sgd_equal(cpu, dev, torch.float32)


@needs_real_cuda
@pytest.mark.parametrize(
    "op", ["nonfinite_check_", "unscale_check_", "norm_check_", "norm_check_inf", "fused_sgd_", "fused_sgd_clip"]
)
def test_opcheck_cuda(op):
    grads = _randn_list([0, 7, 65537], torch.float32, seed=70, device="cuda")
    found_inf = torch.zeros((), device="cuda")
    if op == "nonfinite_check_":
        args, kwargs = (grads, found_inf, torch.zeros((), device="cuda")), {}
    elif op == "unscale_check_":
        args, kwargs = (grads, found_inf, torch.tensor(2.0, device="cuda")), dict(factor=0.5)
    elif op.startswith("norm_check_"):
        args = (grads, found_inf, torch.zeros((), device="cuda"))
        kwargs = dict(norm_type=math.inf if op == "norm_check_inf" else 2.0,
                      grad_scale=torch.tensor(2.0, device="cuda"), factor=0.5)
    else:
        params = _randn_list([0, 7, 65537], torch.float32, seed=71, device="cuda")
        bufs = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device="cuda") for _ in params]
        args = (params, grads, bufs, steps)
        kwargs = dict(lr=0.1, lr_tensor=torch.tensor(0.1, device="cuda"), weight_decay=0.0, momentum=0.9,
                      dampening=0.0, nesterov=False, maximize=False, grad_factor=1.0,
                      grad_scale=torch.tensor(2.0, device="cuda"), found_inf=found_inf)
        if op == "fused_sgd_clip":
            kwargs.update(write_grads=True, clip_coef=torch.tensor(0.37, device="cuda"))
    name = {"norm_check_inf": "norm_check_", "fused_sgd_clip": "fused_sgd_"}.get(op, op)
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)


# ---------------------------------------------------------------------------
# 10,000 small tensors
# ---------------------------------------------------------------------------


def _count_kernels(fn):
    """Our kernel launches and host-to-device copies in fn(), by kind; None
    when the profiler sees no CUDA activity at all (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        return None
    return {
        "table": sum("multi_tensor_table_kernel" in n for n in names),
        "by_value": sum("multi_tensor_kernel" in n for n in names),
        "steps": sum("advance_steps_kernel" in n for n in names),
        "finish": sum("norm_finish_kernel" in n for n in names),
        "uploads": sum("memcpy" in n.lower() and "htod" in n.lower().replace(" ", "") for n in names),
    }


def _arg_bytes():
    """The by-value budget of this build on this device (NOTE: [kernel-argument
    budgets]): 32 KB from CUDA 12.1 on sm70+."""
    major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
    big = (major, minor) >= (12, 1) and torch.cuda.get_device_capability()[0] >= 7
    return 32764 if big else 4096


def test_ten_thousand_tensors(monkeypatch):
    n, size = 10_000, 1_000
    cfg = SGD_CONFIGS[3]
    sizes = [size] * n
    inputs = _sgd_inputs(sizes, torch.float32, cfg["momentum"], seed=80)
    inputs[1][-1][-1] = float("inf")
    flags = []
    for device in ("cpu", DEV):
        found_inf = torch.zeros((), device=device)
        ops.nonfinite_check_(_to(inputs[1], device), found_inf)
        flags.append(found_inf.item())
    assert flags == [1.0, 1.0]
    inputs[1][-1][-1] = 1.0
    cpu = _run_sgd("cpu", *inputs, cfg, "device")
    dev = _run_sgd(DEV, *inputs, cfg, "device")
    _assert_sgd_equal(cpu, dev, torch.float32)

    if REAL_CUDA:
        p, g, b, s = (_to(x, "cuda") for x in inputs)
        found_inf = torch.zeros((), device="cuda")

        def step():
            ops.nonfinite_check_(g, found_inf)
            ops.fused_sgd_(p, g, b, s, lr=0.1, lr_tensor=None, found_inf=found_inf, **cfg)

        step()  # warm-up: uploads the two tables
        counts = _count_kernels(step)
        if counts is not None:
            # NOTE: [launch modes]: one launch per pass, whatever the tensor
            # count, and no upload while the pointers stay the same.
            want = torch_fastaccum._ops.cuda_launch_count(sizes, torch.float32)
            assert counts == {"table": want["step"], "by_value": 0, "steps": 0, "finish": 0, "uploads": 0}
            assert want["step"] == 2
            monkeypatch.setenv("FASTACCUM_CUDA_LAUNCH", "by_value")
            counts = _count_kernels(step)
            want = torch_fastaccum._ops.cuda_launch_count(sizes, torch.float32, captured=True,
                                                          arg_bytes=_arg_bytes())
            assert counts == {"table": 0, "by_value": want["check"] + want["update"],
                              "steps": want["steps"], "finish": 0, "uploads": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_table_and_by_value_launches_agree_bitwise(dtype, monkeypatch):
    """NOTE: [launch modes]: the one-launch table passes and the by-value
    launches (graph capture's) run the same functors over the same chunks:
    every output is bit-identical, step counters included (in-kernel tickets
    against the counter launches), with a tensor cut by the by-value block
    limit, empty tensors, and first and later updates."""
    cfg = SGD_CONFIGS[3]
    sizes = _many_sizes(5, n=600) + [CHUNK * 3 + 5, 0]
    inputs = _sgd_inputs(sizes, dtype, cfg["momentum"], seed=81)  # first and later updates
    runs = {}
    for mode in ("table", "by_value"):
        monkeypatch.setenv("FASTACCUM_CUDA_LAUNCH", mode)
        runs[mode] = _run_sgd(DEV, *inputs, cfg, "device")
        grads = _to(inputs[1], DEV)
        found, norm = torch.zeros((), device=DEV), torch.zeros((), dtype=torch.float64 if dtype == torch.float64
                                                              else torch.float32, device=DEV)
        ops.norm_check_(grads, found, norm, norm_type=2.0, factor=0.25)
        runs[mode] += (norm, found)
        ops.unscale_check_(grads, found, torch.tensor(64.0, device=DEV), factor=0.5)
        runs[mode] += tuple(grads)
    a, b = runs["table"], runs["by_value"]
    _assert_sgd_equal(a[:4], b[:4], dtype, exact=True)
    for xs, ys in zip(a[2:4], b[2:4]):  # step counters, grads
        assert all(_same(x, y) for x, y in zip(xs, ys))
    for x, y in zip(a[4:], b[4:]):
        assert _same(x, y)
    if REAL_CUDA:
        monkeypatch.setenv("FASTACCUM_CUDA_LAUNCH", "sideways")
        with pytest.raises(RuntimeError, match="FASTACCUM_CUDA_LAUNCH must be 'table' or 'by_value'"):
            ops.nonfinite_check_(grads, found)


@needs_real_cuda
def test_launch_table_cache_refreshes_on_new_pointers():
    """NOTE: [table cache]: a table is uploaded when a pass's pointers change
    (new grads, as after zero_grad(set_to_none=True)), found again while they
    stay, kept per stream, and the results stay right through all of it."""
    cfg = SGD_CONFIGS[3]
    sizes = [1000] * 300 + [CHUNK + 1, 0]
    p0, g0, b0, s0 = _sgd_inputs(sizes, torch.float32, cfg["momentum"], seed=82)
    stats = torch_fastaccum._ops.cuda_table_stats
    stats(clear=True)
    dev = [_to(x, "cuda") for x in (p0, g0, b0, s0)]
    ref = [_clone(x) for x in (p0, g0, b0, s0)]
    found = torch.zeros((), device="cuda")

    def step(state, grads, device):
        f = found.zero_() if device == "cuda" else torch.zeros(())
        ops.nonfinite_check_(grads, f)
        ops.fused_sgd_(state[0], grads, state[2], state[3], lr=0.1, lr_tensor=None, found_inf=f, **cfg)

    before = stats()
    side = torch.cuda.Stream()
    for it in range(6):
        grads = dev[1] if it in (0, 1, 3) else _to(g0, "cuda")  # new addresses at 2, 4, 5
        if it == 3:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(dev, grads, "cuda")
            torch.cuda.current_stream().wait_stream(side)
        else:
            step(dev, grads, "cuda")
        step(ref, _clone(g0), "cpu")
        torch.cuda.synchronize()
        for a, b in zip(dev[0], ref[0]):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)
        assert [x.item() for x in dev[3]] == [x.item() for x in ref[3]]
    after = stats()
    # Calls 0 (new), 2 (new grads), 3 (other stream), 4 and 5 (new grads)
    # upload both tables; call 1 finds both.
    assert after["uploads"] - before["uploads"] == 2 * 5
    assert after["hits"] - before["hits"] == 2
    assert after["entries"] == 4  # two passes on each of two streams


@needs_real_cuda
def test_launch_table_made_in_inference_mode_serves_later_calls():
    """A table first uploaded by a call under torch.inference_mode() is a
    normal tensor: a later call outside it can upload into it again."""
    torch_fastaccum._ops.cuda_table_stats(clear=True)
    found = torch.zeros((), device="cuda")
    with torch.inference_mode():
        ops.nonfinite_check_(_randn_list([1000, 7], torch.float32, seed=83, device="cuda"), found)
    grads = _randn_list([1000, 7], torch.float32, seed=84, device="cuda")
    grads[1][3] = float("inf")
    ops.nonfinite_check_(grads, found)  # new addresses: uploads into the same buffer
    assert found.item() == 1.0
    assert torch_fastaccum._ops.cuda_table_stats()["entries"] == 1


# ---------------------------------------------------------------------------
# CUDA graphs and host syncs
# ---------------------------------------------------------------------------


def _captured(step, make_state):
    """`step` warmed up on a side stream (as graph capture requires), then
    captured on fresh state: (graph, that state, what the captured call
    returned)."""
    warm = make_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(warm)
    torch.cuda.current_stream().wait_stream(side)
    state = make_state()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(state)
    return graph, state, out


@needs_real_cuda
def test_cuda_graph_capture_and_replay():
    """The check + update ops captured once and replayed: scalars (lr,
    grad_scale, found_inf) and step counters are read from device memory on
    every replay, and the replays match eager calls bitwise."""
    cfg = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-2, maximize=False)
    sizes = [1000, CHUNK + 1, 7, 0]

    def make_state():
        params = _randn_list(sizes, torch.float32, seed=90, device="cuda")
        return dict(
            params=params,
            bufs=[torch.zeros_like(p) for p in params],
            steps=[torch.zeros((), device="cuda") for _ in params],
            found_inf=torch.zeros((), device="cuda"),
        )

    grads = _randn_list(sizes, torch.float32, seed=91, device="cuda")
    lr = torch.tensor(0.1, device="cuda")
    scale = torch.tensor(1024.0, device="cuda")

    def step(st):
        st["found_inf"].zero_()
        ops.nonfinite_check_(grads, st["found_inf"])
        ops.fused_sgd_(st["params"], grads, st["bufs"], st["steps"], lr=1.0, lr_tensor=lr, grad_factor=0.5,
                       grad_scale=scale, found_inf=st["found_inf"], **cfg)

    stats = torch_fastaccum._ops.cuda_table_stats
    graph, graphed, _ = _captured(step, make_state)
    # The warm-up ran in table mode; the capture, by value: the graph holds
    # no table that later eager calls could rewrite (NOTE: [launch modes]).
    before = stats()
    capture_again = torch.cuda.CUDAGraph()
    spare = make_state()
    with torch.cuda.graph(capture_again):
        step(spare)
    after = stats()
    assert (after["uploads"], after["hits"]) == (before["uploads"], before["hits"])
    eager = make_state()
    gen = torch.Generator().manual_seed(92)
    for it in range(6):
        for gt in grads:
            gt.copy_(torch.randn(gt.shape, generator=gen) * 1024)
        if it == 2:
            grads[1][-1] = float("inf")  # this replay must skip
        if it == 4:
            lr.fill_(0.02)
            scale.fill_(256.0)
        graph.replay()
        step(eager)
        torch.cuda.synchronize()
        for key in ("params", "bufs", "steps"):
            for a, b in zip(graphed[key], eager[key]):
                assert torch.equal(a, b), f"replay {it}: {key} differ"
        assert graphed["found_inf"].item() == eager["found_inf"].item() == (1.0 if it == 2 else 0.0)
    assert [x.item() for x in graphed["steps"]] == [5.0] * len(sizes)


@needs_real_cuda
def test_cuda_graph_capture_fused_clip_step():
    """The op sequence of a fused clip step (norm_check_, the coefficient
    with torch ops, fused_sgd_ with clip_coef on the device) captured once
    and replayed: the replays match eager calls bitwise, clipping, not
    clipping (coefficient exactly 1) and skipping as the data says."""
    cfg = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    sizes = [1000, CHUNK + 1, 7, 0]
    max_norm = 50.0  # unscaled grads ~ 0.5 * randn: a norm near 130

    def make_state():
        params = _randn_list(sizes, torch.float32, seed=95, device="cuda")
        return dict(
            params=params,
            bufs=[torch.zeros_like(p) for p in params],
            steps=[torch.zeros((), device="cuda") for _ in params],
            found_inf=torch.zeros((), device="cuda"),
            sumsq=torch.zeros((), device="cuda"),
        )

    grads = _randn_list(sizes, torch.float32, seed=96, device="cuda")
    scale = torch.tensor(1024.0, device="cuda")

    def step(st):
        st["found_inf"].zero_()
        ops.norm_check_(grads, st["found_inf"], st["sumsq"], norm_type=2.0, grad_scale=scale, factor=0.5)
        norm = st["sumsq"].sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        ops.fused_sgd_(st["params"], grads, st["bufs"], st["steps"], lr=0.1, lr_tensor=None, grad_factor=0.5,
                       grad_scale=scale, found_inf=st["found_inf"], clip_coef=coef, **cfg)
        return norm, coef

    graph, graphed, (g_norm, g_coef) = _captured(step, make_state)
    eager = make_state()
    gen = torch.Generator().manual_seed(97)
    for it in range(5):
        for gt in grads:
            gt.copy_(torch.randn(gt.shape, generator=gen) * (10.0 if it == 1 else 1024.0))
        if it == 2:
            grads[1][-1] = float("inf")  # this replay must skip
        graph.replay()
        e_norm, e_coef = step(eager)
        torch.cuda.synchronize()
        for key in ("params", "bufs", "steps"):
            for a, b in zip(graphed[key], eager[key]):
                assert torch.equal(a, b), f"replay {it}: {key} differ"
        assert _same(g_norm, e_norm) and _same(g_coef, e_coef), f"replay {it}: {g_norm} {e_norm} {g_coef} {e_coef}"
        assert graphed["found_inf"].item() == eager["found_inf"].item() == (1.0 if it == 2 else 0.0)
        if it == 1:
            assert g_coef.item() == 1.0, "a norm under max_norm must not clip"
        elif it != 2:
            assert 0.0 < g_coef.item() < 1.0, f"replay {it} did not clip: norm {g_norm.item()}"
    assert [x.item() for x in graphed["steps"]] == [4.0] * len(sizes)

@needs_real_cuda
@pytest.mark.parametrize("K", [1, 4])
def test_no_host_sync_in_scaler_step(K):
    model = make_model("mlp", device="cuda")
    opt = AccumOptimizer(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, accumulation_steps=K)
    scaler = GradScaler("cuda")
    batches = make_batches("mlp", 3 * K, device="cuda")
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if i >= K:  # the first window creates optimizer state outside the check
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_real_cuda
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("K", [1, 4])
def test_no_host_sync_in_fused_clip_step(K, norm_type):
    """scaler.clip_grad_norm_ + step + update: the norm, the coefficient and
    the update stay on the device."""
    model = make_model("mlp", device="cuda")
    opt = AccumOptimizer(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, accumulation_steps=K)
    scaler = GradScaler("cuda")
    batches = make_batches("mlp", 3 * K, device="cuda")
    norms = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if i >= K:  # the first window creates optimizer state outside the check
            torch.cuda.set_sync_debug_mode("error")
        try:
            if opt.is_accumulation_boundary:
                norms.append(scaler.clip_grad_norm_(opt, 0.05, norm_type))
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(norms) == 3 and all(n.device.type == "cuda" for n in norms)
    assert any(n.item() > 0.05 for n in norms), "no window clipped"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------
# AccumOptimizer + GradScaler against torch.optim.SGD + torch.amp.GradScaler
# ---------------------------------------------------------------------------

OPT_CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.5, weight_decay=1e-2, maximize=True),
]


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "scaler"])
@pytest.mark.parametrize("cfg", OPT_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("K", [1, 4])
def test_optimizer_parity_100_updates(K, cfg, use_scaler):
    updates = 100
    model_a = make_model("mlp", seed=3, device=DEV)
    model_b = copy.deepcopy(model_a)
    before = [p.detach().clone() for p in model_a.parameters()]
    batches = make_batches("mlp", updates * K, seed=4, device=DEV)
    sign = -1.0 if cfg.get("maximize") else 1.0
    # Non-finite gradients in a few micro-batches: those windows are skipped.
    inject = {5: "inf", 2 * K + 1: "nan", 40 * K: "loss_inf"} if use_scaler else None
    kw = dict(sign=sign, inject=inject)
    if use_scaler:
        sa = GradScaler(DEV, init_scale=2.0**12, growth_interval=7)
        sb = torch.amp.GradScaler(DEV, init_scale=2.0**12, growth_interval=7)
        _, ta = run_ours(model_a, batches, K, opt_kwargs=cfg, scaler=sa, **kw)
        _, tb = run_ref(model_b, batches, K, opt_kwargs=cfg, scaler=sb, **kw)
        assert ta.skipped == tb.skipped
        assert sum(ta.skipped) >= 2
        assert ta.scales == tb.scales
    else:
        run_ours(model_a, batches, K, opt_kwargs=cfg, **kw)
        run_ref(model_b, batches, K, opt_kwargs=cfg, **kw)
    assert_params_close(model_a.parameters(), model_b.parameters(), msg=f"K={K} {cfg}")
    assert_params_changed(before, model_a)


@pytest.mark.parametrize("K", [1, 4])
def test_optimizer_parity_cnn_with_clipping(K, monkeypatch):
    # Both models must get the same conv gradients: no atomics-based cuDNN algos.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = dict(lr=0.02, momentum=0.9, weight_decay=1e-3)
    model_a = make_model("cnn", seed=5, device=DEV)
    model_b = copy.deepcopy(model_a)
    batches = make_batches("cnn", 30 * K, seed=6, device=DEV)
    sa = GradScaler(DEV, growth_interval=5)
    sb = torch.amp.GradScaler(DEV, growth_interval=5)
    _, ta = run_ours(model_a, batches, K, opt_kwargs=cfg, scaler=sa, loss_fn=F.cross_entropy, clip=0.5)
    _, tb = run_ref(model_b, batches, K, opt_kwargs=cfg, scaler=sb, loss_fn=F.cross_entropy, clip=0.5)
    assert ta.scales == tb.scales and ta.skipped == tb.skipped
    for ga, gb in zip(ta.unscaled_grads, tb.unscaled_grads):
        assert_params_close(ga, gb, msg="unscaled grads before clipping")
    assert_params_close(model_a.parameters(), model_b.parameters())


# About the median of the reference's window norms: some windows clip, others not.
FUSED_CLIP = {(1, 2.0): 1.0, (1, math.inf): 0.4, (4, 2.0): 0.5, (4, math.inf): 0.2}


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("K", [1, 4])
def test_fused_clip_parity(K, norm_type):
    """scaler.clip_grad_norm_ (fused) against unscale_ + torch's
    clip_grad_norm_: the norm is summed in another order, so norms agree to
    1e-6 relative and parameters to fp32 tolerance; skips and scales exactly."""
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    model_a = make_model("mlp", seed=9, device=DEV)
    model_b = copy.deepcopy(model_a)
    before = [p.detach().clone() for p in model_a.parameters()]
    batches = make_batches("mlp", 60 * K, seed=10, device=DEV)
    clip = FUSED_CLIP[(K, norm_type)]
    sa = GradScaler(DEV, init_scale=2.0**12, growth_interval=7)
    sb = torch.amp.GradScaler(DEV, init_scale=2.0**12, growth_interval=7)
    kw = dict(opt_kwargs=cfg, inject={3 * K: "inf", 20 * K + K - 1: "nan"}, clip=clip, clip_norm_type=norm_type)
    _, ta = run_ours(model_a, batches, K, scaler=sa, fused_clip=True, **kw)
    _, tb = run_ref(model_b, batches, K, scaler=sb, **kw)
    assert ta.skipped == tb.skipped and sum(tb.skipped) == 2
    assert ta.scales == tb.scales
    finite = [n.item() for n in tb.norms if torch.isfinite(n)]
    assert any(n > clip for n in finite) and any(n < clip for n in finite), \
        "clipping must be active on some windows only"
    assert len(ta.norms) == len(tb.norms) == 60
    for w, (a, b) in enumerate(zip(ta.norms, tb.norms)):
        assert a.device == b.device and a.dtype == b.dtype
        if torch.isfinite(b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m: f"window {w} norm: {m}")
        else:
            assert not torch.isfinite(a), f"window {w}: the reference's norm is {b}, ours {a}"
    assert_params_close(model_a.parameters(), model_b.parameters(), msg=f"K={K} norm_type={norm_type}")
    assert_params_changed(before, model_a)

@pytest.mark.parametrize("K", [1, 4])
def test_autocast_fp16_real_overflow(K):
    """fp16 autocast with init_scale=2**40: the first windows overflow for
    real (inf/NaN from fp16 backward), are skipped, and the scale backs off
    exactly as torch's does.

    Ours does not divide the loss by K, so its fp16 backward sees values K
    times larger than the reference loop's ``loss / K``: the overflow threshold
    is the same only when the reference's scale is K times ours. With K a power
    of two the runs are then exactly equivalent (same fp16 gradients, same
    unscaled mean); the reference starts at K * 2**40 here for that reason."""
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    model_a = make_model("mlp", seed=7, device=DEV)
    model_b = copy.deepcopy(model_a)
    batches = make_batches("mlp", 60 * K, seed=8, device=DEV)
    opt_a = AccumOptimizer(model_a.parameters(), accumulation_steps=K, **cfg)
    opt_b = torch.optim.SGD(model_b.parameters(), foreach=False, **cfg)
    sa = GradScaler(DEV, init_scale=2.0**40, growth_interval=10)
    sb = torch.amp.GradScaler(DEV, init_scale=K * 2.0**40, growth_interval=10)
    scales_a, scales_b = [], []
    for i, (x, y) in enumerate(batches):
        boundary = (i + 1) % K == 0
        opt_a.zero_grad()
        with torch.autocast(DEV, dtype=torch.float16):
            loss_a = F.mse_loss(model_a(x), y)
        sa.scale(loss_a).backward()
        sa.step(opt_a)
        sa.update()
        with torch.autocast(DEV, dtype=torch.float16):
            loss_b = F.mse_loss(model_b(x), y) / K
        sb.scale(loss_b).backward()
        if boundary:
            sb.step(opt_b)
            sb.update()
            opt_b.zero_grad()
            scales_a.append(sa.get_scale())
            scales_b.append(sb.get_scale())
    assert [K * s for s in scales_a] == scales_b
    assert scales_b[0] < K * 2.0**40, "no real overflow happened"
    assert sum(b < a for a, b in zip(scales_b, scales_b[1:])) >= 10
    # The forward runs in fp16: once the fp32 updates differ by an ulp (FMA
    # contraction vs two roundings), an activation can round to the other fp16
    # neighbour (2**-11 relative) and the runs drift by O(lr * 2**-11 * |g|)
    # per update; the 1e-5 fp32 bound does not apply. Measured on the CPU:
    # 2.4e-5 after 60 updates. Skips and scales above are still exact.
    assert_params_close(model_a.parameters(), model_b.parameters(), rtol=1e-3, atol=2e-4)


def test_bf16_params_against_fp32_math_reference():
    """bf16 parameters: ours keeps p and b in bf16 and computes in fp32, so the
    reference is that exact recipe written with torch ops (one bf16 rounding
    per stored value). The only freedom left is FMA contraction in fp32, which
    can move a result across a bf16 rounding boundary: a few elements may
    differ by an ulp (2**-8 relative), so we require >= 99% bitwise equal and
    the rest within 4 ulps."""
    lr, mom, wd = 0.05, 0.9, 1e-2
    sizes = [7, 8, 1000, CHUNK + 1]
    params = _randn_list(sizes, torch.bfloat16, seed=100, device=DEV)
    ref_p = [p.clone() for p in params]
    ref_b = [None] * len(params)
    ps = [torch.nn.Parameter(p) for p in params]
    opt = AccumOptimizer(ps, lr=lr, momentum=mom, weight_decay=wd, nesterov=True)
    gen = torch.Generator().manual_seed(101)
    for _ in range(30):
        grads = [torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV) for n in sizes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            p32, g32 = ref_p[i].float(), g.float()
            g32 = g32 + wd * p32
            b32 = g32 if ref_b[i] is None else mom * ref_b[i].float() + g32
            g32 = g32 + mom * b32
            ref_p[i] = (p32 - lr * g32).to(torch.bfloat16)
            ref_b[i] = b32.to(torch.bfloat16)
    for p, r in zip(ps, ref_p):
        p = p.detach()
        assert (p == r).float().mean().item() >= 0.99
        torch.testing.assert_close(p.float(), r.float(), rtol=4 * 2**-8, atol=1e-3)


def test_mixed_cpu_and_cuda_params_one_optimizer():
    """One optimizer, params on the CPU and on the GPU: one fused call per
    device, each with its own kernels, against torch.optim.SGD."""
    cfg = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(110)
    init = [torch.randn(300, generator=gen), torch.randn(65537, generator=gen), torch.randn(5, 7, generator=gen)]
    devices = ["cpu", DEV, DEV]
    ours = [torch.nn.Parameter(t.to(d)) for t, d in zip(init, devices)]
    ref = [torch.nn.Parameter(t.to(d)) for t, d in zip(init, devices)]
    opt_a = AccumOptimizer(ours, **cfg)
    opt_b = torch.optim.SGD(ref, foreach=False, **cfg)
    for _ in range(20):
        grads = [torch.randn(t.shape, generator=gen) for t in init]
        for pa, pb, g in zip(ours, ref, grads):
            pa.grad = g.to(pa.device)
            pb.grad = g.to(pb.device)
        opt_a.step()
        opt_b.step()
    assert [p.device.type for p in ours] == [torch.device(d).type for d in devices]
    assert_params_close(ours, ref)

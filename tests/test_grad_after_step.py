"""What `.grad` holds after a boundary step, compared with the reference loop
(torch.optim.SGD default path + torch.amp.GradScaler, `(loss / K).backward()`,
step every K): the unscaled mean gradient, clipped if clipped, also on a
skipped window; and with `grad_writeback=False` the accumulated scaled sum.

K and the loss scale are powers of two here, so every factor is exact and
the comparison is bit for bit on the CPU (NaN/inf included); parameters too.
On CUDA (skipped visibly without one) the backward itself may differ run to
run (atomics in conv backward), so there it is the fp32 parity tolerance
(RTOL/ATOL in tests/_helpers.py: rtol 1e-5 / atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import ATOL, DEVICES, RTOL, make_batches, make_model, parity_pair, run_ours, run_ref
from torch_fastaccum import AccumOptimizer, GradScaler

OPT = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
UPDATES = 5


def _assert_same(a, b, what, exact=True):
    assert len(a) == len(b), what
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=RTOL, atol=ATOL)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"{what}[{i}]: one grad is None"
            continue
        torch.testing.assert_close(x, y, equal_nan=True, msg=lambda m: f"{what}[{i}]: {m}", **tol)


def _l2_penalty(model):
    return 1e-3 * sum(p.pow(2).sum() for p in model.parameters())


# name -> (kind, scaler: None | "on" | "off", run kwargs)
PATHS = {
    "plain": ("mlp", None, {}),
    "plain_cnn": ("cnn", None, dict(loss_fn=F.cross_entropy)),
    "scaler": ("mlp", "on", {}),
    "scaler_disabled": ("mlp", "off", {}),
    "autocast_bf16_scaler": ("cnn", "on", dict(loss_fn=F.cross_entropy, autocast=torch.bfloat16)),
    "clip_no_scaler": ("mlp", None, dict(clip=0.05)),
    "clip_scaler": ("mlp", "on", dict(clip=0.05)),
    "clip_scaler_disabled": ("cnn", "off", dict(loss_fn=F.cross_entropy, clip=0.5)),
    # scaler.clip_grad_norm_: the norm pass with the check, the clip in the update
    "clip_scaler_fused": ("mlp", "on", dict(clip=0.05, fused_clip=True)),
    "clip_scaler_disabled_fused": ("cnn", "off", dict(loss_fn=F.cross_entropy, clip=0.5, fused_clip=True)),
    "penalty_term": ("mlp", "on", dict(penalty=_l2_penalty)),
    # inject: micro-batch -> fault, from K (windows 1 and 3, or 0 and 2)
    "skipped_windows": ("mlp", "on", dict(inject=lambda K: {K + K // 2: "inf", 4 * K - 1: "nan"})),
    "skipped_windows_clip": ("mlp", "on", dict(inject=lambda K: {K - 1: "inf", 2 * K: "nan"}, clip=0.05)),
    "skipped_windows_clip_fused": ("mlp", "on", dict(inject=lambda K: {K - 1: "inf", 2 * K: "nan"}, clip=0.05,
                                                     fused_clip=True)),
    "maximize_nesterov": ("mlp", "on", dict(opt_kwargs=dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True))),
}


def _scalers(mode, device="cpu"):
    if mode is None:
        return None, None
    kw = dict(init_scale=2.0**10, growth_interval=3, enabled=mode == "on")
    return GradScaler(device, **kw), torch.amp.GradScaler(device, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("path", list(PATHS))
def test_grad_after_step_matches_reference(path, K, device):
    kind, mode, kw = PATHS[path]
    kw = dict(kw)
    fused_clip = kw.pop("fused_clip", False)
    # A fused clip computes the norm in its own summation order: the
    # coefficient, and so what it multiplies, may differ by an ulp.
    fused = "clip" in kw and (fused_clip or mode is None)
    exact = device == "cpu" and not fused
    opt_kwargs = kw.pop("opt_kwargs", OPT)
    if "inject" in kw:
        kw["inject"] = kw["inject"](K)
    ours_m, ref_m = parity_pair(kind, device=device)
    batches = make_batches(kind, K * UPDATES, device=device)
    s_ours, s_ref = _scalers(mode, device)
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=opt_kwargs, scaler=s_ours, fused_clip=fused_clip, **kw)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=opt_kwargs, scaler=s_ref, **kw)

    assert len(t_ours.grads_after) == len(t_ref.grads_after) == UPDATES
    for w, (a, b) in enumerate(zip(t_ours.grads_after, t_ref.grads_after)):
        _assert_same(a, b, f"{path} K={K} window {w} .grad", exact)
    _assert_same(list(ours_m.parameters()), list(ref_m.parameters()), f"{path} K={K} params", exact)
    assert t_ours.skipped == t_ref.skipped
    if "inject" in kw:
        assert sum(t_ref.skipped) == 2, "the test must skip two windows"
        for w in (w for w, s in enumerate(t_ref.skipped) if s):
            assert any(not torch.isfinite(g).all() for g in t_ref.grads_after[w]), "a skipped window leaves inf/NaN"
    if "clip" in kw:
        if fused:
            for a, b in zip(t_ours.norms, t_ref.norms):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)
        _assert_same(t_ours.norms, t_ref.norms, f"{path} K={K} clip norms", exact)
        assert any(n > kw["clip"] for n in t_ref.norms if torch.isfinite(n)), "clipping must be active"


@pytest.mark.parametrize("mode", [None, "on"])
def test_grad_writeback_off_keeps_the_accumulated_sum(mode):
    """The opt-out: same parameters, and `.grad` keeps the scaled K-fold sum
    (reference mean x K x scale; the scale stays 2^10 here: no growth, no inf)."""
    K, scale = 4, 2.0**10
    ours_m, ref_m = parity_pair("mlp")
    batches = make_batches("mlp", K * UPDATES)
    s_ours = s_ref = None
    if mode:
        s_ours = GradScaler("cpu", init_scale=scale, growth_interval=1000)
        s_ref = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, grad_writeback=False, **OPT)
    _, t_ours = run_ours(ours_m, batches, K, opt, scaler=s_ours)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=OPT, scaler=s_ref)
    _assert_same(list(ours_m.parameters()), list(ref_m.parameters()), "params")
    factor = K * (scale if mode else 1.0)
    for w, (a, b) in enumerate(zip(t_ours.grads_after, t_ref.grads_after)):
        _assert_same(a, [g * factor for g in b], f"window {w} .grad (accumulated sum)")
    assert opt.defaults["grad_writeback"] is False and opt.state_dict()["param_groups"][0]["grad_writeback"] is False


def test_grad_writeback_must_be_a_bool():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="grad_writeback"):
        AccumOptimizer([p], grad_writeback="yes")


def _odd_params(seed=0):
    """A non-dense parameter (strided view), a complex one and a sparse-grad
    embedding, next to a plain one."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        plain=nn.Parameter(torch.randn(6, 5, generator=g)),
        strided=nn.Parameter(torch.randn(5, 8, generator=g)[:, ::2]),
        complex=nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.complex64)),
        emb=nn.Embedding(10, 3, sparse=True),
    )


def _odd_loss(ps, x, idx):
    h = torch.tanh(x @ ps["plain"])[:, :4] @ ps["strided"].t()
    c = (ps["complex"] * (1 + 0.5j)).abs().pow(2).sum()
    return h.pow(2).mean() + ps["emb"](idx).pow(2).mean() + 0.1 * c


@pytest.mark.parametrize("K", [1, 4])
def test_grad_after_step_odd_layouts(K):
    """Dense stand-ins are copied back, complex grads are written through their
    real view and sparse grads get their values unscaled, as the reference."""
    torch.manual_seed(0)
    ps_o, ps_r = _odd_params(), _odd_params()
    ps_r["emb"].load_state_dict(ps_o["emb"].state_dict())
    flat = lambda ps: [ps["plain"], ps["strided"], ps["complex"], ps["emb"].weight]  # noqa: E731
    ours = AccumOptimizer(flat(ps_o), accumulation_steps=K, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(flat(ps_r), lr=0.1, momentum=0.9, foreach=False)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(7, 6, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(3 * K)]
    for i, (x, idx) in enumerate(data):
        ours.zero_grad()
        _odd_loss(ps_o, x, idx).backward()
        ours.step()
        (_odd_loss(ps_r, x, idx) / K).backward()
        if (i + 1) % K == 0:
            ref.step()
            for a, b in zip(flat(ps_o), flat(ps_r)):
                ga, gb = a.grad, b.grad
                if ga.is_sparse:
                    ga, gb = ga.to_dense(), gb.to_dense()
                # The complex param drifts by an ulp per update (torch updates it
                # with complex ops, we with the same math on its real view), and
                # its next grads with it; everything else is bit for bit.
                tol = dict(rtol=1e-6, atol=1e-7) if a.is_complex() else dict(rtol=0, atol=0)
                torch.testing.assert_close(ga, gb, **tol)
                torch.testing.assert_close(a.detach(), b.detach(), **tol)
            ref.zero_grad()
    assert ps_o["strided"].grad.data_ptr() != 0


def test_disabled_scaler_unscale_averages_once_and_refuses_inside_a_window():
    """`GradScaler(enabled=False).unscale_` with K > 1 leaves the mean gradient
    (the `enabled=use_amp` switch must not change what clipping sees), a second
    call does not divide again, and inside a window it raises."""
    K = 4
    m = make_model("mlp")
    opt = AccumOptimizer(m.parameters(), accumulation_steps=K, **OPT)
    scaler = GradScaler("cpu", enabled=False)
    batches = make_batches("mlp", K)
    total = None
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        if i < K - 1:
            with pytest.raises(RuntimeError, match="inside an accumulation window"):
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    total = [p.grad.clone() for p in m.parameters()]
    scaler.unscale_(opt)
    scaler.unscale_(opt)
    for p, t in zip(m.parameters(), total):
        torch.testing.assert_close(p.grad, t / K, rtol=0, atol=0)



@pytest.mark.parametrize("grads", ["sparse-only", "none"])
def test_disabled_scaler_unscale_at_a_boundary_without_dense_grads(grads):
    """A boundary whose grads are all sparse (an nn.Embedding(sparse=True)
    model) or all None: torch's disabled unscale_ does nothing; ours takes
    1/K on the sparse values (the reference's mean) and never fails on the
    empty dense list."""
    K = 2
    torch.manual_seed(0)
    ours, ref = nn.Embedding(7, 3, sparse=True), nn.Embedding(7, 3, sparse=True)
    ref.load_state_dict(ours.state_dict())
    opt = AccumOptimizer(ours.parameters(), lr=0.1, momentum=0.9, accumulation_steps=K)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scaler, ref_scaler = GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)
    for i in range(K):
        x = torch.randint(0, 7, (4,), generator=gen)
        if grads == "sparse-only":
            ours(x).square().sum().backward()
            (ref(x).square().sum() / K).backward()
        if i < K - 1:
            scaler.step(opt)
            scaler.update()
    scaler.unscale_(opt)
    ref_scaler.unscale_(ref_opt)
    if grads == "none":
        assert ours.weight.grad is None
    else:
        torch.testing.assert_close(ours.weight.grad.to_dense(), ref.weight.grad.to_dense(), rtol=0, atol=0)
    scaler.step(opt)
    ref_scaler.step(ref_opt)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)

def test_clip_grad_norm_without_scaler_sees_the_mean():
    """The documented way to clip without a scaler: `opt.clip_grad_norm_` at a
    boundary returns the norm of the mean gradient (the reference's), raises
    inside a window, and the step leaves the clipped mean in `.grad`."""
    K = 4
    ours_m, ref_m = parity_pair("mlp")
    batches = make_batches("mlp", K)
    opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **OPT)
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.mse_loss(ours_m(x), y).backward()
        (F.mse_loss(ref_m(x), y) / K).backward()
        if i < K - 1:
            with pytest.raises(RuntimeError, match="inside an accumulation window"):
                opt.clip_grad_norm_(0.1)
            opt.step()
    ours_norm = opt.clip_grad_norm_(0.1)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_m.parameters(), 0.1)
    assert ref_norm > 0.1
    torch.testing.assert_close(ours_norm, ref_norm, rtol=1e-6, atol=0)
    opt.step()
    torch.optim.SGD(ref_m.parameters(), **OPT).step()
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)


def test_average_then_unscale_divides_by_k_once():
    """`opt.average_grads_()` and then an enabled `scaler.unscale_(opt)` (or
    the reverse) apply 1/K once: the grads end as the reference's."""
    K, scale = 4, 2.0**10
    ours_m, ref_m = parity_pair("mlp")
    batches = make_batches("mlp", K)
    opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **OPT)
    s_ours = GradScaler("cpu", init_scale=scale)
    s_ref = torch.amp.GradScaler("cpu", init_scale=scale)
    ref = torch.optim.SGD(ref_m.parameters(), foreach=False, **OPT)
    for x, y in batches:
        opt.zero_grad()
        s_ours.scale(F.mse_loss(ours_m(x), y)).backward()
        s_ref.scale(F.mse_loss(ref_m(x), y) / K).backward()
        if not opt.is_accumulation_boundary:
            s_ours.step(opt)
            s_ours.update()
    opt.average_grads_()
    s_ours.unscale_(opt)
    s_ref.unscale_(ref)
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    s_ours.step(opt)
    s_ref.step(ref)
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)

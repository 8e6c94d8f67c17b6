"""Fused clipping: ``scaler.clip_grad_norm_(opt, max_norm)`` and
``opt.clip_grad_norm_(max_norm)`` against the reference loop ``(loss / K)``,
scaled backward, ``unscale_``, ``torch.nn.utils.clip_grad_norm_``, step.

The norm is summed in another order than torch's, so the coefficient of a
clipped window may differ by an ulp: parameters are compared within fp32
tolerance, norms within 1e-6 relative; skip decisions and the scale history
must be identical.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import DEVICES, assert_params_changed, make_batches, make_mlp, parity_pair, run_ours, run_ref
from torch_fastaccum import AccumOptimizer, GradScaler

OPT = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
UPDATES = 100
# Per (model, K, norm): about the median of the reference's window norms, so
# that some windows clip and others do not (asserted below: never vacuous).
CLIP = {("mlp", 1, 2.0): 0.9, ("mlp", 1, math.inf): 0.33, ("mlp", 4, 2.0): 0.45, ("mlp", 4, math.inf): 0.19,
        ("cnn", 1, 2.0): 0.5, ("cnn", 1, math.inf): 0.3, ("cnn", 4, 2.0): 0.25, ("cnn", 4, math.inf): 0.15}


def _scalers(device):
    kw = dict(init_scale=2.0**12, growth_interval=7)
    return GradScaler(device, **kw), torch.amp.GradScaler(device, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fused_clip_matches_reference_loop(kind, K, norm_type, device):
    ours_m, ref_m = parity_pair(kind, device=device)
    before = [p.detach().clone() for p in ours_m.parameters()]
    batches = make_batches(kind, K * UPDATES, device=device)
    loss_fn = F.cross_entropy if kind == "cnn" else F.mse_loss
    # Windows 3, 40 and 41 overflow (inf, nan, -inf): skipped, scale backs off.
    inject = {3 * K: "inf", 40 * K + K - 1: "nan", 41 * K: "-inf"}
    clip = CLIP[(kind, K, norm_type)]
    s_ours, s_ref = _scalers(device)
    kw = dict(opt_kwargs=OPT, loss_fn=loss_fn, inject=inject, clip=clip, clip_norm_type=norm_type)
    _, t_ours = run_ours(ours_m, batches, K, scaler=s_ours, fused_clip=True, **kw)
    _, t_ref = run_ref(ref_m, batches, K, scaler=s_ref, **kw)

    assert t_ours.skipped == t_ref.skipped and sum(t_ref.skipped) == 3
    assert t_ours.scales == t_ref.scales
    finite = [n.item() for n in t_ref.norms if torch.isfinite(n)]
    assert any(n > clip for n in finite) and any(n < clip for n in finite), "clipping must be active on some windows only"
    for w, (a, b) in enumerate(zip(t_ours.norms, t_ref.norms)):
        assert a.device == b.device and a.dtype == b.dtype and a.shape == ()
        if torch.isfinite(b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m: f"window {w} norm: {m}")
        else:
            assert not torch.isfinite(a), f"window {w}: the reference's norm is {b}, ours {a}"
    for p, q in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert_params_changed(before, ours_m)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("K", [1, 4])
def test_opt_clip_without_scaler_matches_reference_loop(K, norm_type):
    ours_m, ref_m = parity_pair("mlp")
    batches = make_batches("mlp", K * 30)
    clip = CLIP[("mlp", K, norm_type)]
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=OPT, clip=clip, clip_norm_type=norm_type)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=OPT, clip=clip, clip_norm_type=norm_type)
    assert any(n > clip for n in t_ref.norms) and any(n < clip for n in t_ref.norms)
    for a, b in zip(t_ours.norms, t_ref.norms):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for w, (ga, gb) in enumerate(zip(t_ours.grads_after, t_ref.grads_after)):  # the clipped mean
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"window {w} .grad: {m}")
    for p, q in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _boundary(K=4, groups=False, **opt_kw):
    """A model at the boundary of a window, its optimizer and scaler."""
    m = make_mlp()
    params = [{"params": [m[0].weight, m[0].bias]}, {"params": list(m[2].parameters()), "lr": 0.2}] \
        if groups else m.parameters()
    opt = AccumOptimizer(params, lr=0.1, momentum=0.9, accumulation_steps=K, **opt_kw)
    g = torch.Generator().manual_seed(5)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    for _ in range(K - 1):  # counting micro-batches, each adding its grads
        opt.step()
        for p in m.parameters():
            p.grad = p.grad + torch.randn(p.shape, generator=g)
    return m, opt


def _copy_with_grads(m):
    ref = copy.deepcopy(m)  # deepcopy leaves .grad behind
    for p, q in zip(m.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    return ref


def _scaler(init_scale=2.0**16):
    s = GradScaler("cpu", init_scale=init_scale)
    s.scale(torch.ones(()))  # creates the scale, as the first scaled loss does
    return s


def _snapshot(m, opt):
    return ([p.detach().clone() for p in m.parameters()], [p.grad.clone() for p in m.parameters()],
            copy.deepcopy(opt.state_dict()), opt._micro_step)


def _same_snapshot(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    assert a[2]["accumulation"] == b[2]["accumulation"] and a[3] == b[3]


BAD = [
    (dict(max_norm=0.0), ValueError, "max_norm must be positive"),
    (dict(max_norm=-1.0), ValueError, "max_norm must be positive"),
    (dict(max_norm=float("nan")), ValueError, "max_norm must be positive and finite"),
    (dict(max_norm=float("inf")), ValueError, "max_norm must be positive and finite"),
    (dict(max_norm="1"), ValueError, "max_norm must be a number"),
    (dict(max_norm=1.0, norm_type=1.0), ValueError, "supports norm_type 2.0 and inf"),
    (dict(max_norm=1.0, norm_type="fro"), ValueError, "norm_type must be 2.0 or inf"),
]


@pytest.mark.parametrize("with_scaler", [False, True])
@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_raise_before_anything_changes(kwargs, exc, match, with_scaler):
    m, opt = _boundary()
    before = _snapshot(m, opt)
    with pytest.raises(exc, match=match):
        if with_scaler:
            _scaler().clip_grad_norm_(opt, **kwargs)
        else:
            opt.clip_grad_norm_(**kwargs)
    _same_snapshot(before, _snapshot(m, opt))
    assert opt._window.clip_coef is None


@pytest.mark.parametrize("with_scaler", [False, True])
def test_inside_a_window_and_twice_raise_before_anything_changes(with_scaler):
    m, opt = _boundary(K=4)
    scaler = _scaler()
    clip = (lambda: scaler.clip_grad_norm_(opt, 0.1)) if with_scaler else (lambda: opt.clip_grad_norm_(0.1))
    # inside a window: one counting step back
    m2 = make_mlp()
    opt2 = AccumOptimizer(m2.parameters(), lr=0.1, accumulation_steps=4)
    for p in m2.parameters():
        p.grad = torch.ones_like(p)
    snap = _snapshot(m2, opt2)
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        scaler.clip_grad_norm_(opt2, 0.1) if with_scaler else opt2.clip_grad_norm_(0.1)
    _same_snapshot(snap, _snapshot(m2, opt2))
    # twice in one window
    clip()
    snap = _snapshot(m, opt)
    with pytest.raises(RuntimeError, match="already called in this accumulation window"):
        clip()
    _same_snapshot(snap, _snapshot(m, opt))


def test_after_step_raises():
    m, opt = _boundary(K=1)
    scaler = _scaler()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.clip_grad_norm_(opt, 0.1)


def test_after_unscale_clips_the_unscaled_mean():
    """unscale_ then clip_grad_norm_ (torch's order) works too: the norm is of
    the grads as they are, and the step applies only the coefficient."""
    K, clip = 4, 0.3
    ours_m, ref_m = parity_pair("mlp")
    batches = make_batches("mlp", K * 6)
    s_ours, s_ref = _scalers("cpu")
    opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **OPT)
    norms = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        s_ours.scale(F.mse_loss(ours_m(x), y)).backward()
        if opt.is_accumulation_boundary:
            s_ours.unscale_(opt)
            norms.append(s_ours.clip_grad_norm_(opt, clip))
        s_ours.step(opt)
        s_ours.update()
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=OPT, scaler=s_ref, clip=clip)
    assert any(n > clip for n in t_ref.norms)
    for a, b in zip(norms, t_ref.norms):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for p, q in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_scaler", [False, True])
def test_error_if_nonfinite_raises_as_torch(with_scaler):
    m, opt = _boundary(K=2)
    m[0].weight.grad[0, 0] = float("inf")
    ref = _copy_with_grads(m)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, error_if_nonfinite=True)
    snap = _snapshot(m, opt)
    with pytest.raises(RuntimeError) as ours:
        if with_scaler:
            _scaler().clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)
        else:
            opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    _same_snapshot(snap, _snapshot(m, opt))
    assert opt._window.clip_coef is None


def test_param_groups_share_one_norm():
    m, opt = _boundary(K=1, groups=True)
    ref = _copy_with_grads(m)
    norm = opt.clip_grad_norm_(0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    assert ref_norm > 0.05
    ref_opt = torch.optim.SGD([{"params": [ref[0].weight, ref[0].bias]}, {"params": list(ref[2].parameters()), "lr": 0.2}],
                              lr=0.1, momentum=0.9)
    opt.step()
    ref_opt.step()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_writeback_off_leaves_the_scaled_sum():
    """grad_writeback=False: the clip changes the update, not .grad."""
    m, opt = _boundary(K=2, grad_writeback=False)
    grads = [p.grad.clone() for p in m.parameters()]
    scaler = _scaler(8.0)
    norm = scaler.clip_grad_norm_(opt, 1e-3)
    assert norm > 1e-3
    scaler.step(opt)
    for p, g in zip(m.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_complex_params_use_the_norm_of_their_real_view():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
    q = torch.nn.Parameter(torch.randn(7))
    for t in (p, q):
        t.grad = torch.randn_like(t)
    ref_p, ref_q = (torch.nn.Parameter(t.detach().clone()) for t in (p, q))
    ref_p.grad, ref_q.grad = p.grad.clone(), q.grad.clone()
    opt = AccumOptimizer([p, q], lr=0.1, momentum=0.9)
    norm = opt.clip_grad_norm_(0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_([ref_p, ref_q], 0.5)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    opt.step()
    torch.optim.SGD([ref_p, ref_q], lr=0.1, momentum=0.9).step()
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-7)


def test_sparse_grads_norm_of_coalesced_values():
    """torch's clip_grad_norm_ cannot take sparse grads; ours counts their
    coalesced values (duplicates added first) and scales the sparse update."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 2)
    ref_emb, ref_lin = copy.deepcopy(emb), copy.deepcopy(lin)
    for e, l in ((emb, lin), (ref_emb, ref_lin)):
        l(e(torch.tensor([1, 2, 2, 7]))).square().sum().backward()
    assert not emb.weight.grad.is_coalesced()
    opt = AccumOptimizer(list(emb.parameters()) + list(lin.parameters()), lr=0.1)
    norm = opt.clip_grad_norm_(0.5)
    dense = [ref_emb.weight.grad.to_dense(), ref_lin.weight.grad, ref_lin.bias.grad]
    ref_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in dense]))
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    assert ref_norm > 0.5
    coef = 0.5 / (ref_norm + 1e-6)
    opt.step()
    for p, g in ((emb.weight, dense[0]), (lin.weight, dense[1]), (lin.bias, dense[2])):
        ref_p = {id(emb.weight): ref_emb.weight, id(lin.weight): ref_lin.weight, id(lin.bias): ref_lin.bias}[id(p)]
        torch.testing.assert_close(p, ref_p - 0.1 * g * coef, rtol=1e-6, atol=1e-7)


def test_no_grads_gives_zero_and_steps_nothing():
    p = torch.nn.Parameter(torch.randn(3))
    opt = AccumOptimizer([p], lr=0.1)
    assert opt.clip_grad_norm_(1.0).item() == 0.0
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before)


def test_norm_does_not_depend_on_threads():
    """Per-chunk partials combined in chunk order: the same bits at any thread
    count and on every run (a list large enough to run in parallel)."""
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g) * 100 for n in (300_000, 17, 65_537, 1_000_000)]
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for norm_type in (2.0, math.inf):
                out = torch.empty(())
                torch.ops.fastaccum.norm_check_(grads, torch.zeros(()), out, norm_type=norm_type, factor=0.37)
                outs.append(out.item())
    finally:
        torch.set_num_threads(old)
    assert outs[:2] == outs[2:4] == outs[4:6] == outs[6:]
    ref = torch.cat([(x * 0.37) for x in grads])
    assert math.isclose(outs[0], float(ref.double().square().sum()), rel_tol=1e-6)
    assert outs[1] == float(ref.abs().max())


def test_returned_norm_is_lazy_on_cuda_free_of_host_sync():
    """No .item() inside the call: the returned tensor is the device value
    (on the CPU this only shows it is a tensor of the grads' device)."""
    m, opt = _boundary(K=1)
    norm = _scaler().clip_grad_norm_(opt, 0.1)
    assert isinstance(norm, torch.Tensor) and norm.device.type == "cpu" and norm.dtype == torch.float32


def test_fp16_grads_with_a_scaler_raise_as_torchs_unscale():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float16))
    p.grad = torch.randn(4, dtype=torch.float16)
    opt = AccumOptimizer([p], lr=0.1)
    grad = p.grad.clone()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
        _scaler().clip_grad_norm_(opt, 1.0)
    assert torch.equal(p.grad, grad) and opt._window.clip_coef is None
    assert opt.clip_grad_norm_(1e-3) > 1e-3  # without a scaler there is nothing to unscale

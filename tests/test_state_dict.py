"""state_dict / load_state_dict: SGD's format, checkpoint interchange with
torch.optim.SGD in both directions, and resuming mid-accumulation-window."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from _helpers import (
    DEVICES,
    assert_params_close,
    make_batches,
    make_mlp,
    run_ours,
    run_ref,
)
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")

KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)


def _roundtrip(obj):
    """Through bytes, as a checkpoint read by a new process would be (torch.load's
    default weights_only=True: the state dict must be plain data)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def test_state_dict_format_matches_sgd():
    K = 2
    ours_m = make_mlp(seed=1)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * 10, seed=2)
    ours, _ = run_ours(ours_m, batches, K, opt_kwargs=KW)
    ref, _ = run_ref(ref_m, batches, K, opt_kwargs=KW)
    sd, rsd = ours.state_dict(), ref.state_dict()

    assert "accumulation" in sd
    assert set(sd) == set(rsd) | {"accumulation"}
    # per-param state: SGD's key only
    assert sorted(sd["state"]) == sorted(rsd["state"])
    for idx, s in sd["state"].items():
        assert set(s) == {"momentum_buffer"}, s.keys()
        torch.testing.assert_close(s["momentum_buffer"], rsd["state"][idx]["momentum_buffer"], rtol=1e-5, atol=1e-7)
    # param groups: SGD's keys (+ accumulation_steps), same param indices
    assert len(sd["param_groups"]) == len(rsd["param_groups"])
    for g, rg in zip(sd["param_groups"], rsd["param_groups"]):
        assert set(rg) - {"foreach", "fused", "differentiable"} <= set(g)
        assert g["accumulation_steps"] == K
        assert g["params"] == rg["params"]
        for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
            assert g[key] == rg[key], key
    _roundtrip(sd)  # plain data: loads with weights_only=True


def test_state_dict_momentum_zero_has_no_state():
    m = make_mlp(seed=1)
    r = copy.deepcopy(m)
    batches = make_batches("mlp", 6, seed=2)
    ours, _ = run_ours(m, batches, 2, opt_kwargs=dict(lr=0.1))
    ref, _ = run_ref(r, batches, 2, opt_kwargs=dict(lr=0.1))
    assert ref.state_dict()["state"] == {}
    assert ours.state_dict()["state"] == {}


def test_state_dict_micro_counter_mid_window():
    """The micro-batch counter is part of the state dict: two optimizers with the
    same momentum state but at different positions in the window differ."""
    K = 4
    m = make_mlp(seed=1)
    batches = make_batches("mlp", K * 3 + 2, seed=2)
    opt, _ = run_ours(m, batches[: K * 3], K, opt_kwargs=KW)
    at_boundary = copy.deepcopy(opt.state_dict()["accumulation"])
    run_ours(m, batches[K * 3 :], K, opt=opt, start=K * 3)
    mid = opt.state_dict()["accumulation"]
    assert mid != at_boundary
    assert not opt.is_accumulation_boundary
    # load into a fresh optimizer: it knows where in the window it is
    fresh = AccumOptimizer(make_mlp(seed=1).parameters(), accumulation_steps=K, **KW)
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    assert fresh.state_dict()["accumulation"] == mid
    fresh.step()  # micro-batch 2 of the window (params have no grad: nothing to do)
    assert fresh.is_accumulation_boundary


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_sgd_checkpoint_into_accum_optimizer(K, device):
    """Train with SGD, checkpoint, continue with AccumOptimizer == continue with SGD."""
    m = make_mlp(seed=5, device=device)
    batches = make_batches("mlp", K * 50, seed=6, device=device)
    first, second = batches[: K * 20], batches[K * 20 :]
    sgd, _ = run_ref(m, first, K, opt_kwargs=KW)
    ckpt = _roundtrip({"model": m.state_dict(), "opt": sgd.state_dict()})

    ref_m = m  # SGD continues on the original model
    run_ref(ref_m, second, K, opt=sgd, start=K * 20)

    ours_m = make_mlp(seed=99, device=device)  # different init: everything comes from the checkpoint
    ours_m.load_state_dict(ckpt["model"])
    ours = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **{**KW, "lr": 0.5})
    ours.load_state_dict(ckpt["opt"])
    assert ours.param_groups[0]["lr"] == KW["lr"]  # hyper-parameters from the checkpoint
    assert ours.param_groups[0]["accumulation_steps"] == K
    run_ours(ours_m, second, K, opt=ours, start=K * 20)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_accum_checkpoint_into_sgd(K, device):
    """Train with AccumOptimizer, checkpoint at a boundary, continue with SGD ==
    continue with AccumOptimizer == uninterrupted reference."""
    m = make_mlp(seed=5, device=device)
    batches = make_batches("mlp", K * 50, seed=6, device=device)
    first, second = batches[: K * 20], batches[K * 20 :]
    ours, _ = run_ours(m, first, K, opt_kwargs=KW)
    ckpt = _roundtrip({"model": m.state_dict(), "opt": ours.state_dict()})

    ours_m = m  # AccumOptimizer continues on the original model
    run_ours(ours_m, second, K, opt=ours, start=K * 20)

    sgd_m = make_mlp(seed=99, device=device)
    sgd_m.load_state_dict(ckpt["model"])
    sgd = torch.optim.SGD(sgd_m.parameters(), lr=0.5, foreach=False)
    sgd.load_state_dict(ckpt["opt"])
    assert sgd.param_groups[0]["momentum"] == KW["momentum"]
    run_ref(sgd_m, second, K, opt=sgd, start=K * 20)
    assert_params_close(sgd_m.parameters(), ours_m.parameters())

    full_m = make_mlp(seed=5, device=device)
    run_ref(full_m, batches, K, opt_kwargs=KW)
    assert_params_close(sgd_m.parameters(), full_m.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos", [1, 3], ids=["after-1-of-4", "after-3-of-4"])
def test_resume_mid_window(pos, device):
    """Save opt.state_dict() + params + the accumulated .grad mid-window; a fresh
    model/optimizer (as in a new process) loads them, restores the grads and
    continues: final params equal to the uninterrupted run."""
    K = 4
    stop = K * 15 + pos
    batches = make_batches("mlp", K * 40, seed=6, device=device)

    full_m = make_mlp(seed=5, device=device)
    run_ours(full_m, batches, K, opt_kwargs=KW)

    m = make_mlp(seed=5, device=device)
    opt, _ = run_ours(m, batches[:stop], K, opt_kwargs=KW)
    ckpt = _roundtrip(
        {
            "model": m.state_dict(),
            "opt": opt.state_dict(),
            "grads": [p.grad for p in m.parameters()],
        }
    )
    del m, opt

    m2 = make_mlp(seed=77, device=device)
    m2.load_state_dict(ckpt["model"])
    opt2 = AccumOptimizer(m2.parameters(), accumulation_steps=K, lr=1.0)
    opt2.load_state_dict(ckpt["opt"])
    for p, g in zip(m2.parameters(), ckpt["grads"]):
        p.grad = g
    assert not opt2.is_accumulation_boundary or pos == K - 1
    run_ours(m2, batches[stop:], K, opt=opt2, start=stop)
    assert_params_close(m2.parameters(), full_m.parameters(), rtol=0, atol=0)


@pytest.mark.parametrize("poison_before_save", [True, False], ids=["inf-before-save", "inf-after-save"])
def test_resume_mid_window_with_scaler(poison_before_save):
    """The same, with a GradScaler and an inf in the interrupted window: the
    window must still be skipped after the resume, exactly as in the
    uninterrupted run and the reference."""
    K = 4
    kw = dict(lr=0.05, momentum=0.9, nesterov=True)
    stop = K * 15 + 2
    window = K * 15
    inject = {window + (0 if poison_before_save else 3): "inf", 0: "inf"}
    batches = make_batches("mlp", K * 40, seed=6)

    full_m = make_mlp(seed=5)
    _, t_full = run_ours(full_m, batches, K, opt_kwargs=kw, scaler=GradScaler("cpu", init_scale=2.0**10, growth_interval=3), inject=inject)
    ref_m = make_mlp(seed=5)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3), inject=inject)
    assert t_full.skipped == t_ref.skipped and t_full.skipped[15]

    m = make_mlp(seed=5)
    s = GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    opt, t = run_ours(m, batches[:stop], K, opt_kwargs=kw, scaler=s, inject=inject)
    ckpt = _roundtrip({"model": m.state_dict(), "opt": opt.state_dict(), "scaler": s.state_dict(),
                       "grads": [p.grad for p in m.parameters()]})
    m2 = make_mlp(seed=0)
    m2.load_state_dict(ckpt["model"])
    opt2 = AccumOptimizer(m2.parameters(), accumulation_steps=K, **kw)
    opt2.load_state_dict(ckpt["opt"])
    s2 = GradScaler("cpu")
    s2.load_state_dict(ckpt["scaler"])
    for p, g in zip(m2.parameters(), ckpt["grads"]):
        p.grad = g
    run_ours(m2, batches[stop:], K, opt=opt2, scaler=s2, inject=inject, trace=t, start=stop)
    assert t.skipped == t_full.skipped
    assert t.scales == t_full.scales
    assert_params_close(m2.parameters(), full_m.parameters(), rtol=0, atol=0)
    assert_params_close(m2.parameters(), ref_m.parameters())


def test_load_own_state_dict_is_identity():
    """load_state_dict(state_dict()) mid-run changes nothing about the continuation."""
    K = 2
    batches = make_batches("mlp", K * 30, seed=1)
    a = make_mlp(seed=3)
    b = copy.deepcopy(a)
    oa, _ = run_ours(a, batches[:21], K, opt_kwargs=KW)
    ob, _ = run_ours(b, batches[:21], K, opt_kwargs=KW)
    ob.load_state_dict(copy.deepcopy(ob.state_dict()))
    run_ours(a, batches[21:], K, opt=oa, start=21)
    run_ours(b, batches[21:], K, opt=ob, start=21)
    assert_params_close(a.parameters(), b.parameters(), rtol=0, atol=0)


def test_partial_state_checkpoint_interchange():
    """A param that never had a grad has no state in SGD's checkpoint; after the
    load, its first real update with AccumOptimizer must set b = g (first step),
    while the others continue their momentum."""
    K = 2
    torch.manual_seed(0)
    m = make_mlp(seed=3)
    extra = torch.nn.Parameter(torch.randn(3))
    batches = make_batches("mlp", K * 20, seed=4)

    def loss_with_extra(out, y, use_extra):
        loss = F.mse_loss(out, y)
        return loss + (extra * out.mean()).pow(2).sum() if use_extra else loss

    def train(opt, model, bs, start, ours):
        for j, (x, y) in enumerate(bs):
            i = start + j
            use_extra = i >= K * 10  # extra joins in the second half
            if ours:
                opt.zero_grad()
            loss = loss_with_extra(model(x), y, use_extra)
            (loss if ours else loss / K).backward()
            if ours:
                opt.step()
            elif (i + 1) % K == 0:
                opt.step()
                opt.zero_grad()

    params = list(m.parameters()) + [extra]
    sgd = torch.optim.SGD(params, foreach=False, **KW)
    train(sgd, m, batches[: K * 10], 0, ours=False)
    sd = _roundtrip(sgd.state_dict())
    assert len(sd["state"]) == len(params) - 1  # no state for `extra`
    snapshot = [p.detach().clone() for p in params]

    train(sgd, m, batches[K * 10 :], K * 10, ours=False)
    ref_final = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, snapshot):
            p.copy_(s)
            p.grad = None
    ours = AccumOptimizer(params, accumulation_steps=K, **KW)
    ours.load_state_dict(sd)
    train(ours, m, batches[K * 10 :], K * 10, ours=True)
    assert_params_close(params, ref_final)

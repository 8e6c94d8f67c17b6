"""Drop-in compatibility with torch.optim.SGD (README, Usage): hooks,
deepcopy/pickle, LR schedulers, tensor lr, complex params, sparse grads,
params without grads, several param groups, foreach/fused accepted, strides,
accumulate(model) (incl. a 1-process DDP)."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from _helpers import (
    DEVICES,
    Trace,
    assert_params_changed,
    assert_params_close,
    make_batches,
    make_mlp,
    params_of,
    requires_cuda,
    run_ours,
    run_ref,
)
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")

KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)


# Hooks ---------------------------------------------------------------------------


def test_step_hooks_fire_once_per_step_call():
    K = 3
    m = make_mlp(seed=0)
    opt = AccumOptimizer(m.parameters(), accumulation_steps=K, **KW)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, kw: calls.append(("pre", id(o))))
    h2 = opt.register_step_post_hook(lambda o, a, kw: calls.append(("post", id(o))))
    g_pre = register_optimizer_step_pre_hook(lambda o, a, kw: calls.append(("gpre", id(o))))
    g_post = register_optimizer_step_post_hook(lambda o, a, kw: calls.append(("gpost", id(o))))
    try:
        batches = make_batches("mlp", 7, seed=1)
        run_ours(m, batches, K, opt=opt)
        assert [c[0] for c in calls].count("pre") == 7
        assert [c[0] for c in calls].count("post") == 7
        assert [c[0] for c in calls].count("gpre") == 7
        assert [c[0] for c in calls].count("gpost") == 7
        # driven by the GradScaler: still exactly one per scaler.step() call
        calls.clear()
        scaler = GradScaler("cpu", init_scale=2.0**8)
        run_ours(m, make_batches("mlp", 5, seed=2), K, opt=opt, scaler=scaler, start=7, inject={8: "inf"})
        assert [c[0] for c in calls].count("pre") == 5
        assert [c[0] for c in calls].count("post") == 5
    finally:
        for h in (h1, h2, g_pre, g_post):
            h.remove()


def test_state_dict_hooks_fire_once_per_call():
    m = make_mlp(seed=0)
    opt = AccumOptimizer(m.parameters(), accumulation_steps=2, **KW)
    run_ours(m, make_batches("mlp", 5, seed=1), 2, opt=opt)
    counts = {"sd_pre": 0, "sd_post": 0, "load_pre": 0, "load_post": 0}

    def bump(key):
        def hook(*args):
            counts[key] += 1

        return hook

    opt.register_state_dict_pre_hook(bump("sd_pre"))
    opt.register_state_dict_post_hook(bump("sd_post"))
    opt.register_load_state_dict_pre_hook(bump("load_pre"))
    opt.register_load_state_dict_post_hook(bump("load_post"))
    sd = opt.state_dict()
    assert counts == {"sd_pre": 1, "sd_post": 1, "load_pre": 0, "load_post": 0}
    opt.load_state_dict(sd)
    assert counts == {"sd_pre": 1, "sd_post": 1, "load_pre": 1, "load_post": 1}


# deepcopy / pickle ---------------------------------------------------------------


def _assert_same_optimizer(a: AccumOptimizer, b: AccumOptimizer):
    assert type(a) is type(b)
    assert a.defaults == b.defaults
    assert a.defaults["accumulation_steps"] == b.defaults["accumulation_steps"]
    assert len(a.param_groups) == len(b.param_groups)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
        assert len(ga["params"]) == len(gb["params"])
        for pa, pb in zip(ga["params"], gb["params"]):
            assert torch.equal(pa, pb)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["accumulation"] == sb["accumulation"]
    assert sorted(sa["state"]) == sorted(sb["state"])
    for idx in sa["state"]:
        for k in sa["state"][idx]:
            assert torch.equal(sa["state"][idx][k], sb["state"][idx][k])
    assert a.is_accumulation_boundary == b.is_accumulation_boundary


def _copy_mid_window(how):
    K = 4
    m = make_mlp(seed=1)
    opt = AccumOptimizer(
        [{"params": list(m.parameters())[:2]}, {"params": list(m.parameters())[2:], "lr": 0.02, "momentum": 0.5}],
        accumulation_steps=K,
        **KW,
    )
    batches = make_batches("mlp", K * 30, seed=2)
    stop = K * 10 + 2
    run_ours(m, batches[:stop], K, opt=opt)
    if how == "deepcopy":
        m2, opt2 = copy.deepcopy((m, opt))
    else:
        m2, opt2 = pickle.loads(pickle.dumps((m, opt)))
    # nn.Parameter's deepcopy/pickle drop .grad (torch's behaviour, not ours):
    # carry the window's accumulated grads over by hand
    for p2, p in zip(m2.parameters(), m.parameters()):
        assert p2.grad is None
        p2.grad = p.grad.clone()
    return K, batches, stop, (m, opt), (m2, opt2)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_keeps_settings_state_and_counter(how):
    K, batches, stop, (m, opt), (m2, opt2) = _copy_mid_window(how)
    _assert_same_optimizer(opt, opt2)
    # the copy's params are the copied model's (identity preserved within one copy)
    assert all(p is q for p, q in zip(opt2.param_groups[0]["params"], list(m2.parameters())[:2]))
    # continuing both gives identical results
    run_ours(m, batches[stop:], K, opt=opt, start=stop)
    run_ours(m2, batches[stop:], K, opt=opt2, start=stop)
    assert_params_close(m.parameters(), m2.parameters(), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_keeps_amp_contract(how):
    """A copied optimizer driven by our GradScaler (with an inf in the window that
    is in progress at copy time, and in a later window) behaves like the
    original: the copy must keep the settings that route the scaler's step
    (skip and micro-batch counting included)."""
    K, batches, stop, (m, opt), (m2, opt2) = _copy_mid_window(how)
    inject = {stop: "inf", stop + 4 * K + 1: "nan"}
    s1 = GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    s2 = GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    _, t1 = run_ours(m, batches[stop:], K, opt=opt, scaler=s1, start=stop, inject=inject)
    _, t2 = run_ours(m2, batches[stop:], K, opt=opt2, scaler=s2, start=stop, inject=inject)
    assert t1.skipped == t2.skipped and sum(t1.skipped) == 2
    assert t1.scales == t2.scales
    assert_params_close(m.parameters(), m2.parameters(), rtol=0, atol=0)
    assert getattr(opt2, "_step_supports_amp_scaling", False) == getattr(opt, "_step_supports_amp_scaling", False)


# LR schedulers -----------------------------------------------------------------

N_SCHED = 60

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 30], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=N_SCHED),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + 0.1 * e)),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=20),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=N_SCHED),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=5),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95)],
        milestones=[5],
    ),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers(name, tensor_lr):
    """scheduler.step() once per real update (every K micro-batches) in both
    loops; OneCycleLR and CyclicLR also cycle the momentum hyper-parameter."""
    K = 2
    kw = dict(KW)
    kw["lr"] = torch.tensor(0.05) if tensor_lr else 0.05
    ours_m = make_mlp(seed=2)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * N_SCHED, seed=3)
    ours, _ = run_ours(ours_m, batches, K, opt_kwargs=copy.deepcopy(kw), scheduler_fn=SCHEDULERS[name])
    ref, _ = run_ref(ref_m, batches, K, opt_kwargs=copy.deepcopy(kw), scheduler_fn=SCHEDULERS[name])
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]))
    assert float(ours.param_groups[0]["lr"]) != 0.05  # premise: the scheduler did something
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    assert_params_close(ours_m.parameters(), ref_m.parameters())


def test_reduce_lr_on_plateau():
    K = 2
    ours_m = make_mlp(seed=2)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * N_SCHED, seed=3)
    ours = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **KW)
    ref = torch.optim.SGD(ref_m.parameters(), foreach=False, **KW)
    s_ours = torch.optim.lr_scheduler.ReduceLROnPlateau(ours, patience=1, factor=0.5, threshold=0.5)
    s_ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref, patience=1, factor=0.5, threshold=0.5)
    t_ours, t_ref = Trace(), Trace()
    for w in range(N_SCHED):
        chunk = batches[w * K : (w + 1) * K]
        run_ours(ours_m, chunk, K, opt=ours, start=w * K, trace=t_ours)
        run_ref(ref_m, chunk, K, opt=ref, start=w * K, trace=t_ref)
        s_ours.step(sum(t_ours.losses[-K:]))
        s_ref.step(sum(t_ref.losses[-K:]))
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < KW["lr"]
    assert_params_close(ours_m.parameters(), ref_m.parameters())


# tensor lr ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_tensor_lr(K, device):
    kw = dict(KW, lr=torch.tensor(0.05, device=device))
    ours_m = make_mlp(seed=2, device=device)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * 100, seed=3, device=device)
    ours, _ = run_ours(ours_m, batches, K, opt_kwargs=copy.deepcopy(kw))
    run_ref(ref_m, batches, K, opt_kwargs=copy.deepcopy(kw))
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


def test_tensor_lr_mutated_in_place_between_steps():
    """A tensor lr is read at step time (not cached): fill_() on it takes effect."""
    lr_ours, lr_ref = torch.tensor(0.05), torch.tensor(0.05)
    ours_m = make_mlp(seed=2)
    ref_m = copy.deepcopy(ours_m)
    ours = AccumOptimizer(ours_m.parameters(), lr=lr_ours, momentum=0.9, accumulation_steps=2)
    ref = torch.optim.SGD(ref_m.parameters(), lr=lr_ref, momentum=0.9, foreach=False)
    batches = make_batches("mlp", 40, seed=3)
    for w in range(20):
        lr_ours.fill_(0.05 * (1 + w % 3))
        lr_ref.fill_(0.05 * (1 + w % 3))
        run_ours(ours_m, batches[2 * w : 2 * w + 2], 2, opt=ours, start=2 * w)
        run_ref(ref_m, batches[2 * w : 2 * w + 2], 2, opt=ref, start=2 * w)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


# complex params ------------------------------------------------------------------


class _ComplexNet(nn.Module):
    def __init__(self, seed=0, dtype=torch.complex64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter((torch.randn(6, 4, generator=g) + 1j * torch.randn(6, 4, generator=g)).to(dtype) * 0.3)
        self.b = nn.Parameter((torch.randn(4, generator=g) + 1j * torch.randn(4, generator=g)).to(dtype) * 0.1)
        self.r = nn.Parameter(torch.randn(4, generator=g) * 0.2)  # a real param in the same group

    def forward(self, x):
        return (x.to(self.w.dtype) @ self.w + self.b) * self.r


def _complex_loss(out, y):
    return (out - y).abs().pow(2).mean()


def _complex_batches(n, seed, dtype=torch.complex64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=g), (torch.randn(8, 4, generator=g) + 1j * torch.randn(8, 4, generator=g)).to(dtype))
        for _ in range(n)
    ]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize(
    "kw",
    [dict(KW), dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True), dict(lr=0.05)],
    ids=["momentum-dampening-wd", "nesterov-maximize", "plain"],
)
@pytest.mark.parametrize("K", [1, 4])
def test_complex_params(K, kw, dtype):
    """Complex params: the same math on view_as_real, as torch does."""
    sign = -1.0 if kw.get("maximize") else 1.0
    ours_m = _ComplexNet(seed=1, dtype=dtype)
    ref_m = copy.deepcopy(ours_m)
    init = params_of(ours_m)
    batches = _complex_batches(K * 100, seed=2, dtype=dtype)
    ours, _ = run_ours(ours_m, batches, K, opt_kwargs=kw, loss_fn=_complex_loss, sign=sign)
    run_ref(ref_m, batches, K, opt_kwargs=kw, loss_fn=_complex_loss, sign=sign)
    assert_params_changed(init, ours_m)
    assert ours_m.w.dtype == dtype
    assert_params_close(ours_m.parameters(), ref_m.parameters())
    if kw.get("momentum"):
        assert ours.state[ours_m.w]["momentum_buffer"].dtype == dtype


class _ComplexAsRealNet(nn.Module):
    """_ComplexNet with its complex params stored as real (..., 2) tensors: torch's
    GradScaler cannot unscale complex grads on CPU ("not implemented for
    'ComplexFloat'"), so this is the reference; SGD's complex math is the same
    element-wise math on the real view, so the two must agree."""

    def __init__(self, cnet: _ComplexNet):
        super().__init__()
        self.w = nn.Parameter(torch.view_as_real(cnet.w.detach()).clone())
        self.b = nn.Parameter(torch.view_as_real(cnet.b.detach()).clone())
        self.r = nn.Parameter(cnet.r.detach().clone())

    def forward(self, x):
        w, b = torch.view_as_complex(self.w), torch.view_as_complex(self.b)
        return (x.to(w.dtype) @ w + b) * self.r


def test_complex_params_with_scaler():
    K = 2
    kw = dict(KW)
    ours_m = _ComplexNet(seed=1)
    ref_m = _ComplexAsRealNet(ours_m)
    batches = _complex_batches(K * 60, seed=2)
    inject = {0: "loss_inf", 2 * K + 1: "loss_nan", 30 * K: "nan"}
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=kw, loss_fn=_complex_loss, inject=inject,
                         scaler=GradScaler("cpu", init_scale=2.0**10, growth_interval=3))
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, loss_fn=_complex_loss, inject=inject,
                       scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3))
    assert sum(t_ref.skipped) == 3
    assert t_ours.skipped == t_ref.skipped and t_ours.scales == t_ref.scales
    assert_params_close([torch.view_as_real(ours_m.w), torch.view_as_real(ours_m.b), ours_m.r], list(ref_m.parameters()))


# sparse grads --------------------------------------------------------------------


class _SparseNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.emb = nn.Embedding(30, 5, sparse=True)
            self.lin = nn.Linear(5, 2)

    def forward(self, idx):
        return self.lin(torch.tanh(self.emb(idx)).mean(1))


def _sparse_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    # few indices per batch, with repeats, so rows are touched irregularly
    return [(torch.randint(0, 30, (4, 3), generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.1, momentum=0.9, weight_decay=0.0), dict(lr=0.1), dict(lr=0.1, momentum=0.9, maximize=True, dampening=0.2)],
    ids=["momentum", "plain", "momentum-dampening-maximize"],
)
@pytest.mark.parametrize("K", [1, 3])
def test_sparse_grads(K, kw):
    """nn.Embedding(sparse=True) next to dense params, compared with SGD (whose
    default path handles sparse grads). (weight_decay is not combined with sparse
    grads: torch itself cannot add a dense param to a sparse grad.)"""
    sign = -1.0 if kw.get("maximize") else 1.0
    ours_m = _SparseNet(seed=1)
    ref_m = copy.deepcopy(ours_m)
    init = params_of(ours_m)
    batches = _sparse_batches(K * 60, seed=2)
    run_ours(ours_m, batches, K, opt_kwargs=kw, sign=sign)
    run_ref(ref_m, batches, K, opt_kwargs=kw, sign=sign)
    assert ours_m.emb.weight.grad is None or ours_m.emb.weight.grad.is_sparse
    assert_params_changed(init, ours_m)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("K", [1, 3])
def test_sparse_grads_with_scaler(K):
    """With a GradScaler the sparse grads' values join the inf check: an inf that
    only the sparse grad carries must skip the whole step (dense params too)."""
    kw = dict(lr=0.1, momentum=0.9)
    ours_m = _SparseNet(seed=1)
    ref_m = copy.deepcopy(ours_m)
    batches = _sparse_batches(K * 40, seed=2)

    def poison_sparse(model, i):
        if i in (0, 5 * K + K - 1):
            g = model.emb.weight.grad
            vals = g._values()
            vals.view(-1)[0] = float("inf")

    def ours_loop():
        opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **kw)
        s = GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        hist = []
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            s.scale(F.mse_loss(ours_m(x), y)).backward()
            poison_sparse(ours_m, i)
            s.step(opt)
            s.update()
            if (i + 1) % K == 0:
                hist.append((s.get_scale(), s._get_growth_tracker()))
        return hist

    def ref_loop():
        opt = torch.optim.SGD(ref_m.parameters(), foreach=False, **kw)
        s = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        hist = []
        for i, (x, y) in enumerate(batches):
            s.scale(F.mse_loss(ref_m(x), y) / K).backward()
            poison_sparse(ref_m, i)
            if (i + 1) % K == 0:
                s.step(opt)
                s.update()
                opt.zero_grad()
                hist.append((s.get_scale(), s._get_growth_tracker()))
        return hist

    h_ours, h_ref = ours_loop(), ref_loop()
    assert h_ref[0][0] < 2.0**8  # premise: the first window was skipped
    assert h_ours == h_ref
    assert_params_close(ours_m.parameters(), ref_m.parameters())


# params without grads ------------------------------------------------------------


class _Branchy(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a = nn.Linear(10, 3)
            self.b = nn.Linear(10, 3)  # only used in some windows
            self.unused = nn.Parameter(torch.randn(4))  # never used: grad stays None
        self.use_b = False

    def forward(self, x):
        out = self.a(x)
        return out + self.b(x) if self.use_b else out


@pytest.mark.parametrize("K", [1, 4])
def test_params_with_grad_none_are_skipped(K):
    """Params whose .grad is None are skipped, as SGD does: `unused` never moves
    and gets no state; `b` (used in every third window only) keeps its momentum
    buffer untouched while it has no grad."""
    ours_m = _Branchy(seed=1)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * 60, seed=2)

    def branch(i, model, opt=None):
        model.use_b = (i // K) % 3 == 0

    ours_opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **KW)
    ref_opt = torch.optim.SGD(ref_m.parameters(), foreach=False, **KW)
    for j in range(0, len(batches), K):
        chunk = batches[j : j + K]
        branch(j, ours_m)
        branch(j, ref_m)
        run_ours(ours_m, chunk, K, opt=ours_opt, start=j)
        run_ref(ref_m, chunk, K, opt=ref_opt, start=j)
    assert torch.equal(ours_m.unused, ref_m.unused)
    assert ours_opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    assert "momentum_buffer" not in ours_opt.state.get(ours_m.unused, {})
    assert_params_close(ours_m.parameters(), ref_m.parameters())


# several param groups --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_several_param_groups(K, device):
    ours_m = make_mlp(seed=4, device=device)
    ref_m = copy.deepcopy(ours_m)

    def groups(m):
        w1, b1, w2, b2 = m.parameters()
        return [
            {"params": [w1], "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
            {"params": [b1], "lr": 0.02, "momentum": 0.5, "dampening": 0.1},
            {"params": [w2], "lr": 0.08},  # momentum 0: no state
            {"params": [b2], "lr": torch.tensor(0.03, device=device), "momentum": 0.9, "weight_decay": 5e-3},
        ]

    batches = make_batches("mlp", K * 100, seed=5, device=device)
    ours = AccumOptimizer(groups(ours_m), lr=0.01, accumulation_steps=K)
    ref = torch.optim.SGD(groups(ref_m), lr=0.01, foreach=False)
    run_ours(ours_m, batches, K, opt=ours)
    run_ref(ref_m, batches, K, opt=ref)
    assert_params_close(ours_m.parameters(), ref_m.parameters())
    assert sorted(ours.state_dict()["state"]) == sorted(ref.state_dict()["state"]) == [0, 1, 3]


def test_add_param_group_mid_training():
    K = 2
    ours_m = make_mlp(seed=4)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * 40, seed=5)
    ours = AccumOptimizer(list(ours_m.parameters())[:2], accumulation_steps=K, **KW)
    ref = torch.optim.SGD(list(ref_m.parameters())[:2], foreach=False, **KW)
    run_ours(ours_m, batches[: K * 20], K, opt=ours)
    run_ref(ref_m, batches[: K * 20], K, opt=ref)
    # grads of params outside any optimizer piled up in both runs; the two loops
    # call zero_grad at different points, so start the new group from clean grads
    for p in list(ours_m.parameters())[2:] + list(ref_m.parameters())[2:]:
        p.grad = None
    ours.add_param_group({"params": list(ours_m.parameters())[2:], "lr": 0.02})
    ref.add_param_group({"params": list(ref_m.parameters())[2:], "lr": 0.02})
    assert ours.param_groups[1]["accumulation_steps"] == K
    run_ours(ours_m, batches[K * 20 :], K, opt=ours, start=K * 20)
    run_ref(ref_m, batches[K * 20 :], K, opt=ref, start=K * 20)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


# constructor compatibility ---------------------------------------------------------


def test_sgd_signature_positional_and_defaults():
    p = nn.Parameter(torch.randn(3))
    opt = AccumOptimizer([p], 0.1, 0.9, 0.1, 1e-3, False)  # SGD's positional order
    d = opt.defaults
    assert (d["lr"], d["momentum"], d["dampening"], d["weight_decay"], d["nesterov"]) == (0.1, 0.9, 0.1, 1e-3, False)
    assert d["accumulation_steps"] == 1 and d["maximize"] is False
    sgd_defaults = torch.optim.SGD([nn.Parameter(torch.randn(3))]).defaults
    ours_defaults = AccumOptimizer([nn.Parameter(torch.randn(3))]).defaults
    for k, v in sgd_defaults.items():
        assert k in ours_defaults
        if k not in ("foreach", "fused"):
            assert ours_defaults[k] == v, k
    assert isinstance(opt, torch.optim.Optimizer)
    repr(opt)


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)])
def test_foreach_and_fused_accepted_and_ignored(flags):
    K = 2
    a = make_mlp(seed=3)
    b = copy.deepcopy(a)
    batches = make_batches("mlp", K * 30, seed=4)
    run_ours(a, batches, K, opt_kwargs=dict(KW, **flags))
    run_ours(b, batches, K, opt_kwargs=dict(KW))
    assert_params_close(a.parameters(), b.parameters(), rtol=0, atol=0)


# memory layout -------------------------------------------------------------------


def test_non_contiguous_params_and_grads():
    """A transposed (dense, non-contiguous) param, a strided (non-dense) param and a
    grad whose strides differ from its param: same results as SGD."""
    gen = torch.Generator().manual_seed(0)

    def make():
        g = torch.Generator().manual_seed(1)
        t = nn.Parameter(torch.randn(5, 7, generator=g).t())  # (7, 5), strides (1, 7)
        s = nn.Parameter(torch.randn(6, 8, generator=g)[:, ::2])  # non-dense leaf
        c = nn.Parameter(torch.randn(4, 3, generator=g))
        return [t, s, c]

    ours_p, ref_p = make(), make()
    assert not ours_p[0].is_contiguous() and ours_p[1].stride() == (8, 2)  # a gap: not dense
    ours = AccumOptimizer(ours_p, accumulation_steps=2, **KW)
    ref = torch.optim.SGD(ref_p, foreach=False, **KW)
    for w in range(30):
        for micro in range(2):
            gs = [torch.randn(p.shape, generator=gen) for p in ours_p]
            # grad of c laid out transposed: same values, different strides
            gs_strided = [gs[0], gs[1], gs[2].t().contiguous().t()]
            ours.zero_grad()
            for p, g in zip(ours_p, gs_strided):
                p.grad = g.clone() if p.grad is None else p.grad + g
            ours.step()
            for p, g in zip(ref_p, gs):
                p.grad = g.clone() / 2 if p.grad is None else p.grad + g / 2
        ref.step()
        ref.zero_grad()
    assert_params_close(ours_p, ref_p)


# accumulate(model) -----------------------------------------------------------------


def test_accumulate_is_noop_for_plain_module():
    K = 3
    m = make_mlp(seed=0)
    r = copy.deepcopy(m)
    opt = AccumOptimizer(m.parameters(), accumulation_steps=K, **KW)
    batches = make_batches("mlp", K * 10, seed=1)
    for x, y in batches:
        opt.zero_grad()
        with opt.accumulate(m):
            F.mse_loss(m(x), y).backward()
        opt.step()
    run_ours(r, batches, K, opt_kwargs=KW)  # run_ours also enters accumulate()
    assert_params_close(m.parameters(), r.parameters(), rtol=0, atol=0)


def test_accumulate_uses_no_sync_for_ddp():
    """A 1-process gloo DistributedDataParallel model: inside accumulate(), the
    gradient all-reduce is disabled on non-boundary micro-batches only, and
    training matches the reference."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    K = 3
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(d, "store"), rank=0, world_size=1)
        try:
            m = make_mlp(seed=0)
            r = copy.deepcopy(m)
            ddp = nn.parallel.DistributedDataParallel(m)
            opt = AccumOptimizer(ddp.parameters(), accumulation_steps=K, **KW)
            seen = []
            batches = make_batches("mlp", K * 10, seed=1)
            for i, (x, y) in enumerate(batches):
                opt.zero_grad()
                with opt.accumulate(ddp):
                    seen.append((opt.is_accumulation_boundary, ddp.require_backward_grad_sync))
                    F.mse_loss(ddp(x), y).backward()
                opt.step()
            assert ddp.require_backward_grad_sync  # restored after the context
            assert all(b == sync for b, sync in seen), seen
            assert [b for b, _ in seen] == [(i + 1) % K == 0 for i in range(len(batches))]
            run_ref(r, batches, K, opt_kwargs=KW)
            assert_params_close(m.parameters(), r.parameters())
        finally:
            dist.destroy_process_group()


# several devices -------------------------------------------------------------------


@requires_cuda
def test_params_on_several_devices():
    """One fused launch per (device, dtype): a CPU param and a CUDA param in one group."""
    gen = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(33, generator=gen)), nn.Parameter(torch.randn(65, generator=gen).cuda())]
    rs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt = AccumOptimizer(ps, accumulation_steps=2, **KW)
    ref = torch.optim.SGD(rs, foreach=False, **KW)
    for _ in range(20):
        gs = [[torch.randn(p.shape, generator=gen).to(p.device) for p in ps] for _ in range(2)]
        for micro in gs:
            opt.zero_grad()
            for p, g in zip(ps, micro):
                p.grad = g.clone() if p.grad is None else p.grad + g
            opt.step()
        for r, a, b in zip(rs, gs[0], gs[1]):
            r.grad = a / 2 + b / 2
        ref.step()
    assert_params_close(ps, rs)

"""torch_fastaccum.GradScaler + AccumOptimizer vs torch.amp.GradScaler + torch.optim.SGD.

Reference (``run_ref`` in tests/_helpers.py): torch.amp.GradScaler("cpu") + SGD
default path, ``scaler.scale(loss / K).backward()`` and step/update/zero_grad at
boundaries only.
Ours calls ``scale/backward/step/update`` on every micro-batch. Skip decisions and
the scale history (scale and growth tracker after every boundary update) must be
identical; params close (rtol 1e-5 / atol 1e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers import (
    DEVICES,
    Fp16Autocast,
    assert_params_changed,
    assert_params_close,
    make_batches,
    make_mlp,
    make_model,
    params_of,
    run_ours,
    run_ref,
)
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")

N_UPDATES = 100


def _inject_plan(K, kind):
    """Faults in: the very first micro-batch (first window), the last micro-batch
    of window 10 (the boundary itself), the first of window 11 (two skipped
    windows in a row), and a middle micro-batch of window 50."""
    return {
        0: kind,
        10 * K + K - 1: kind,
        11 * K: kind,
        50 * K + K // 2: kind,
    }


def _assert_same_history(t_ours, t_ref):
    assert t_ours.skipped == t_ref.skipped, "skip decisions differ"
    assert t_ours.scales == t_ref.scales, "scale / growth-tracker history differs"


def _scalers(device, **kw):
    return GradScaler(device, **kw), torch.amp.GradScaler(device, **kw)


_KW_MAIN = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
_KW_NESTEROV = dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)
_KW_PLAIN = dict(lr=0.05)
_INJECTED_CASES = (
    # every fault kind x K with momentum + dampening + weight decay
    [pytest.param(_KW_MAIN, kind, K, id=f"momentum-dampening-wd-{kind}-K{K}")
     for kind in ["loss_inf", "loss_nan", "inf", "-inf", "nan"] for K in [1, 2, 4]]
    # the other update paths with two fault kinds
    + [pytest.param(kw, kind, K, id=f"{name}-{kind}-K{K}")
       for name, kw in [("nesterov-maximize", _KW_NESTEROV), ("plain", _KW_PLAIN)]
       for kind in ["loss_inf", "nan"] for K in [1, 4]]
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw, kind, K", _INJECTED_CASES)
def test_injected_nonfinite_parity(kw, kind, K, device):
    """inf/NaN injected (loss * inf/nan, or one grad element set after backward)
    into chosen micro-batches, including the very first window. init_scale 2^16
    never overflows fp32 on its own; growth_interval=3 exercises growth."""
    sign = -1.0 if kw.get("maximize") else 1.0
    ours_m = make_mlp(seed=3, device=device)
    ref_m = copy.deepcopy(ours_m)
    init = params_of(ours_m)
    batches = make_batches("mlp", K * N_UPDATES, seed=21, device=device)
    inject = _inject_plan(K, kind)
    s_ours, s_ref = _scalers(device, init_scale=2.0**16, growth_interval=3)
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=kw, scaler=s_ours, inject=inject, sign=sign)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, scaler=s_ref, inject=inject, sign=sign)
    # premise: the reference skipped exactly the 4 poisoned windows and grew the scale
    assert sum(t_ref.skipped) == 4 and t_ref.skipped[0] and t_ref.skipped[10] and t_ref.skipped[11]
    assert max(s for s, _ in t_ref.scales) > 2.0**16
    _assert_same_history(t_ours, t_ref)
    assert_params_changed(init, ours_m)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_cnn_scaler_parity(K, device):
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3)
    ours_m = make_model("cnn", seed=2, device=device)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("cnn", K * N_UPDATES, seed=3, device=device)
    inject = _inject_plan(K, "inf")
    s_ours, s_ref = _scalers(device, init_scale=2.0**12, growth_interval=3)
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=kw, scaler=s_ours, inject=inject, loss_fn=F.cross_entropy)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, scaler=s_ref, inject=inject, loss_fn=F.cross_entropy)
    _assert_same_history(t_ours, t_ref)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


def test_scale_constant_within_window():
    """Non-boundary scaler.step/update change nothing: the scale seen after every
    micro-batch is constant inside a window (run_ours asserts it per micro-batch);
    the per-micro-batch history is the boundary history repeated K times."""
    K = 4
    m = make_mlp(seed=1)
    batches = make_batches("mlp", K * 30, seed=2)
    scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    _, t = run_ours(m, batches, K, opt_kwargs=dict(lr=0.05, momentum=0.9), scaler=scaler, inject={5: "inf"})
    init = 2.0**8
    expected = []
    prev = init
    for s, _ in t.scales:
        expected += [prev] * (K - 1) + [s]
        prev = s
    assert t.micro_scales == expected
    assert len(set(s for s, _ in t.scales)) > 2  # it did grow and back off


# Natural overflow ---------------------------------------------------------------


def _fp32_mse(out, y):
    return F.mse_loss(out.float(), y)


@pytest.mark.parametrize("init_scale", [2.0**20, 2.0**12], ids=["overflows", "fits"])
def test_natural_fp16_overflow_parity_K1(init_scale):
    """No injected faults: fp16 autocast overflows naturally whenever the scale
    grows past what the gradients allow (growth_interval=3 makes this periodic).
    2^20 overflows at once; 2^12 fits at first and overflows only after growing.
    With K=1 the scaled gradients are the same on both sides, so the histories
    must be identical."""
    kw = dict(lr=0.05, momentum=0.9)
    ours_m = Fp16Autocast(make_mlp(seed=0))
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", N_UPDATES, seed=1)
    s_ours, s_ref = _scalers("cpu", init_scale=init_scale, growth_interval=3)
    _, t_ours = run_ours(ours_m, batches, 1, opt_kwargs=kw, scaler=s_ours, loss_fn=_fp32_mse)
    _, t_ref = run_ref(ref_m, batches, 1, opt_kwargs=kw, scaler=s_ref, loss_fn=_fp32_mse)
    assert t_ref.skipped[0] == (init_scale == 2.0**20)  # premise
    assert sum(t_ref.skipped) >= 5  # premise: overflow really happens, repeatedly
    _assert_same_history(t_ours, t_ref)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("K", [2, 4])
def test_natural_fp16_overflow_equivalent_reference(K):
    """With K > 1 the user does NOT divide the loss, so each scaled micro-batch
    gradient is K times the reference loop's ``scale(loss / K)`` one; where the
    fp16 backward itself overflows, that overflow threshold is reached K times
    earlier (see test_natural_fp16_overflow_same_init_scale_K_gt_1). The loop with
    identical scaled gradients is the reference started at init_scale * K: its
    skip decisions and growth tracker must be identical to ours, and its scale
    exactly K times ours, at every boundary."""
    kw = dict(lr=0.05, momentum=0.9)
    ours_m = Fp16Autocast(make_mlp(seed=0))
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * N_UPDATES, seed=1)
    s_ours = GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**20 * K, growth_interval=3)
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=kw, scaler=s_ours, loss_fn=_fp32_mse)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, scaler=s_ref, loss_fn=_fp32_mse)
    assert sum(t_ref.skipped) >= 5
    assert t_ours.skipped == t_ref.skipped
    assert [(s * K, g) for s, g in t_ours.scales] == t_ref.scales
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.xfail(
    strict=True,
    reason=(
        "Inherent to the API, not to the kernels: with the loss not divided by K, "
        "scaled micro-batch grads are K x the reference's, so a naturally "
        "overflowing fp16 backward overflows at a K x smaller scale. Skip "
        "decisions at the SAME init_scale can only match for injected faults."
    ),
)
def test_natural_fp16_overflow_same_init_scale_K_gt_1():
    K = 4
    kw = dict(lr=0.05, momentum=0.9)
    ours_m = Fp16Autocast(make_mlp(seed=0))
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * N_UPDATES, seed=1)
    s_ours, s_ref = _scalers("cpu", init_scale=2.0**20, growth_interval=3)
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=kw, scaler=s_ours, loss_fn=_fp32_mse)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, scaler=s_ref, loss_fn=_fp32_mse)
    assert t_ours.skipped == t_ref.skipped


# unscale_ + clipping ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_unscale_clip_parity(K, device):
    """At a boundary: unscale_ -> clip_grad_norm_ -> step. After our unscale_ the
    grads are the reference's unscaled MEAN gradient (1/K folded in), so clipping
    sees the same norm. max_norm=0.05 clips most windows."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    ours_m = make_mlp(seed=7, device=device)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * N_UPDATES, seed=8, device=device)
    inject = _inject_plan(K, "inf")
    s_ours, s_ref = _scalers(device, init_scale=2.0**16, growth_interval=3)
    _, t_ours = run_ours(ours_m, batches, K, opt_kwargs=kw, scaler=s_ours, inject=inject, clip=0.05)
    _, t_ref = run_ref(ref_m, batches, K, opt_kwargs=kw, scaler=s_ref, inject=inject, clip=0.05)
    _assert_same_history(t_ours, t_ref)
    assert len(t_ours.unscaled_grads) == len(t_ref.unscaled_grads) == N_UPDATES
    n_clipped = 0
    for w, (go, gr) in enumerate(zip(t_ours.unscaled_grads, t_ref.unscaled_grads)):
        for a, b in zip(go, gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, equal_nan=True, msg=lambda m: f"window {w}: {m}")
        if not t_ref.skipped[w]:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gr]))
            n_clipped += bool(norm > 0.05)
    assert n_clipped > N_UPDATES // 2  # premise: clipping is active
    assert_params_close(ours_m.parameters(), ref_m.parameters())


def test_unscale_inside_window_raises_and_changes_nothing():
    """unscale_ inside an accumulation window would unscale (and let the user
    clip) a partial, scaled sum: it raises, leaves grads, state and scale as
    they were, and training then goes on exactly as if it was never called."""
    K = 3
    kw = dict(lr=0.05, momentum=0.9)
    a = make_mlp(seed=1)
    b = copy.deepcopy(a)
    batches = make_batches("mlp", K * 20, seed=5)
    raised = []
    opt_a = AccumOptimizer(a.parameters(), accumulation_steps=K, **kw)
    sa = GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for i, (x, y) in enumerate(batches):
        opt_a.zero_grad()
        sa.scale(F.mse_loss(a(x), y)).backward()
        if not opt_a.is_accumulation_boundary:
            before = [p.grad.clone() for p in a.parameters()]
            state_before = copy.deepcopy(opt_a.state_dict())
            with pytest.raises(RuntimeError, match="inside an accumulation window"):
                sa.unscale_(opt_a)
            raised.append(i)
            for p, g in zip(a.parameters(), before):
                assert torch.equal(p.grad, g), "unscale_ changed grads on a non-boundary micro-batch"
            assert opt_a.state_dict()["accumulation"] == state_before["accumulation"]
        sa.step(opt_a)
        sa.update()
    _, tb = run_ours(b, batches, K, opt_kwargs=kw, scaler=GradScaler("cpu", init_scale=2.0**10, growth_interval=3))
    assert len(raised) == 2 * 20
    assert sa.get_scale() == tb.scales[-1][0]
    assert sa._get_growth_tracker() == tb.scales[-1][1]
    assert_params_close(a.parameters(), b.parameters(), rtol=0, atol=0)


def test_unscale_twice_raises_like_torch():
    m = make_mlp(seed=1)
    opt = AccumOptimizer(m.parameters(), lr=0.1)
    s = GradScaler("cpu")
    x, y = make_batches("mlp", 1)[0]
    s.scale(F.mse_loss(m(x), y)).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        s.unscale_(opt)


# torch's fused SGD first-step bug -------------------------------------------------


def _first_window_overflow_run(model, K, opt, scaler):
    batches = make_batches("mlp", K * N_UPDATES, seed=1)
    if isinstance(opt, AccumOptimizer):
        return run_ours(model, batches, K, opt=opt, scaler=scaler, inject={0: "inf"})
    return run_ref(model, batches, K, opt=opt, scaler=scaler, inject={0: "inf"})


@pytest.mark.parametrize("K", [1, 4])
def test_skipped_first_step_momentum_torch_fused_vs_ours(K):
    """A known torch bug we must not copy (README, "Skipped steps"). After an
    overflow in the very first window:

    * torch's default SGD path never calls step(), so momentum stays uninitialised
      and the next real update sets b = g;
    * torch 2.13's SGD(fused=True) fills the buffers with torch.empty_like, the
      kernel returns on found_inf, and the garbage is stored and used as b on the
      next step. Observed here: parameters end up to ~1e37 (or NaN) away from the
      default path. Even if the uninitialised memory happened to be all zeros,
      dampening=0.1 makes b = 0.9*0 + 0.9*g != g, which leaves a deterministic
      deviation of ~7e-3 (measured), far above 1e-3; so the assertion below cannot
      pass by luck, and would fail if torch fixed the bug;
    * ours must match the default path.
    """
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1)
    base = make_mlp(seed=0)
    default_m, fused_m, ours_m = (copy.deepcopy(base) for _ in range(3))

    default_opt = torch.optim.SGD(default_m.parameters(), foreach=False, **kw)
    _, t_default = _first_window_overflow_run(
        default_m, K, default_opt, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    )
    fused_opt = torch.optim.SGD(fused_m.parameters(), fused=True, **kw)
    _, t_fused = _first_window_overflow_run(
        fused_m, K, fused_opt, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    )
    ours_opt = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **kw)
    _, t_ours = _first_window_overflow_run(ours_m, K, ours_opt, GradScaler("cpu", init_scale=2.0**10, growth_interval=3))

    assert t_default.skipped[0] and t_fused.skipped[0] and t_ours.skipped[0]
    assert t_ours.scales == t_default.scales

    # torch fused: far away from the default path (or non-finite)
    dev = max(
        (a.detach() - b.detach()).abs().max().item() for a, b in zip(fused_m.parameters(), default_m.parameters())
    )
    assert not (dev <= 1e-3), f"torch fused SGD unexpectedly matched the default path (max dev {dev})"
    # ours: matches
    assert_params_close(ours_m.parameters(), default_m.parameters())


def test_skipped_first_step_state_dict_has_no_momentum_buffer():
    """A state_dict taken between a skipped first window and the first real update
    has no momentum_buffer (as torch's default path); torch's fused path does
    (the garbage), which is the bug. The next real update then sets b = g."""
    K = 2
    kw = dict(lr=0.05, momentum=0.9, dampening=0.5)
    base = make_mlp(seed=0)
    batches = make_batches("mlp", 2 * K, seed=1)
    sds = {}
    for name in ("ours", "default", "fused"):
        m = copy.deepcopy(base)
        if name == "ours":
            opt = AccumOptimizer(m.parameters(), accumulation_steps=K, **kw)
            run_ours(m, batches[:K], K, opt=opt, scaler=GradScaler("cpu"), inject={0: "inf"})
        else:
            extra = dict(foreach=False) if name == "default" else dict(fused=True)
            opt = torch.optim.SGD(m.parameters(), **extra, **kw)
            run_ref(m, batches[:K], K, opt=opt, scaler=torch.amp.GradScaler("cpu"), inject={0: "inf"})
        assert_params_close(m.parameters(), base.parameters(), rtol=0, atol=0)  # nothing moved
        sds[name] = opt.state_dict()
        if name == "ours":
            ours_m, ours_opt = m, opt
    assert all("momentum_buffer" not in s for s in sds["default"]["state"].values())
    assert all("momentum_buffer" not in s for s in sds["ours"]["state"].values()), sds["ours"]["state"]
    assert len(sds["fused"]["state"]) > 0 and all("momentum_buffer" in s for s in sds["fused"]["state"].values())

    # next real window (no scaler, scale irrelevant now): b must be g exactly, i.e.
    # dampening must NOT be applied to the first real update
    x_batches = batches[K:]
    ref_m = copy.deepcopy(base)
    ref = torch.optim.SGD(ref_m.parameters(), foreach=False, **kw)
    run_ref(ref_m, x_batches, K, opt=ref)
    run_ours(ours_m, x_batches, K, opt=ours_opt, start=K)
    assert_params_close(ours_m.parameters(), ref_m.parameters())
    sd_ours, sd_ref = ours_opt.state_dict(), ref.state_dict()
    assert sorted(sd_ours["state"]) == sorted(sd_ref["state"])
    for idx, s in sd_ref["state"].items():
        torch.testing.assert_close(sd_ours["state"][idx]["momentum_buffer"], s["momentum_buffer"], rtol=1e-5, atol=1e-7)


# Drop-in behaviour of the scaler itself ----------------------------------------------


def test_is_a_torch_grad_scaler():
    s = GradScaler("cpu", init_scale=2.0**5, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    assert isinstance(s, torch.amp.GradScaler)
    assert s.is_enabled()
    assert s.get_scale() == 2.0**5
    assert s.get_growth_factor() == 3.0
    assert s.get_backoff_factor() == 0.25
    assert s.get_growth_interval() == 7


@pytest.mark.parametrize("K", [1, 4])
def test_with_plain_sgd_behaves_like_torch_scaler(K):
    """With a plain torch optimizer our GradScaler is torch's, unchanged."""
    kw = dict(lr=0.05, momentum=0.9)
    a = make_mlp(seed=2)
    b = copy.deepcopy(a)
    batches = make_batches("mlp", K * 50, seed=3)
    inject = _inject_plan(K, "inf")
    s_ours, s_ref = _scalers("cpu", init_scale=2.0**16, growth_interval=3)
    _, ta = run_ref(a, batches, K, opt_kwargs=kw, scaler=s_ours, inject=inject)
    _, tb = run_ref(b, batches, K, opt_kwargs=kw, scaler=s_ref, inject=inject)
    _assert_same_history(ta, tb)
    assert_params_close(a.parameters(), b.parameters(), rtol=0, atol=0)


def test_disabled_scaler_is_passthrough():
    K = 2
    kw = dict(lr=0.05, momentum=0.9)
    a = make_mlp(seed=2)
    b = copy.deepcopy(a)
    batches = make_batches("mlp", K * 30, seed=3)
    s = GradScaler("cpu", enabled=False)
    opt = AccumOptimizer(a.parameters(), accumulation_steps=K, **kw)
    for x, y in batches:
        opt.zero_grad()
        s.scale(F.mse_loss(a(x), y)).backward()
        s.step(opt)
        s.update()
    run_ref(b, batches, K, opt_kwargs=kw)
    assert_params_close(a.parameters(), b.parameters())


def test_scaler_state_dict_roundtrip_mid_run():
    """scaler.state_dict() taken mid-run loads into a fresh GradScaler (and into
    torch's) and gives the same continued scale history."""
    K = 2
    kw = dict(lr=0.05, momentum=0.9)
    m = make_mlp(seed=2)
    batches = make_batches("mlp", K * 40, seed=3)
    inject = {3: "inf", 40: "nan", 61: "inf"}
    full_m = copy.deepcopy(m)
    _, t_full = run_ours(full_m, batches, K, opt_kwargs=kw, scaler=GradScaler("cpu", init_scale=2.0**8, growth_interval=2), inject=inject)

    half = K * 20
    s1 = GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    opt1, t1 = run_ours(m, batches[:half], K, opt_kwargs=kw, scaler=s1, inject=inject)
    sd = s1.state_dict()
    assert set(sd) == set(torch.amp.GradScaler("cpu").state_dict())
    s2 = GradScaler("cpu")
    s2.load_state_dict(sd)
    assert s2.get_scale() == s1.get_scale() and s2._get_growth_tracker() == s1._get_growth_tracker()
    opt2 = AccumOptimizer(m.parameters(), accumulation_steps=K, **kw)
    opt2.load_state_dict(opt1.state_dict())
    run_ours(m, batches[half:], K, opt=opt2, scaler=s2, inject=inject, trace=t1, start=half)
    assert t1.scales == t_full.scales and t1.skipped == t_full.skipped
    assert_params_close(m.parameters(), full_m.parameters())


def test_torch_grad_scaler_drives_accum_optimizer_k1():
    """Drop-in: an existing AMP loop keeps torch.amp.GradScaler and only swaps
    SGD for AccumOptimizer (accumulation_steps=1). torch's scaler then uses the
    optimizer's grad_scale/found_inf contract; results must match SGD's default
    path with the same scaler, skips and scale history included."""
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    ours_m = make_mlp(seed=3)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", N_UPDATES, seed=4)
    inject = _inject_plan(1, "inf")
    ours = AccumOptimizer(ours_m.parameters(), **kw)
    _, t_ours = run_ref(ours_m, batches, 1, opt=ours, inject=inject,
                        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3))
    _, t_ref = run_ref(ref_m, batches, 1, opt_kwargs=kw, inject=inject,
                       scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3))
    _assert_same_history(t_ours, t_ref)
    assert sum(t_ref.skipped) == 4  # windows 0, 10, 11 and 50
    assert_params_close(ours_m.parameters(), ref_m.parameters())


class _MixedDtypeNet(torch.nn.Module):
    """float32, float64 and bfloat16 layers: three (dtype) check lists."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 4).double()
        self.c = torch.nn.Linear(4, 3).to(torch.bfloat16)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)).double())).to(torch.bfloat16)).float()

    def layer_of(self, dtype):
        return {torch.float32: self.a, torch.float64: self.b, torch.bfloat16: self.c}[dtype]


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("bad", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_inf_in_one_dtype_of_a_mixed_dtype_model_skips_the_window(bad, K):
    """An inf in the grads of one dtype only (each of the three in turn):
    the window is skipped as torch's GradScaler skips it, whichever dtype's
    check runs last (a pass that overwrote found_inf per dtype list would
    keep only the last list's verdict)."""
    torch.manual_seed(0)
    ours_m = _MixedDtypeNet()
    ref_m = copy.deepcopy(ours_m)
    kw = dict(lr=0.05, momentum=0.9)
    ours = AccumOptimizer(ours_m.parameters(), accumulation_steps=K, **kw)
    ref = torch.optim.SGD(ref_m.parameters(), **kw)
    s_ours, s_ref = _scalers("cpu", init_scale=2.0**8, growth_interval=2)
    gen = torch.Generator().manual_seed(4)
    poisoned = {1, 4}  # windows whose last micro-batch gets an inf
    skipped_ours, skipped_ref = [], []
    for w in range(6):
        for i in range(K):
            x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
            ours.zero_grad()
            s_ours.scale(F.mse_loss(ours_m(x), y)).backward()
            s_ref.scale(F.mse_loss(ref_m(x), y) / K).backward()
            if w in poisoned and i == K - 1:
                for m in (ours_m, ref_m):
                    m.layer_of(bad).weight.grad[0, 0] = float("inf")
            before = s_ours.get_scale()
            s_ours.step(ours)
            s_ours.update()
        skipped_ours.append(s_ours.get_scale() < before)
        before = s_ref.get_scale()
        s_ref.step(ref)
        s_ref.update()
        ref.zero_grad()
        skipped_ref.append(s_ref.get_scale() < before)
    assert skipped_ref == [w in poisoned for w in range(6)], "premise: torch skips the poisoned windows"
    assert skipped_ours == skipped_ref
    # The bf16 layer's update is computed in float32 here, in bf16 by torch:
    # its outputs, and so every layer's grads, differ at bf16's precision.
    # A window stepped with the inf would leave inf/NaN in the params.
    for (name, p), q in zip(ours_m.named_parameters(), ref_m.parameters()):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, rtol=1.6e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")

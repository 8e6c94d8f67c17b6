"""Fault handling against the pure-torch reference.

Reference (``run_ref`` below): torch.optim.SGD default path (foreach=False) +
torch.amp.GradScaler("cpu"), ``scaler.scale(loss / K).backward()``, step +
update + zero_grad every K micro-batches. Ours: AccumOptimizer +
torch_fastaccum.GradScaler, zero_grad/scale/backward/step/update on every
micro-batch, loss not divided.

1. inf / -inf / NaN written into ONE element of ONE gradient tensor of a model
   with 22 parameter tensors (one of 90,000 elements), at every position of the
   window (micro-batch 0..K-1), in the first window (momentum not yet
   initialised) and in a later one: skip decisions, scale history, momentum
   buffers and parameters equal the reference's.
2. inf / -inf / NaN in a parameter itself: SGD propagates it through weight
   decay / momentum; ours must end with exactly torch's non-finite positions
   and values, and the same finite values elsewhere.
3. An exception raised between micro-batches (after backward before step,
   after step before the next zero_grad, and from inside backward), caught,
   and training continued in the same process: the same outcome as a
   reference that made the same calls (see ``_ref_mirror``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import assert_params_close
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")

K = 4
WINDOWS = 6
SCALER_KW = dict(init_scale=2.0**12, growth_interval=2)
OPT_KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
# 11 Linear layers = 22 parameter tensors; layer 5's weight has 90,000 elements
DIMS = [9, 9, 9, 9, 9, 300, 300, 9, 9, 9, 9, 2]
D_IN, D_OUT = DIMS[0], DIMS[-1]


def make_deep(seed=0, dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for a, b in zip(DIMS[:-1], DIMS[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        m = nn.Sequential(*layers[:-1])
    return m.to(dtype)


def make_data(n, seed=1, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, D_IN, generator=g), torch.randn(batch, D_OUT, generator=g)) for _ in range(n)]


VAL = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _record(trace, scaler, before):
    after = scaler.get_scale()
    trace["scales"].append((after, scaler._get_growth_tracker()))
    trace["skipped"].append(after < before)


def run_ours(model, batches, *, inject=None, opt_kw=OPT_KW, scaler=True):
    """inject(i, model) runs after backward of micro-batch i, before step."""
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **opt_kw)
    sc = GradScaler("cpu", **SCALER_KW) if scaler else None
    trace = {"scales": [], "skipped": []}
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        (sc.scale(loss) if sc else loss).backward()
        if inject:
            inject(i, model)
        if sc:
            before = sc.get_scale()
            sc.step(opt)
            sc.update()
            if (i + 1) % K == 0:
                _record(trace, sc, before)
            else:
                assert sc.get_scale() == before
        else:
            opt.step()
    return opt, trace


def run_ref(model, batches, *, inject=None, opt_kw=OPT_KW, scaler=True):
    opt = torch.optim.SGD(model.parameters(), foreach=False, **opt_kw)
    sc = torch.amp.GradScaler("cpu", **SCALER_KW) if scaler else None
    trace = {"scales": [], "skipped": []}
    for i, (x, y) in enumerate(batches):
        loss = F.mse_loss(model(x), y) / K
        (sc.scale(loss) if sc else loss).backward()
        if inject:
            inject(i, model)
        if (i + 1) % K == 0:
            if sc:
                before = sc.get_scale()
                sc.step(opt)
                sc.update()
                _record(trace, sc, before)
            else:
                opt.step()
            opt.zero_grad()
    return opt, trace


def _assert_same_state(ours, ref):
    """Per-param momentum state: present for the same params, same values."""
    so, sr = ours.state_dict()["state"], ref.state_dict()["state"]
    assert sorted(so) == sorted(sr), f"params with momentum state differ: {sorted(so)} vs {sorted(sr)}"
    for k in sr:
        torch.testing.assert_close(so[k]["momentum_buffer"], sr[k]["momentum_buffer"], rtol=1e-5, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------------------
# 1. one non-finite element in one gradient tensor among 22
# ---------------------------------------------------------------------------

LOCATIONS = {
    "big-tensor-elem-70001": (10, 70001),  # layer 5 weight, 300x300, past the first 64Ki chunk
    "small-tensor-mid": (13, 4),  # layer 6 bias (9 elements)
    "last-tensor-last-elem": (21, 1),  # output bias (2 elements)
}


def _grad_injector(at, tensor_idx, elem, kind):
    def inject(i, model):
        if i == at:
            p = list(model.parameters())[tensor_idx]
            with torch.no_grad():
                p.grad.view(-1)[elem] = VAL[kind]

    return inject


@pytest.mark.parametrize("loc", list(LOCATIONS))
@pytest.mark.parametrize("window", [0, 2], ids=["first-window", "window-2"])
@pytest.mark.parametrize("pos", range(K), ids=[f"micro{j}" for j in range(K)])
@pytest.mark.parametrize("kind", ["inf", "-inf", "nan"])
def test_nonfinite_grad_element_matches_reference(kind, pos, window, loc):
    tensor_idx, elem = LOCATIONS[loc]
    model = make_deep(seed=3)
    assert len(list(model.parameters())) == 22
    ref_model = copy.deepcopy(model)
    batches = make_data(K * WINDOWS)
    at = window * K + pos
    inject = _grad_injector(at, tensor_idx, elem, kind)

    ours, t_ours = run_ours(model, batches, inject=inject)
    ref, t_ref = run_ref(ref_model, batches, inject=inject)

    expected = [w == window for w in range(WINDOWS)]
    assert t_ref["skipped"] == expected, "the reference itself did not skip as planned"
    assert t_ours["skipped"] == t_ref["skipped"], "skip decisions differ"
    assert t_ours["scales"] == t_ref["scales"], "scale / growth-tracker history differs"
    assert_params_close(model.parameters(), ref_model.parameters())
    for p in model.parameters():
        assert torch.isfinite(p).all(), "a skipped window leaked a non-finite value into the parameters"
    _assert_same_state(ours, ref)


def test_skipped_first_window_leaves_momentum_uninitialised():
    """After a skipped first window the state_dict has no momentum_buffer (as
    torch's default SGD); the next real update sets b = g."""
    model = make_deep(seed=3)
    ref_model = copy.deepcopy(model)
    batches = make_data(K * 2)
    inject = _grad_injector(1, 10, 70001, "nan")
    ours, t_ours = run_ours(model, batches[:K], inject=inject)
    ref, t_ref = run_ref(ref_model, batches[:K], inject=inject)
    assert t_ours["skipped"] == t_ref["skipped"] == [True]
    assert ref.state_dict()["state"] == {}
    assert ours.state_dict()["state"] == {}
    assert_params_close(model.parameters(), ref_model.parameters(), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# 2. a non-finite value in a parameter itself
# ---------------------------------------------------------------------------

N_SYN = 22
SYN_SHAPES = [(7, 5), (33,), (3, 3, 3), (1,), (129,), (2, 65)] * 3 + [(70001,), (0,), (5, 1), (17,)]


def _syn_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32).to(dtype)) for s in SYN_SHAPES]


def _syn_coeffs(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(8)
    return [[torch.randn(s, generator=g).to(dtype) for s in SYN_SHAPES] for _ in range(n)]


def _syn_loss(params, coeffs):
    # linear in the parameters: grad(p_t) = c_t exactly, whatever p holds
    # (an inf parameter gives an inf loss but finite gradients)
    return sum((p * c).sum() for p, c in zip(params, coeffs))


def _syn_train(params, coeffs, ours, opt_kw, scaler, poison):
    """poison(i, params) runs before micro-batch i (outside autograd)."""
    if ours:
        opt = AccumOptimizer(params, accumulation_steps=K, **opt_kw)
        sc = GradScaler("cpu", **SCALER_KW) if scaler else None
    else:
        opt = torch.optim.SGD(params, foreach=False, **opt_kw)
        sc = torch.amp.GradScaler("cpu", **SCALER_KW) if scaler else None
    trace = {"scales": [], "skipped": []}
    for i, cs in enumerate(coeffs):
        poison(i, params)
        if ours:
            opt.zero_grad()
        loss = _syn_loss(params, cs)
        if not ours:
            loss = loss / K
        (sc.scale(loss) if sc else loss).backward()
        boundary = (i + 1) % K == 0
        if ours or boundary:
            if sc:
                before = sc.get_scale()
                sc.step(opt)
                sc.update()
                if boundary:
                    _record(trace, sc, before)
            else:
                opt.step()
        if boundary and not ours:
            opt.zero_grad()
    return opt, trace


PARAM_HYPER = {
    "momentum": dict(lr=0.1, momentum=0.9),
    "wd-momentum-dampening": dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05),
    "wd-nesterov-maximize": dict(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.05, maximize=True),
    "wd-no-momentum": dict(lr=0.1, weight_decay=0.05),
    "plain": dict(lr=0.1),
}


@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "scaler"])
@pytest.mark.parametrize("hyper", list(PARAM_HYPER))
@pytest.mark.parametrize("kind", ["inf", "-inf", "nan"])
def test_nonfinite_parameter_propagates_like_torch(kind, hyper, scaler):
    opt_kw = PARAM_HYPER[hyper]
    coeffs = _syn_coeffs(K * 4)
    # poisoned: element 3 of tensor 1 before training; element 69999 of the
    # 70001-element tensor at the start of window 2 (momentum already set)
    targets = {0: (1, 3), 2 * K: (18, 69999)}

    def poison(i, params):
        if i in targets:
            t, e = targets[i]
            with torch.no_grad():
                params[t].view(-1)[e] = VAL[kind]

    ours_p, ref_p = _syn_params(), _syn_params()
    ours, t_ours = _syn_train(ours_p, coeffs, True, opt_kw, scaler, poison)
    ref, t_ref = _syn_train(ref_p, coeffs, False, opt_kw, scaler, poison)

    if scaler:
        assert t_ref["skipped"] == [False] * 4  # the gradients stay finite
        assert t_ours["skipped"] == t_ref["skipped"]
        assert t_ours["scales"] == t_ref["scales"]
    n_bad = 0
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        a, b = a.detach(), b.detach()
        # same NaN positions, same +-inf positions, and close finite values
        assert torch.equal(a.isnan(), b.isnan()), f"param {i}: NaN positions differ"
        assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), (
            f"param {i}: inf positions differ"
        )
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        n_bad += int((~torch.isfinite(b)).sum())
    assert 2 <= n_bad <= 2, f"torch propagated the poison to {n_bad} elements (expected just the 2 poisoned)"
    _assert_same_state(ours, ref)


def test_nonfinite_parameter_in_model_skips_every_window():
    """A real model with an inf weight: every gradient is NaN, so with a scaler
    every window is skipped (same backoffs as torch); the parameters keep
    their values, inf included."""
    model = make_deep(seed=3)
    with torch.no_grad():
        list(model.parameters())[4].view(-1)[5] = float("inf")
    ref_model = copy.deepcopy(model)
    batches = make_data(K * 3)
    ours, t_ours = run_ours(model, batches)
    ref, t_ref = run_ref(ref_model, batches)
    assert t_ref["skipped"] == [True] * 3
    assert t_ours["skipped"] == t_ref["skipped"] and t_ours["scales"] == t_ref["scales"]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
    assert ours.state_dict()["state"] == {} == ref.state_dict()["state"]


# ---------------------------------------------------------------------------
# 3. exceptions between micro-batches, training continued in the same process
# ---------------------------------------------------------------------------


class Interrupt(BaseException):
    """KeyboardInterrupt-like: not an Exception, so nothing swallows it by accident."""


def _raise_in_backward_hook(model, armed):
    """A hook on the output of layer 6 that raises while armed: backward stops
    half-way, after the layers above it have accumulated their grads."""

    def hook(grad):
        if armed["on"]:
            armed["on"] = False
            raise Interrupt("from inside backward")
        return grad

    def fwd_hook(mod, inp, out):
        if out.requires_grad:
            out.register_hook(hook)

    return model[12].register_forward_hook(fwd_hook)


def run_ours_interrupted(model, batches, plan, scaler):
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **OPT_KW)
    sc = GradScaler("cpu", **SCALER_KW) if scaler else None
    armed = {"on": False}
    h = _raise_in_backward_hook(model, armed)
    interrupted = 0
    for i, (x, y) in enumerate(batches):
        where = plan.get(i)
        try:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            armed["on"] = where == "mid_backward"
            (sc.scale(loss) if sc else loss).backward()
            if where == "after_backward":
                raise Interrupt(i)
            if sc:
                sc.step(opt)
                sc.update()
            else:
                opt.step()
            if where == "after_step":
                raise Interrupt(i)
        except Interrupt:
            interrupted += 1
            continue
    h.remove()
    assert interrupted == len(plan)
    return opt, sc


def _ref_mirror(model, batches, plan, scaler):
    """torch.optim.SGD + torch.amp.GradScaler making the same calls as the
    interrupted loop above, with AccumOptimizer's rules spelled out (its
    docstring): ``c`` counts step() calls; zero_grad() acts when c % K == 0
    (after a boundary step, or before the first); every K-th step() updates
    with the mean gradient (``loss / K``)."""
    opt = torch.optim.SGD(model.parameters(), foreach=False, **OPT_KW)
    sc = torch.amp.GradScaler("cpu", **SCALER_KW) if scaler else None
    armed = {"on": False}
    h = _raise_in_backward_hook(model, armed)
    c = 0
    for i, (x, y) in enumerate(batches):
        where = plan.get(i)
        try:
            if c % K == 0:
                opt.zero_grad()
            loss = F.mse_loss(model(x), y) / K
            armed["on"] = where == "mid_backward"
            (sc.scale(loss) if sc else loss).backward()
            if where == "after_backward":
                raise Interrupt(i)
            c += 1
            if c % K == 0:
                if sc:
                    sc.step(opt)
                    sc.update()
                else:
                    opt.step()
            if where == "after_step":
                raise Interrupt(i)
        except Interrupt:
            continue
    h.remove()
    return opt, sc


@pytest.mark.parametrize("scaler", [True, False], ids=["scaler", "no-scaler"])
@pytest.mark.parametrize("pos", range(K), ids=[f"micro{j}" for j in range(K)])
@pytest.mark.parametrize("where", ["after_backward", "after_step", "mid_backward"])
def test_exception_between_micro_batches_then_continue(where, pos, scaler):
    model = make_deep(seed=5)
    ref_model = copy.deepcopy(model)
    batches = make_data(K * 5 + 1, seed=9)
    plan = {K + pos: where}  # window 1, micro-batch `pos`
    ours, sc = run_ours_interrupted(model, batches, plan, scaler)
    ref, rsc = _ref_mirror(ref_model, batches, plan, scaler)
    assert_params_close(model.parameters(), ref_model.parameters())
    _assert_same_state(ours, ref)
    # same number of step() calls counted
    assert ours.state_dict()["accumulation"]["micro_step"] == len(batches) - (where != "after_step")
    if scaler:
        assert sc.get_scale() == rsc.get_scale() and sc._get_growth_tracker() == rsc._get_growth_tracker()
    # the interruption really changed the outcome vs an uninterrupted run
    # (except after_step, where the contract says nothing is lost)
    clean = make_deep(seed=5)
    run_ours_interrupted(clean, batches, {}, scaler)
    if where == "after_step":
        assert_params_close(model.parameters(), clean.parameters(), rtol=0, atol=0)
    else:
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), clean.parameters()))
        assert diff > 0


def _run_with_step_exception(model, batches, ours, scaler, fail_step):
    """Each loop's own boundary step number ``fail_step`` (counting real
    optimizer.step() calls that would update) raises from a step pre-hook --
    e.g. a KeyboardInterrupt arriving inside step() -- the loop catches it and
    retries the same ``scaler.step(opt)`` / ``opt.step()``, then goes on."""
    if ours:
        opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **OPT_KW)
        sc = GradScaler("cpu", **SCALER_KW) if scaler else None
    else:
        opt = torch.optim.SGD(model.parameters(), foreach=False, **OPT_KW)
        sc = torch.amp.GradScaler("cpu", **SCALER_KW) if scaler else None
    state = {"boundary_steps": 0, "raised": 0}

    def pre_hook(o, args, kwargs):
        is_boundary = o.is_accumulation_boundary if ours else True
        if is_boundary:
            if state["boundary_steps"] == fail_step and not state["raised"]:
                state["raised"] = 1
                raise Interrupt("inside step")
            state["boundary_steps"] += 1

    opt.register_step_pre_hook(pre_hook)
    for i, (x, y) in enumerate(batches):
        boundary = (i + 1) % K == 0
        if ours:
            opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        if not ours:
            loss = loss / K
        (sc.scale(loss) if sc else loss).backward()
        if ours or boundary:
            try:
                sc.step(opt) if sc else opt.step()
            except Interrupt:
                state["left_behind"] = [a for a in ("grad_scale", "found_inf") if hasattr(opt, a)]
                sc.step(opt) if sc else opt.step()  # retry
            if sc:
                sc.update()
            if not ours:
                opt.zero_grad()
    assert state["raised"] == 1
    opt.__dict__["_test_left_behind"] = state.get("left_behind")
    return opt, sc


@pytest.mark.parametrize("scaler", [True, False], ids=["scaler", "no-scaler"])
def test_exception_inside_boundary_step_then_retry(scaler):
    """An exception raised inside the boundary step() (here from a step
    pre-hook, before the optimizer did anything), caught and the step retried:
    torch's default SGD + GradScaler just redo the step; ours must too."""
    model = make_deep(seed=5)
    ref_model = copy.deepcopy(model)
    batches = make_data(K * 4, seed=9)
    ours, sc = _run_with_step_exception(model, batches, True, scaler, fail_step=1)
    ref, rsc = _run_with_step_exception(ref_model, batches, False, scaler, fail_step=1)
    left = ours.__dict__.get("_test_left_behind")
    assert_params_close(
        model.parameters(), ref_model.parameters(),
        msg=f"(after the failed step, attributes left on the optimizer: {left})",
    )
    _assert_same_state(ours, ref)
    if scaler:
        assert sc.get_scale() == rsc.get_scale()

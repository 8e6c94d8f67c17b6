"""Optimizer hooks on AccumOptimizer behave as on torch.optim.SGD.

A drop-in keeps every hook a training framework may have registered working:
step pre/post hooks (per optimizer and global), state_dict pre/post hooks and
load_state_dict pre/post hooks, with ``prepend=``. The main check replays one
script of hook registrations, steps, saves, loads and removals on both
optimizers and requires the same event log; the others pin what each kind of
hook sees and may change.

(tests/test_api_compat.py counts step hooks under a GradScaler and state-dict
hooks per call on a trained model; not repeated here.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from _dropin import assert_same, assert_same_settings, sgd
from torch_fastaccum import AccumOptimizer


def _make(kind: str, params, **kwargs):
    if kind == "sgd":
        return sgd(params, **kwargs)
    return AccumOptimizer(params, **kwargs)


def _event_log(kind: str, k: int) -> list:
    """Run one fixed script of hook use and return what the hooks recorded."""
    log = []
    p = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    opt = _make(kind, [p], lr=0.1, momentum=0.5, **({"accumulation_steps": k} if kind == "ours" else {}))
    bystander = sgd([nn.Parameter(torch.ones(2))], lr=0.1)

    def who(o):
        return "me" if o is opt else ("bystander" if o is bystander else "stranger")

    def step_hook(tag):
        return lambda o, args, kwargs: log.append((tag, who(o), len(args), sorted(kwargs)))

    handles = {
        "global-pre": register_optimizer_step_pre_hook(step_hook("global-pre")),
        "global-post": register_optimizer_step_post_hook(step_hook("global-post")),
        "pre": opt.register_step_pre_hook(step_hook("pre")),
        "post": opt.register_step_post_hook(step_hook("post")),
        "sd-pre": opt.register_state_dict_pre_hook(lambda o: log.append(("sd-pre", who(o)))),
        "sd-post": opt.register_state_dict_post_hook(
            lambda o, sd: log.append(("sd-post", who(o), sorted(k for k in sd if k != "accumulation")))
        ),
        "load-pre": opt.register_load_state_dict_pre_hook(
            lambda o, sd: log.append(("load-pre", who(o), [g["lr"] for g in sd["param_groups"]]))
        ),
        "load-post": opt.register_load_state_dict_post_hook(
            lambda o: log.append(("load-post", who(o), [g["lr"] for g in o.param_groups]))
        ),
    }
    try:
        for i in range(4):
            log.append(("call", i))
            p.grad = torch.full_like(p, 0.5 + i)
            opt.step()
        log.append(("call", "closure-kw"))
        assert opt.step(closure=lambda: torch.tensor(3.0)).item() == 3.0
        log.append(("call", "closure-positional"))
        opt.step(lambda: torch.tensor(4.0))
        log.append(("call", "bystander"))
        bystander.step()
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0]["lr"] = 0.25
        opt.load_state_dict(sd)
        handles.pop("pre").remove()
        handles.pop("sd-post").remove()
        log.append(("call", "after-two-removals"))
        opt.step()
        opt.state_dict()
        for h in handles.values():
            h.remove()
        log.append(("call", "after-all-removals"))
        opt.step()
        opt.load_state_dict(opt.state_dict())
        bystander.step()
    finally:
        for h in handles.values():
            h.remove()
    return log


@pytest.mark.parametrize("k", [1, 3], ids=["K1", "K3"])
def test_hook_event_log_matches_sgd(k):
    """Same hooks, same order, same arguments, once per call, until removed;
    with K=3 too, where most step() calls only count a micro-batch."""
    expected = _event_log("sgd", 1)
    got = _event_log("ours", k)
    assert got == expected
    # the script is not vacuous: global pre, own pre, own post, global post per step() call
    first_call = expected[1:5]
    assert [e[0] for e in first_call] == ["global-pre", "pre", "post", "global-post"]
    assert expected[-1] == ("call", "after-all-removals")


def test_step_pre_hook_may_swap_the_arguments():
    """A step pre hook that returns (args, kwargs) replaces what step() gets:
    here the closure, whose loss step() then returns."""
    for kind in ("sgd", "ours"):
        p = nn.Parameter(torch.ones(3))
        opt = _make(kind, [p], lr=0.5)
        ran = []

        def replacement():
            ran.append("replacement")
            p.grad = torch.full_like(p, 2.0)
            return torch.tensor(7.0)

        # args holds the optimizer itself, then step()'s own arguments
        opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0], replacement), {}))
        loss = opt.step(lambda: ran.append("original"))
        assert ran == ["replacement"], kind
        assert loss.item() == 7.0, kind
        assert torch.equal(p.detach(), torch.zeros(3)), kind


def _trained(kind: str, k: int = 1):
    """An optimizer after two updates (momentum state exists); with K > 1
    also one micro-batch into the next window."""
    p = nn.Parameter(torch.linspace(0.0, 1.0, 5))
    opt = _make(kind, [p], lr=0.1, momentum=0.9, **({"accumulation_steps": k} if kind == "ours" else {}))
    calls = 2 * k + (k > 1) if kind == "ours" else 2
    for i in range(calls):
        opt.zero_grad()
        p.grad = torch.full_like(p, 1.0 + i // k)
        opt.step()
    return p, opt


@pytest.mark.parametrize("kind", ["sgd", "ours"])
def test_state_dict_hooks_see_and_shape_the_result(kind):
    """A pre hook may put extra (non-parameter) entries in ``state``; they are
    saved. A post hook gets the finished dict (SGD's entries, no private
    ones), may edit it in place or return a replacement, and what it leaves
    is what state_dict() returns."""
    p, opt = _trained(kind, k=2)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("note", {"epoch": 3}))
    seen = {}

    def post(o, sd):
        seen["dict"] = copy.deepcopy(sd)
        sd["edited"] = True

    opt.register_state_dict_post_hook(post)
    out = opt.state_dict()
    assert out["state"]["note"] == {"epoch": 3}
    assert out["edited"] is True
    assert_same(without_edit(out), seen["dict"], "dict seen by the post hook")
    per_param = [v for key, v in out["state"].items() if key != "note"]
    assert per_param and all(set(v) == {"momentum_buffer"} for v in per_param)

    opt.register_state_dict_post_hook(lambda o, sd: {"replaced": sd["param_groups"][0]["lr"]})
    assert opt.state_dict() == {"replaced": 0.1}


def without_edit(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k != "edited"}


def test_state_dict_post_hook_result_matches_sgd_format():
    """What a post hook sees from AccumOptimizer is SGD's dict plus the
    micro-batch counter, nothing else."""
    seen = {}
    for kind in ("sgd", "ours"):
        p, opt = _trained(kind, k=1)
        opt.register_state_dict_post_hook(lambda o, sd, kind=kind: seen.__setitem__(kind, copy.deepcopy(sd)))
        opt.state_dict()
    ours, ref = seen["ours"], seen["sgd"]
    assert set(ours) == set(ref) | {"accumulation"}
    assert_same(ours["state"], ref["state"], "state")
    for g, rg in zip(ours["param_groups"], ref["param_groups"]):
        assert_same_settings(g, rg)


@pytest.mark.parametrize("prepend", [False, True], ids=["append", "prepend"])
def test_load_pre_hooks_run_in_registration_order(prepend):
    """One pre hook edits the dict it is given in place, a second returns a
    replacement; with prepend=True the second runs first. The post hook sees
    the outcome. Order and outcome as SGD."""
    results = {}
    for kind in ("sgd", "ours"):
        p, opt = _trained(kind, k=1)
        order = []

        def edit(o, sd):
            order.append("edit")
            sd["param_groups"][0]["lr"] = 0.25

        def swap(o, sd):
            order.append("swap")
            new = copy.deepcopy(sd)
            new["param_groups"][0]["lr"] = 0.5
            return new

        opt.register_load_state_dict_pre_hook(edit)
        opt.register_load_state_dict_pre_hook(swap, prepend=prepend)
        opt.register_load_state_dict_post_hook(lambda o: order.append(("post", o.param_groups[0]["lr"])))
        given = copy.deepcopy(opt.state_dict())
        opt.load_state_dict(given)
        results[kind] = (order, opt.param_groups[0]["lr"])
    assert results["ours"] == results["sgd"]
    assert results["sgd"][1] == (0.25 if prepend else 0.5)


def test_load_post_hook_sees_the_loaded_optimizer():
    """The post hook runs once the load has fully taken effect: loaded
    hyper-parameters, momentum buffers and micro-batch counter (the next
    step() is a boundary), and may then add entries to ``state``."""
    p, opt = _trained("ours", k=2)  # one micro-batch into a window of 2
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 0.03

    q = nn.Parameter(torch.zeros(5))
    fresh = AccumOptimizer([q], lr=1.0, momentum=0.9, accumulation_steps=2)
    assert not fresh.is_accumulation_boundary
    seen = []

    def post(o):
        seen.append((o.param_groups[0]["lr"], o.is_accumulation_boundary, o.state[q]["momentum_buffer"].clone()))
        o.state["restored"] = True

    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(saved)
    assert len(seen) == 1
    lr, boundary, buf = seen[0]
    assert lr == 0.03
    assert boundary is True
    assert_same(buf, saved["state"][0]["momentum_buffer"], "momentum buffer seen by the post hook")
    assert fresh.state["restored"] is True

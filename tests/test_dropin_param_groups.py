"""Param groups, params without gradients and zero_grad, as torch.optim.SGD
has them, for every SGD option set torch tests SGD with.

(Mid-training add_param_group, several groups with K > 1, and bad
hyper-parameters in add_param_group: tests/test_api_compat.py and
tests/test_bad_input.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _dropin import (
    MATRIX_MODULE,
    MATRIX_REASON,
    Pair,
    assert_same,
    assert_same_settings,
    random_grads,
    sgd,
    twin_params,
    values,
)
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import option_names, options  # noqa: E402

TINY_LR = 1e-28  # the optimizer-wide lr; a group left at it must not move


def _three_params():
    return [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("option", option_names())
def test_groups_with_their_own_options_match_sgd(option):
    """A weight group with the option set, a bias group with the same but no
    weight decay, and an idle group on the optimizer's defaults: every step
    equals SGD's; the loss moves the way the option set asks; the idle group
    (which has gradients) keeps its bits."""
    kw = options(option)
    kw.setdefault("lr", 1e-2)

    def groups(ps):
        w, b, idle = ps
        return [{"params": [w], **kw}, {"params": [b], **{**kw, "weight_decay": 0.0}}, {"params": [idle]}]

    ref_ps, ps = twin_params(_three_params)
    ref = sgd(groups(ref_ps), lr=TINY_LR)
    ours = AccumOptimizer(groups(ps), lr=TINY_LR)
    x = torch.linspace(-1.0, 1.0, 4)
    gen = torch.Generator().manual_seed(5)
    idle_start = ps[2].detach().clone()
    losses = []
    for step in range(15):
        idle_grad = torch.randn(3, generator=gen)
        for opt, (w, b, idle) in ((ref, ref_ps), (ours, ps)):
            opt.zero_grad()
            loss = (w @ x + b).pow(2).sum()
            loss.backward()
            idle.grad = idle_grad.clone()
            opt.step()
        losses.append(loss.item())
        assert_same(values(ps), values(ref_ps), f"step {step} params")
        assert_same([ours.state[p].get("momentum_buffer") for p in ps],
                    [ref.state[p].get("momentum_buffer") for p in ref_ps], f"step {step} buffers")
    assert torch.equal(ps[2].detach(), idle_start)
    if kw.get("maximize"):
        assert losses[-1] > losses[0]
    else:
        assert losses[-1] < losses[0]


def _bad_groups(own_param, fresh):
    leaf = nn.Parameter(torch.randn(2))
    return {
        "not-a-dict": [fresh],
        "params-in-a-set": {"params": {fresh}},
        "param-already-in-a-group": {"params": [own_param]},
        "non-leaf": {"params": [leaf * 2]},
        "named-into-unnamed": {"params": [("extra", fresh)]},
    }


@pytest.mark.parametrize("case", list(_bad_groups(None, None)))
def test_add_param_group_refuses_what_sgd_refuses(case):
    """Same exception type and message as SGD, and the groups stay as they were."""
    errors = {}
    for name, make in (("SGD", sgd), ("ours", AccumOptimizer)):
        p = nn.Parameter(torch.randn(3))
        opt = make([p], lr=0.1, momentum=0.9)
        with pytest.raises(Exception) as info:
            opt.add_param_group(_bad_groups(p, nn.Parameter(torch.randn(3)))[case])
        errors[name] = (type(info.value), str(info.value))
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]
    assert errors["ours"] == errors["SGD"]


def test_add_param_group_accepts_what_sgd_accepts():
    """A bare tensor as ``params``, an empty params list and an unknown key are
    accepted as by SGD; missing settings come from the defaults."""
    added = {}
    for name, make in (("SGD", sgd), ("ours", AccumOptimizer)):
        opt = make([nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9)
        lone = nn.Parameter(torch.randn(2))
        opt.add_param_group({"params": lone, "lr": 0.5})
        opt.add_param_group({"params": [], "nesterov": True})
        opt.add_param_group({"params": [nn.Parameter(torch.randn(1))], "note": "kept"})
        assert opt.param_groups[1]["params"] == [lone]
        added[name] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups[1:]]
    for g, rg in zip(added["ours"], added["SGD"]):
        assert_same_settings(g, rg)


def test_empty_parameter_lists_as_sgd():
    """No params at all is SGD's ValueError; an empty group beside a real
    one is fine and steps."""
    messages = []
    for make in (sgd, AccumOptimizer):
        with pytest.raises(ValueError) as info:
            make([], lr=0.1)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    pair = Pair(lambda: [nn.Parameter(torch.randn(4))], dict(lr=0.1, momentum=0.9),
                groups=lambda ps: [{"params": []}, {"params": ps}])
    for _ in range(3):
        pair.step([torch.randn(4)])
    pair.check("empty group beside a real one")


@pytest.mark.parametrize("option", option_names())
def test_params_without_grads_are_left_alone(option):
    """A param that never gets a grad keeps its bits and gets no state; one
    whose grad comes and goes keeps its momentum while it has none; all as SGD."""
    pair = Pair(lambda: [nn.Parameter(torch.randn(5)) for _ in range(4)], options(option))
    never = pair.params[2].detach().clone()
    gen = torch.Generator().manual_seed(8)
    for step in range(6):
        g = random_grads(pair.params, gen)
        g[2] = None
        if step % 2:
            g[3] = None
        pair.step(g)
        pair.check(f"step {step}")
    assert torch.equal(pair.params[2].detach(), never)
    assert pair.ours.state_dict()["state"].keys() == pair.ref.state_dict()["state"].keys()
    assert 2 not in pair.ours.state_dict()["state"]

    # a step whose closure sets no grad at all changes nothing
    untouched = Pair(lambda: [nn.Parameter(torch.randn(2, 3)) for _ in range(2)], options(option))
    before = values(untouched.params)
    assert untouched.ours.step(lambda: torch.tensor(1.5)).item() == 1.5
    assert_same(values(untouched.params), before, "params after a gradient-free step", rtol=0, atol=0)
    assert untouched.ours.state_dict()["state"] == {}


@pytest.mark.parametrize("option", option_names())
def test_zero_grads_move_params_only_through_weight_decay(option):
    pair = Pair(lambda: [nn.Parameter(torch.randn(5, 2))], options(option))
    before = values(pair.params)
    for _ in range(2):
        pair.step([torch.zeros(5, 2)])
        pair.check()
    if options(option).get("weight_decay", 0) == 0:
        assert_same(values(pair.params), before, "params after zero-gradient steps", rtol=0, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False, None], ids=["to-none", "in-place", "default"])
def test_zero_grad_like_sgd(set_to_none):
    """zero_grad(): None by default and with set_to_none=True; with False the
    same tensor, zeroed and cut from any graph (a grad built with
    create_graph=True has a grad_fn)."""
    seen = []
    for make in (sgd, AccumOptimizer):
        w = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        opt = make([w], lr=0.1)
        (grad,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)
        w.grad = grad
        assert grad.grad_fn is not None
        opt.zero_grad() if set_to_none is None else opt.zero_grad(set_to_none=set_to_none)
        if w.grad is None:
            seen.append(None)
        else:
            seen.append((w.grad is grad, w.grad.grad_fn, w.grad.requires_grad, w.grad.tolist()))
    assert seen[1] == seen[0]
    assert (seen[0] is None) == (set_to_none is not False)

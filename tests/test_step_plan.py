"""The step plan (torch_fastaccum/_plan.py): made once per boundary step and
shared by the GradScaler's check pass and the update, but never reused when
what it rests on changed in between."""

from __future__ import annotations

import pytest
import torch

from _helpers import make_mlp
from torch_fastaccum import AccumOptimizer, GradScaler
from torch_fastaccum._plan import Planner

K = 3


@pytest.fixture
def plan_calls(monkeypatch):
    calls = []
    original = Planner.plan

    def counting(self, param_groups, micro_step):
        calls.append(micro_step)
        return original(self, param_groups, micro_step)

    monkeypatch.setattr(Planner, "plan", counting)
    return calls


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("unscale", [False, True], ids=["step", "unscale+step"])
def test_one_plan_per_boundary_step_with_a_scaler(plan_calls, unscale):
    m = make_mlp()
    opt = AccumOptimizer(m.parameters(), lr=0.1, momentum=0.9, accumulation_steps=K)
    scaler = GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # the scale tensor is made lazily, here
    for i in range(2 * K):
        _grads(m, i)
        if unscale and opt.is_accumulation_boundary:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    # Counting micro-batches plan nothing; each boundary plans once.
    assert plan_calls == [K - 1, 2 * K - 1]


def _run(edit_between, seed=0):
    """One boundary step of K=1 with a scaler, `edit_between(model)` applied
    after unscale_ (the plan is made) and before step (it is used)."""
    m = make_mlp(seed)
    opt = AccumOptimizer(m.parameters(), lr=0.1, momentum=0.9)
    scaler = GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    _grads(m, 7)
    for p in m.parameters():
        p.grad.mul_(8.0)
    scaler.unscale_(opt)
    edit_between(m)
    scaler.step(opt)
    return m, opt


def test_a_grad_replaced_after_unscale_is_the_one_the_step_uses(plan_calls):
    new = {}

    def replace(m):
        w = m[0].weight
        new["g"] = w.grad = torch.full_like(w, 0.5)

    m, _ = _run(replace)
    assert len(plan_calls) == 2, "the kept plan named the old grad: it must be remade"
    ref = make_mlp(0)
    _grads(ref, 7)
    ref[0].weight.grad = new["g"].clone()
    torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9).step()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_grad_set_to_none_after_unscale_is_skipped(plan_calls):
    def drop(m):
        m[2].bias.grad = None

    m, opt = _run(drop)
    assert torch.equal(m[2].bias, make_mlp(0)[2].bias)
    assert m[2].bias not in opt.state or not opt.state[m[2].bias]


def test_a_param_cast_after_unscale_remakes_the_plan(plan_calls):
    def cast(m):
        b = m[2].bias
        b.data = b.data.double()
        b.grad = b.grad.double()

    m, opt = _run(cast)
    assert len(plan_calls) == 2
    assert opt.state[m[2].bias]["momentum_buffer"].dtype == torch.float64


def test_an_unchanged_plan_is_reused(plan_calls):
    _run(lambda m: None)
    assert len(plan_calls) == 1


def test_a_kept_plan_serves_only_its_own_boundary(plan_calls):
    m = make_mlp()
    _grads(m, 1)
    groups = [{"params": list(m.parameters())}]
    planner = Planner()
    kept = planner.boundary_plan(groups, 5, keep=True)
    assert planner.boundary_plan(groups, 5 + K, keep=False) is not kept
    # Taken once: the next request plans anew even at the same position.
    planner.boundary_plan(groups, 5, keep=True)
    assert planner.boundary_plan(groups, 5, keep=False) is not kept
    assert plan_calls == [5, 5 + K, 5]

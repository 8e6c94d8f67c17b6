"""The surface code written for torch.optim.SGD touches: repr(), defaults,
param_groups' settings, what step() returns and when it calls the closure,
and what ``state`` holds after a step.

(SGD's positional argument order and defaults: tests/test_api_compat.py;
step(closure) over a longer run: tests/test_optimizer_parity.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _dropin import assert_same, assert_same_settings, sgd, values
from torch_fastaccum import AccumOptimizer

CASES = {
    "defaults": {},
    "momentum-nesterov": dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "tensor-lr-maximize": dict(lr=torch.tensor(0.05), dampening=0.2, momentum=0.5, maximize=True),
}


def _two_groups(kw):
    groups = [{"params": [nn.Parameter(torch.randn(3, 2))]},
              {"params": [nn.Parameter(torch.randn(4))], "lr": 0.125, "weight_decay": 0.5}]
    return groups, copy.deepcopy(groups)


@pytest.mark.parametrize("case", list(CASES))
def test_repr_reads_like_sgds(case):
    """Optimizer's layout: a header naming the class, then per group its
    settings one per line, sorted; SGD's lines all there, in SGD's order,
    plus one line for each setting SGD does not have."""
    ours_groups, ref_groups = _two_groups(CASES[case])
    ours = AccumOptimizer(ours_groups, **copy.deepcopy(CASES[case]))
    ref = torch.optim.SGD(ref_groups, **copy.deepcopy(CASES[case]))
    ours_lines, ref_lines = repr(ours).splitlines(), repr(ref).splitlines()
    assert ours_lines[0] == "AccumOptimizer (" and ref_lines[0] == "SGD ("
    assert [line for line in ours_lines[1:] if line in ref_lines] == ref_lines[1:]
    extra = {line.split(":")[0].strip() for line in ours_lines[1:] if line not in ref_lines}
    assert extra == set(ours.param_groups[0]) - set(ref.param_groups[0]), extra
    assert "accumulation_steps" in extra


@pytest.mark.parametrize("case", list(CASES))
def test_defaults_and_groups_hold_sgds_settings(case):
    ours_groups, ref_groups = _two_groups(CASES[case])
    ours = AccumOptimizer(ours_groups, **copy.deepcopy(CASES[case]))
    ref = sgd(ref_groups, **copy.deepcopy(CASES[case]))
    assert isinstance(ours, torch.optim.Optimizer)
    assert_same_settings(ours.defaults, ref.defaults)
    assert len(ours.param_groups) == len(ref.param_groups) == 2
    for g, rg in zip(ours.param_groups, ref.param_groups):
        assert_same_settings(g, rg)
        assert g["accumulation_steps"] == ours.accumulation_steps == 1
    later = [nn.Parameter(torch.randn(2)) for _ in range(2)]
    ours.add_param_group({"params": [later[0]], "momentum": 0.25})
    ref.add_param_group({"params": [later[1]], "momentum": 0.25})
    assert_same_settings(ours.param_groups[-1], ref.param_groups[-1])


@pytest.mark.parametrize("k", [1, 3], ids=["K1", "K3"])
def test_step_returns_and_closure_calls(k):
    """step() returns None; step(closure) calls the closure exactly once per
    call, with grad enabled even under no_grad, and returns what it returned
    (every call, also the ones that only count a micro-batch)."""
    w = nn.Parameter(torch.linspace(-1.0, 1.0, 5))
    opt = AccumOptimizer([w], lr=0.1, momentum=0.9, accumulation_steps=k)
    calls, returned = [], []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        returned.append(loss)
        return loss

    for i in range(2 * k):
        assert opt.step() is None
        with torch.no_grad():
            got = opt.step(closure)
        assert calls == [True] * (i + 1)
        assert got is returned[-1]


def test_step_with_closure_like_sgd():
    """The same closure-driven run on both: same losses returned, same params."""
    runs = []
    for make in (sgd, AccumOptimizer):
        torch.manual_seed(71)
        net = nn.Linear(4, 2)
        x = torch.randn(6, 4)
        opt = make(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)

        def closure(opt=opt, net=net):
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        losses = [opt.step(closure).item() for _ in range(5)]
        runs.append((losses, values(net.parameters())))
    (ref_losses, ref_params), (losses, params) = runs
    assert losses == ref_losses
    assert_same(params, ref_params, "params")


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no-momentum", "momentum"])
def test_state_after_a_step(momentum):
    """After a step, ``state`` has an entry for the params SGD has one for
    and no empty entry; saved, it is SGD's."""
    saved = []
    for make in (sgd, AccumOptimizer):
        torch.manual_seed(72)
        net = nn.Linear(5, 5)
        frozen = nn.Parameter(torch.randn(3))  # never gets a grad
        opt = make([*net.parameters(), frozen], lr=0.1, momentum=momentum)
        opt.zero_grad()
        net(torch.rand(2, 5)).sum().backward()
        opt.step()
        if make is AccumOptimizer:
            entries = {p: dict(s) for p, s in opt.state.items()}
            assert all(len(s) > 0 for s in entries.values())
            assert frozen not in entries
            if momentum:
                assert all("momentum_buffer" in entries.get(p, {}) for p in net.parameters())
        saved.append(opt.state_dict()["state"])
    assert_same(saved[1], saved[0], "saved state")

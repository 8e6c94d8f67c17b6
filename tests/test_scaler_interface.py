"""GradScaler and AccumOptimizer meet at one small interface: the scaler uses
``is_accumulation_boundary``, ``check_grads_``, ``unscale_grads_``,
``clip_grads_``, ``clip_grad_norm_`` and ``step`` of the optimizer (and
torch's ``param_groups`` for other optimizers), imports nothing private from
it, and each method behaves as documented when called on its own."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import torch_fastaccum
from _helpers import make_mlp
from torch_fastaccum import AccumOptimizer
from torch_fastaccum._sparse_step import grad_multiplier

SCALER_SRC = pathlib.Path(torch_fastaccum.__file__).with_name("grad_scaler.py")
INTERFACE = {"is_accumulation_boundary", "check_grads_", "unscale_grads_", "clip_grads_", "clip_grad_norm_", "step",
             "__dict__", "param_groups"}


def test_grad_scaler_uses_only_the_interface():
    tree = ast.parse(SCALER_SRC.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ...
            names = [a.name for a in node.names]
            assert node.module == "optimizer" and names == ["AccumOptimizer"], ast.dump(node)
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "optimizer"}
    assert used <= INTERFACE, used - INTERFACE


def _opt(K=2):
    m = make_mlp()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    return m, AccumOptimizer(m.parameters(), lr=0.1, accumulation_steps=K)


def test_check_grads_is_read_only_and_flags_per_device():
    m, opt = _opt(K=1)
    before = [p.grad.clone() for p in m.parameters()]
    found = torch.zeros(())
    assert opt.check_grads_(found) == {torch.device("cpu"): found} and found.item() == 0
    m[0].weight.grad[0, 0] = float("nan")
    assert opt.check_grads_(found)[torch.device("cpu")].item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before[1:], [p.grad for p in m.parameters()][1:]))


def test_unscale_grads_leaves_the_mean_and_the_step_applies_nothing_again():
    K = 4
    m, opt = _opt(K)
    for _ in range(K - 1):
        opt.step()
    sums = [p.grad.clone() for p in m.parameters()]
    scale = torch.tensor(3.0)  # not a power of two: the rounding shows
    opt.unscale_grads_(scale, torch.zeros(()))
    inv = torch.tensor(1 / 3.0, dtype=torch.float64).float().double().item()
    for g, s in zip([p.grad for p in m.parameters()], sums):
        assert torch.equal(g, s * (inv / K))
    unscaled = [p.grad.clone() for p in m.parameters()]
    opt.step()  # no scaler handed over a scale: the grads are used as they are
    for g, u in zip([p.grad for p in m.parameters()], unscaled):
        assert torch.equal(g, u)


@pytest.mark.parametrize("call", ["check_grads_", "unscale_grads_"])
def test_interface_refuses_a_partial_window(call):
    m, opt = _opt(K=3)
    before = [p.grad.clone() for p in m.parameters()]
    args = (torch.zeros(()),) if call == "check_grads_" else (torch.tensor(2.0), torch.zeros(()))
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        getattr(opt, call)(*args)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))


@pytest.mark.parametrize("factor", [1.0, 0.25, 1 / 3])
def test_sparse_multiplier_is_the_kernels(factor):
    """The sparse path reads the dense kernels' multiplier back instead of
    forming the reciprocal itself: float(1/double(scale)) * factor."""
    g = torch.Generator().manual_seed(0)
    for s in [1.0, 3.0, 65536.0, 0.7, *(torch.rand(20, generator=g) * 1e4).tolist()]:
        scale = torch.tensor(s, dtype=torch.float32)
        want = torch.tensor(1.0 / scale.double().item()).float().item() * factor
        assert grad_multiplier(factor, scale) == want
    assert grad_multiplier(factor, None) == factor

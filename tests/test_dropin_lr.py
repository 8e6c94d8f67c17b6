"""The learning rate as SGD takes it: a Python float or a 1-element tensor
(0-dim or shape (1,)), changed between steps by torch's lr schedulers, for
every SGD option set torch tests SGD with and every scheduler combination
torch steps SGD with (ReduceLROnPlateau fed the loss that step(closure)
returns).

(tests/test_api_compat.py runs further schedulers with accumulation windows,
K = 2, and a tensor lr changed in place between steps.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from _dropin import MATRIX_MODULE, MATRIX_REASON, Pair, assert_same, random_grads, sgd, twin_params, values
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import SCHEDULER_SET_NAMES, SCHEDULER_SETS, option_names, options  # noqa: E402


def _base_lr(kw: dict) -> float:
    return float(kw.get("lr", 1e-3))


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
@pytest.mark.parametrize("option", option_names())
def test_tensor_lr_is_the_same_as_float_lr(option, shape):
    """A tensor lr gives the float lr's parameters bit for bit, and SGD's with
    the same tensor lr; it stays the tensor it was in param_groups."""
    kw = options(option)
    lr = _base_lr(kw)
    as_tensor = {**kw, "lr": torch.full(shape, lr)}
    pair = Pair(lambda: [nn.Parameter(torch.randn(7, 3)), nn.Parameter(torch.randn(()))], as_tensor)
    _, float_params = twin_params(lambda: [nn.Parameter(torch.randn(7, 3)), nn.Parameter(torch.randn(()))])
    with_float = AccumOptimizer(float_params, **{**kw, "lr": lr})
    gen = torch.Generator().manual_seed(9)
    for step in range(5):
        grads = random_grads(pair.params, gen)
        pair.step(grads)
        for p, g in zip(float_params, grads):
            p.grad = g.clone()
        with_float.step()
        pair.check(f"step {step}")
        assert_same(values(pair.params), values(float_params), f"step {step}: tensor lr vs float lr", rtol=0, atol=0)
    group_lr = pair.ours.param_groups[0]["lr"]
    assert isinstance(group_lr, torch.Tensor) and group_lr.shape == torch.Size(shape)


def _two_group_setup(make, kw: dict, bias_lr_kind: str):
    """The option set for the optimizer; a strided weight (a transposed view)
    in a group on those settings, the bias in a group with its own lr (a
    float or a tensor, whatever the option set's lr is)."""
    weight = nn.Parameter(torch.randn(4, 6).t())
    bias = nn.Parameter(torch.randn(6))
    bias_lr = torch.tensor(0.01) if bias_lr_kind == "tensor" else 0.01
    opt = make([{"params": [weight]}, {"params": [bias], "lr": bias_lr}], **kw)
    return weight, bias, opt


@pytest.mark.parametrize("bias_lr", ["float", "tensor"], ids=["bias-lr-float", "bias-lr-tensor"])
@pytest.mark.parametrize("sched", range(len(SCHEDULER_SETS)), ids=SCHEDULER_SET_NAMES)
@pytest.mark.parametrize("option", option_names())
def test_schedulers_drive_the_lr_as_for_sgd(option, sched, bias_lr):
    """20 steps under a scheduler combination: each group's lr follows SGD's
    sequence exactly, the parameters are SGD's bit for bit, and the loss
    moves the way the option set asks."""
    x = torch.linspace(-1.0, 1.0, 4)
    runs = []
    with torch.random.fork_rng(devices=[]):
        for make in (sgd, AccumOptimizer):
            torch.manual_seed(13)
            kw = options(option)
            weight, bias, opt = _two_group_setup(make, kw, bias_lr)
            schedulers = [factory(opt) for factory in SCHEDULER_SETS[sched]]

            def closure(opt=opt, weight=weight, bias=bias):
                opt.zero_grad()
                loss = (weight @ x + bias).pow(2).sum()
                loss.backward()
                return loss

            lrs, losses = [], []
            for _ in range(20):
                loss = opt.step(closure).item()
                losses.append(loss)
                for s in schedulers:
                    s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
                lrs.append([float(g["lr"]) for g in opt.param_groups])
            kinds = [type(g["lr"]) for g in opt.param_groups]
            runs.append((lrs, losses, kinds, values([weight, bias])))
    (ref_lrs, ref_losses, ref_kinds, ref_params), (lrs, losses, kinds, params) = runs
    assert lrs == ref_lrs
    assert kinds == ref_kinds
    assert losses == ref_losses
    assert_same(params, ref_params, "params")
    final = (params[0] @ x + params[1]).pow(2).sum().item()
    if options(option).get("maximize"):
        assert final > losses[0]
    else:
        assert final < losses[0]

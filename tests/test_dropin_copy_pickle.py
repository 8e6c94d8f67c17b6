"""copy.deepcopy and pickle of a stepped AccumOptimizer, as for
torch.optim.SGD: the copy has the same settings, state, public attributes
and place in the accumulation window, owns its own tensors, and training it
further gives the original's parameters bit for bit.

(tests/test_api_compat.py drives copies made mid-window with a GradScaler
and injected infs; here the copies' GradScaler hand-over is checked through
torch's own GradScaler.)
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from _dropin import assert_same, net_batch, net_loss, small_net_pair, train
from torch_fastaccum import AccumOptimizer

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov-tensor-lr": dict(lr=torch.tensor(0.04), momentum=0.8, nesterov=True, weight_decay=0.01),
    "dampening-maximize-K3": dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True, accumulation_steps=3),
    "plain-K2": dict(lr=0.1, accumulation_steps=2),
}


def _duplicate(obj, how: str):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))



def _public(obj) -> set[str]:
    return {k for k in vars(obj) if not k.startswith("_")}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", list(CASES))
def test_copy_continues_like_the_original(case, how):
    kwargs = copy.deepcopy(CASES[case])
    net, _ = small_net_pair(seed=31)
    opt = AccumOptimizer(net.parameters(), **kwargs)
    k = opt.accumulation_steps
    batches = [net_batch(seed=90 + i) for i in range(6 * k)]
    stop = 3 * k + (1 if k > 1 else 0)  # mid-window where K > 1
    train(opt, net, batches[:stop])

    twin_net, twin = _duplicate((net, opt), how)
    # a Parameter's copy has no .grad (torch's rule): hand the window's sum over
    for p, q in zip(net.parameters(), twin_net.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()

    assert type(twin) is AccumOptimizer
    assert _public(twin) == _public(opt)
    assert_same(twin.defaults, opt.defaults, "defaults")
    assert (twin.accumulation_steps, twin.is_accumulation_boundary) == (k, opt.is_accumulation_boundary)
    for g, tg in zip(opt.param_groups, twin.param_groups):
        assert_same({**tg, "params": None}, {**g, "params": None}, "param group settings")
        assert all(a is b for a, b in zip(tg["params"], twin_net.parameters()))
    assert_same(twin.state_dict(), opt.state_dict(), "state dict")
    for p, q in zip(net.parameters(), twin_net.parameters()):
        if "momentum_buffer" in opt.state.get(p, {}):  # .get: state is a defaultdict
            assert opt.state[p]["momentum_buffer"].data_ptr() != twin.state[q]["momentum_buffer"].data_ptr()

    train(opt, net, batches[stop:])
    train(twin, twin_net, batches[stop:])
    assert_same(list(twin_net.parameters()), list(net.parameters()), "params", rtol=0, atol=0)
    assert_same(twin.state_dict(), opt.state_dict(), "state dict at the end", rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_still_takes_grad_scaler_hand_over(how):
    """torch's GradScaler hands grad_scale/found_inf to optimizers that
    declare they can take them, instead of unscaling itself: the copy must
    still be such an optimizer, and must skip an overflowing step as the
    original does."""
    net, _ = small_net_pair(seed=32)
    opt = AccumOptimizer(net.parameters(), lr=0.05, momentum=0.9)
    batches = [net_batch(seed=110 + i) for i in range(6)]
    train(opt, net, batches[:2])
    twin_net, twin = _duplicate((net, opt), how)

    outcome = []
    for o, m in ((opt, net), (twin, twin_net)):
        handed = []
        o.register_step_pre_hook(lambda self, args, kwargs: handed.append(hasattr(self, "found_inf")))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for i, (x, y) in enumerate(batches[2:]):
            o.zero_grad()
            loss = net_loss(m, x, y) * (float("inf") if i == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
        outcome.append((handed, scaler.get_scale(), [p.detach().clone() for p in m.parameters()]))
    (handed, scale, params), (twin_handed, twin_scale, twin_params) = outcome
    assert handed == [True] * 4
    assert twin_handed == handed and twin_scale == scale == 2.0**7
    assert_same(twin_params, params, "params", rtol=0, atol=0)


def test_state_dict_loads_into_an_earlier_deepcopy():
    """Deep-copy an optimizer (with its model) before training, then load the
    trained one's checkpoint into the copy: both continue identically, and
    the copy's steps leave the original's state alone."""
    net, _ = small_net_pair(seed=33)
    opt = AccumOptimizer(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    twin_net, twin = copy.deepcopy((net, opt))
    batches = [net_batch(seed=120 + i) for i in range(6)]
    train(opt, net, batches[:3])

    twin_net.load_state_dict(net.state_dict())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    saved = copy.deepcopy(opt.state_dict())
    train(twin, twin_net, batches[3:])
    assert_same(opt.state_dict(), saved, "the original's state after the copy trained", rtol=0, atol=0)
    train(opt, net, batches[3:])
    assert_same(list(twin_net.parameters()), list(net.parameters()), "params", rtol=0, atol=0)

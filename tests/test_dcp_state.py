"""torch.distributed.checkpoint's state-dict functions on one process (a plain
model; the FSDP2 runs are in tests/test_fsdp2.py).

* get_optimizer_state_dict of a fresh optimizer: DCP makes the state with one
  step() at lr 0 on zero grads. AccumOptimizer with K > 1 gives SGD's state
  (momentum buffers, equal to SGD's), leaves the window where it was and
  the grads None, and the params unchanged. A user's own lr-0 step on zero
  grads (a warmup) is a micro-batch as any other.
* get/set_optimizer_state_dict inside a window, in DCP's nested and
  flattened formats: the loaded optimizer stands where the saved one stood
  (DCP keeps only state and param groups; the counter is a group key).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers import make_batches, make_mlp
from torch_fastaccum import AccumOptimizer

dsd = pytest.importorskip("torch.distributed.checkpoint.state_dict", reason="torch.distributed.checkpoint unavailable")

K = 4
KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)


def _train(model, opt, n):
    for x, y in make_batches("mlp", n, seed=2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_fresh_state_for_dcp_is_sgds_and_moves_nothing():
    model = make_mlp(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **KW)
    ref_model = make_mlp(seed=1)
    ref = torch.optim.SGD(ref_model.parameters(), **KW)
    ours_sd = dsd.get_optimizer_state_dict(model, opt)
    ref_sd = dsd.get_optimizer_state_dict(ref_model, ref)
    assert sorted(ours_sd["state"]) == sorted(ref_sd["state"]) and len(ref_sd["state"]) == len(before)
    for fqn, s in ref_sd["state"].items():
        assert torch.equal(ours_sd["state"][fqn]["momentum_buffer"], s["momentum_buffer"]), fqn
    assert any(s["momentum_buffer"].abs().max() > 0 for s in ref_sd["state"].values())  # wd * p
    assert opt._micro_step == 0 and opt.is_accumulation_boundary is False
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert [g["lr"] for g in opt.param_groups] == [KW["lr"]]


def test_lr_zero_step_on_zero_grads_is_a_micro_batch():
    model = make_mlp(seed=1)
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **{**KW, "lr": 0.0})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt._micro_step == 1 and not opt.state
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_dcp_round_trip_inside_a_window(flatten):
    options = dsd.StateDictOptions(flatten_optimizer_state_dict=flatten)
    model = make_mlp(seed=1)
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **KW)
    _train(model, opt, 2 * K + 2)
    # A copy, as a checkpoint on disk is: DCP hands out the live buffers.
    sd = copy.deepcopy(dsd.get_optimizer_state_dict(model, opt, options=options))
    assert "accumulation" not in sd  # what DCP drops

    model2 = make_mlp(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2 = AccumOptimizer(model2.parameters(), accumulation_steps=K, **KW)
    dsd.set_optimizer_state_dict(model2, opt2, sd, options=options)
    assert opt2._micro_step == opt._micro_step == 2 * K + 2
    assert [g["accumulation_micro_step"] for g in opt2.param_groups] == [None]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[p2]["momentum_buffer"])
        assert isinstance(opt2.state[p2]["momentum_updates"], torch.Tensor)
    # both continue alike from the same grads
    for p, p2 in zip(model.parameters(), model2.parameters()):
        p2.grad = p.grad.clone()
    _train(model, opt, K + 2)
    _train(model2, opt2, K + 2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_group_counters_that_disagree_are_refused():
    model = make_mlp(seed=1)
    opt = AccumOptimizer([{"params": [model[0].weight]}, {"params": [model[0].bias]}], accumulation_steps=K, **KW)
    sd = opt.state_dict()
    del sd["accumulation"]
    sd["param_groups"][0]["accumulation_micro_step"] = 1
    with pytest.raises(ValueError, match="accumulation_micro_step"):
        opt.load_state_dict(sd)
    assert opt._micro_step == 0

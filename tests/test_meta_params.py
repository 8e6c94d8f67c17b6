"""Meta parameters (models built on `meta`, materialised later) take a
shape-only step, as torch.optim.SGD's default path does on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torch_fastaccum import AccumOptimizer, GradScaler


def _meta_model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def _fill_grads(model):
    for p in model.parameters():
        p.grad = torch.empty_like(p)


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_meta_step_is_shape_only_like_sgd(momentum, K):
    ours_m, ref_m = _meta_model(), _meta_model()
    ours = AccumOptimizer(ours_m.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-2, accumulation_steps=K)
    ref = torch.optim.SGD(ref_m.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-2)
    for _ in range(K):
        _fill_grads(ours_m)
        ours.zero_grad()
        _fill_grads(ours_m)
        ours.step()
    _fill_grads(ref_m)
    ref.step()
    assert ours._micro_step == K
    for p in ours_m.parameters():
        assert p.is_meta and p.grad.is_meta
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd["state"].keys() == ref_sd["state"].keys()
    for i, s in ref_sd["state"].items():
        assert ours_sd["state"][i].keys() == s.keys()
        if momentum:
            buf = ours_sd["state"][i]["momentum_buffer"]
            assert buf.is_meta and buf.shape == s["momentum_buffer"].shape


def test_meta_optimizer_state_loads_after_materialisation():
    """The usual recipe: build on meta, materialise, then make the optimizer;
    a state dict of the meta optimizer has the real one's structure."""
    meta_m = _meta_model()
    meta_opt = AccumOptimizer(meta_m.parameters(), lr=0.1, momentum=0.9)
    _fill_grads(meta_m)
    meta_opt.step()
    real = _meta_model().to_empty(device="cpu")
    for p in real.parameters():
        nn.init.normal_(p)
        p.grad = torch.randn_like(p)
    opt = AccumOptimizer(real.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    a, b = meta_opt.state_dict(), opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in a["state"].items()} == {
        i: {k: v.shape for k, v in s.items()} for i, s in b["state"].items()
    }


def test_meta_with_disabled_scaler():
    m = _meta_model()
    opt = AccumOptimizer(m.parameters(), lr=0.1, momentum=0.9, accumulation_steps=2)
    scaler = GradScaler("cpu", enabled=False)
    for _ in range(2):
        opt.zero_grad()
        _fill_grads(m)
        scaler.step(opt)
        scaler.update()
    assert opt._micro_step == 2

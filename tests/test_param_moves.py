"""Params cast or moved in place after the optimizer was built (module.double(),
module.half(), module.to(...)) keep training: the cached (device, dtype) split
and the momentum state follow them."""

import copy

import torch

from torch_fastaccum import AccumOptimizer


def _run(cls, cast, **kw):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = cls(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        if i == 3:
            cast(m)
        dtype = m[0].weight.dtype
        x = torch.randn(4, 6, generator=g).to(dtype)
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    return m, opt


def test_double_after_construction_matches_sgd_closely():
    ours, opt = _run(AccumOptimizer, lambda m: m.double())
    ref, _ = _run(torch.optim.SGD, lambda m: m.double())
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert a.dtype == torch.float64
        # SGD keeps its float32 buffer after the cast; ours follows the param
        # (as load_state_dict would cast it), so they differ by fp32 rounding.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p in ours.parameters():
        assert opt.state[p]["momentum_buffer"].dtype == torch.float64


def _run_mixed(cast):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = AccumOptimizer(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        if i == 3:
            cast(m)
        opt.zero_grad()
        x = torch.randn(4, 6, generator=g).to(m[0].weight.dtype)
        m[2](m[1](m[0](x)).float()).pow(2).mean().backward()
        opt.step()
    return m, opt


def test_partial_cast_splits_into_two_dtype_groups():
    def half_first(m):
        m[0].double()

    ours, opt = _run_mixed(half_first)
    assert ours[0].weight.dtype == torch.float64 and ours[2].weight.dtype == torch.float32
    for p in ours.parameters():
        assert opt.state[p]["momentum_buffer"].dtype == p.dtype
        assert torch.isfinite(p).all()

"""Checkpoints move between torch.optim.SGD and AccumOptimizer (README,
Usage), for every SGD option set torch tests SGD with: training continued
after the switch, either way round, is the uninterrupted SGD run bit for bit;
and a checkpoint loaded into parameters of another dtype has its momentum
buffers cast exactly as SGD casts them.

(With accumulation windows, K > 1, and on CUDA: tests/test_state_dict.py and
tests/test_dropin_cuda.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from _dropin import (
    MATRIX_MODULE,
    MATRIX_REASON,
    assert_same,
    half_tolerance,
    net_batch,
    sgd,
    small_net_pair,
    through_bytes,
    train,
)
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import has_momentum, option_names, options  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

MAKERS = {"sgd": sgd, "ours": AccumOptimizer}



@pytest.mark.parametrize("route", ["sgd>ours", "ours>sgd"])
@pytest.mark.parametrize("option", option_names())
def test_switching_optimizers_mid_run_changes_nothing(option, route):
    """Train with one, checkpoint (through bytes, weights_only=True), resume
    with the other, built with another lr so that every setting must come from
    the checkpoint: the parameters are those of SGD trained throughout."""
    before, after = (MAKERS[side] for side in route.split(">"))
    batches = [net_batch(seed=60 + i) for i in range(6)]
    net, ref_net = small_net_pair(seed=11)
    start = [p.detach().clone() for p in ref_net.parameters()]
    reference = sgd(ref_net.parameters(), **options(option))
    train(reference, ref_net, batches)

    first = before(net.parameters(), **options(option))
    train(first, net, batches[:3])
    ckpt = through_bytes({"model": net.state_dict(), "opt": first.state_dict()})

    resumed_net, _ = small_net_pair(seed=12)  # another init: the checkpoint must overwrite it
    resumed_net.load_state_dict(ckpt["model"])
    second = after(resumed_net.parameters(), **{**options(option), "lr": 0.5})
    second.load_state_dict(ckpt["opt"])
    assert second.param_groups[0]["lr"] == options(option).get("lr", 1e-3)
    train(second, resumed_net, batches[3:])
    assert_same(list(resumed_net.parameters()), list(ref_net.parameters()), "params")
    assert any(not torch.equal(p, q) for p, q in zip(ref_net.parameters(), start)), "premise: training moved them"


CASTS = [
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("cast", CASTS, ids=lambda c: f"{str(c[0])[6:]}-into-{str(c[1])[6:]}")
@pytest.mark.parametrize("option", option_names(has_momentum))
def test_buffers_are_cast_like_sgd(option, cast):
    """Momentum buffers saved from params of one dtype, loaded over params of
    another: ours are SGD's (dtype and values), and so are the next steps."""
    saved_dtype, live_dtype = cast
    net, _ = small_net_pair(dtype=saved_dtype, seed=21)
    src = sgd(net.parameters(), **options(option))
    train(src, net, [net_batch(dtype=saved_dtype, seed=70 + i) for i in range(2)])
    ckpt = copy.deepcopy(src.state_dict())

    live, live_ref = small_net_pair(dtype=live_dtype, seed=22)
    ours = AccumOptimizer(live.parameters(), **options(option))
    ref = sgd(live_ref.parameters(), **options(option))
    ours.load_state_dict(copy.deepcopy(ckpt))
    ref.load_state_dict(copy.deepcopy(ckpt))
    assert_same(ours.state_dict()["state"], ref.state_dict()["state"], "loaded buffers", rtol=0, atol=0)
    assert all(
        ours.state[p]["momentum_buffer"].dtype == live_dtype for p in live.parameters()
    ), "buffers take the param dtype"

    tol = half_tolerance(live_dtype, factor=5) if live_dtype == torch.bfloat16 else {}
    more = [net_batch(dtype=live_dtype, seed=80 + i) for i in range(2)]
    train(ours, live, more)
    train(ref, live_ref, more)
    assert_same(list(live.parameters()), list(live_ref.parameters()), "params after the load", **tol)

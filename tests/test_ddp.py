"""DistributedDataParallel (gloo, 2 processes) + AccumOptimizer + GradScaler.

Two ranks are started as separate processes (tests/_ddp_worker.py) on
127.0.0.1 and a free port; the whole launch is bounded by a timeout, so a hang
fails the test instead of hanging CI. Each rank trains on its half of every
global micro-batch; the results are compared with a single-process reference
(torch.optim.SGD default path + torch.amp.GradScaler, ``loss / K``,
step/update/zero_grad every K) on the full micro-batches:

* parameters (and momentum buffers) after N windows: equal on both ranks
  (bitwise) and equal to the reference to rtol 1e-5 / atol 1e-6;
* a DDP comm hook (count, then the default all-reduce) sees exactly one
  bucket round per window under ``opt.accumulate(model)`` -- every bucket once,
  at the boundary micro-batch, none on the others -- and K rounds per window
  without it (proof that the counter can tell);
* an inf injected on one rank, and a NaN loss on the other rank, skip the same
  windows on both ranks with the scale history of torch's GradScaler;
* fused clipping (scaler.clip_grad_norm_ / opt.clip_grad_norm_) at the
  boundary sees the all-reduced grads: the norm each rank returns is the
  global one, the same on both ranks and equal to the reference's
  (unscale_ + torch.nn.utils.clip_grad_norm_) to 1e-6 relative.
"""

from __future__ import annotations

import os

import pytest
import torch

import _ddp_worker as W
from _helpers import assert_params_close, run_ref
from _spawn import launch

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

LAUNCH_TIMEOUT_S = 120  # the whole 2-process run (normally ~5-10 s)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ddp_worker.py")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: DDP on CUDA tensors not tested")),
]


def _launch(device, out_dir):
    """Start both ranks; return their results or fail with their output."""
    return launch(WORKER, W.WORLD, out_dir, ["--device", device, "--timeout", "60"], LAUNCH_TIMEOUT_S, "DDP")


@pytest.fixture(scope="module", params=DEVICES)
def ddp_results(request, tmp_path_factory):
    device = request.param
    out = tmp_path_factory.mktemp(f"ddp_{device}")
    return device, _launch(device, out)


def _reference(name, device):
    cfg = W.SCENARIOS[name]
    K = cfg["K"]
    n = K * cfg["windows"]
    inject = {}
    for i, (kind, _rank) in cfg["faults"].items():
        inject[i] = {"grad_inf": "inf", "loss_nan": "loss_nan"}[kind]
    model = W.make_model(device)
    scaler = torch.amp.GradScaler(device, **W.SCALER_KW) if cfg["scaler"] else None
    opt, trace = run_ref(model, W.make_data(n, device), K, opt_kwargs=cfg["opt"], scaler=scaler, inject=inject,
                         clip=cfg.get("clip"), clip_norm_type=cfg.get("clip_norm_type", 2.0))
    momentum = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
    return model, momentum, trace


def _expected_skips(name):
    cfg = W.SCENARIOS[name]
    K = cfg["K"]
    bad = {i // K for i in cfg["faults"]}
    return [w in bad for w in range(cfg["windows"])]


def _rounds(calls, micro, total_numel):
    """The comm-hook calls of one micro-batch, checked to be whole rounds; returns the count."""
    mine = [c for c in calls if c[0] == micro]
    if not mine:
        return 0
    n_last = sum(1 for c in mine if c[2])
    idx = [c[1] for c in mine]
    n_buckets = len(set(idx))
    # every round covers each bucket exactly once and all parameters
    assert sorted(idx) == sorted(list(range(n_buckets)) * n_last), f"micro-batch {micro}: bucket indices {idx}"
    assert sum(c[3] for c in mine) == n_last * total_numel, f"micro-batch {micro}: not whole rounds"
    return n_last


SCENARIO_NAMES = list(W.SCENARIOS)


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_ddp_params_match_single_process_reference(ddp_results, name):
    device, ranks = ddp_results
    r0, r1 = ranks[0][name], ranks[1][name]
    # both ranks hold the same parameters and momentum, bit for bit
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b), "ranks diverged"
    for a, b in zip(r0["momentum"], r1["momentum"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), "momentum differs between ranks"

    ref_model, ref_mom, ref_trace = _reference(name, device)
    init = [p.detach().cpu() for p in W.make_model("cpu").parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(r0["params"], init))
    assert moved > 1e-3, f"parameters barely moved ({moved}): the comparison would be vacuous"
    assert_params_close(r0["params"], [p.detach().cpu() for p in ref_model.parameters()], msg=f"{name}:")
    for i, (a, b) in enumerate(zip(r0["momentum"], ref_mom)):
        assert (a is None) == (b is None), f"momentum presence differs for param {i}"
        if a is not None:
            torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)

    if W.SCENARIOS[name]["scaler"]:
        expected = _expected_skips(name)
        assert any(expected)
        assert r0["skipped"] == r1["skipped"] == ref_trace.skipped == expected, "skip decisions differ"
        assert r0["scales"] == r1["scales"] == ref_trace.scales, "scale history differs"


@pytest.mark.parametrize("name", [n for n in SCENARIO_NAMES if W.SCENARIOS[n].get("clip") is not None])
def test_ddp_fused_clip_norm_is_global(ddp_results, name):
    """At the boundary DDP has all-reduced the grads already, so the norm
    computed locally on each rank is the norm of the global mean gradient:
    the same bits on both ranks, and the single-process reference's norm."""
    device, ranks = ddp_results
    cfg = W.SCENARIOS[name]
    clip = cfg["clip"]
    n0, n1 = ranks[0][name]["norms"], ranks[1][name]["norms"]
    assert len(n0) == len(n1) == cfg["windows"]
    for w, (a, b) in enumerate(zip(n0, n1)):
        assert _same_value(a, b), f"window {w}: rank 0 norm {a}, rank 1 norm {b}"
    _, _, ref_trace = _reference(name, device)
    ref = [n.detach().cpu() for n in ref_trace.norms]
    assert len(ref) == cfg["windows"]
    for w, (a, b) in enumerate(zip(n0, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape == ()
        if torch.isfinite(b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m: f"window {w} norm: {m}")
        else:
            assert not torch.isfinite(a), f"window {w}: the reference's norm is {b}, ours {a}"
    finite = [n.item() for n in ref if torch.isfinite(n)]
    assert any(n > clip for n in finite) and any(n < clip for n in finite), \
        f"clipping must be active on some windows only: {finite} vs {clip}"
    if cfg["scaler"]:
        expected = _expected_skips(name)
        assert any(expected)
        assert [not torch.isfinite(n) for n in n0] == expected, "the skipped windows must have a non-finite norm"


def _same_value(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("name", [n for n in SCENARIO_NAMES if W.SCENARIOS[n]["accumulate"]])
def test_ddp_one_allreduce_round_per_window(ddp_results, name):
    device, ranks = ddp_results
    cfg = W.SCENARIOS[name]
    K = cfg["K"]
    for rank, res in enumerate(ranks):
        r = res[name]
        calls = r["calls"]
        assert calls, "the comm hook never ran"
        for w in range(cfg["windows"]):
            for j in range(K):
                i = w * K + j
                rounds = _rounds(calls, i, r["numel"])
                if j == K - 1:
                    assert rounds == 1, f"rank {rank} window {w}: {rounds} all-reduce rounds at the boundary"
                else:
                    assert rounds == 0, f"rank {rank} window {w} micro-batch {j}: all-reduce inside the window"
        # per window: hook calls == number of DDP buckets (from DDP's own logging data)
        per_window = [sum(1 for c in calls if c[0] // K == w) for w in range(cfg["windows"])]
        assert r["n_buckets"] >= 1
        assert per_window == [r["n_buckets"]] * cfg["windows"], (per_window, r["n_buckets"])
        if cfg["ddp"].get("find_unused_parameters"):
            assert r["n_buckets"] >= 2, "expected several DDP buckets: a round would be one call"
        # no_sync exactly on the non-boundary micro-batches
        assert r["sync_flags"] == [(i + 1) % K == 0 for i in range(K * cfg["windows"])]
        assert r["sync_restored_after_exception"] is True


def test_ddp_without_accumulate_reduces_every_micro_batch(ddp_results):
    """Without opt.accumulate(model) the same counter sees K rounds per window."""
    device, ranks = ddp_results
    name = "no_accum_scaler"
    cfg = W.SCENARIOS[name]
    K = cfg["K"]
    for res in ranks:
        r = res[name]
        for w in range(cfg["windows"]):
            per_micro = [_rounds(r["calls"], w * K + j, r["numel"]) for j in range(K)]
            assert per_micro == [1] * K, f"window {w}: rounds per micro-batch {per_micro}"
            assert sum(1 for c in r["calls"] if c[0] // K == w) == K * r["n_buckets"]
        assert r["n_buckets"] >= 2
        assert all(r["sync_flags"])

"""FSDP2 (fully_shard, DTensor params) + AccumOptimizer + GradScaler.

The ranks run as separate processes (tests/_fsdp_worker.py, gloo on
127.0.0.1, two of them unless said), bounded in time. Each rank trains every
scenario twice on the same FSDP2 model: with AccumOptimizer (+ our
GradScaler), and with torch.optim.SGD's default path + torch.amp.GradScaler
in the reference loop (``loss / K``, step every K). Checked:

* ours against torch on the same FSDP2 model: parameters and momentum
  buffers to rtol 1e-5 / atol 1e-6 (bf16 compute included), the same skip
  decisions and scale history; the momentum buffers are DTensors, as torch's;
  both ranks hold the same full parameters, bit for bit;
* ours against a single-process run of the reference (fp32 scenarios);
* an inf written into ONE rank's local grad shard at a boundary skips that
  step on every rank (the inf/NaN flag is reduced across the shards);
* ``opt.accumulate(model)`` switches FSDP2's gradient sync: reduce-scatters
  (counted by wrapping the collective) only on boundary micro-batches, and
  syncing again after an exception inside the block;
* fused clipping reduces the norm across shards: the same norm on both ranks,
  torch's (unscale_ + clip_grad_norm_) to 1e-6, a DTensor as torch's
  (Replicate: already reduced);
* grads placed unlike their params (a Replicate grad of a sharded param, a
  plain tensor) raise a clear error and change nothing, on 1 and 2 ranks;
* torch.distributed.checkpoint: get_state_dict/dcp.save inside a window (with
  the accumulated grads), fresh processes load it (get_state_dict templates,
  dcp.load, set_state_dict) and continue: bit for bit the uninterrupted run
  on 2 ranks, and to rtol 1e-5 on 1 rank (DCP reshards the DTensors).

* HSDP on 4 ranks (a (replicate, shard) mesh): ours against torch, with a
  NaN loss on one rank and clipping.

The CUDA variant (NCCL, one GPU per rank) skips visibly without 2 GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch

import _fsdp_worker as W
from _helpers import assert_params_close, run_ref
from _spawn import launch


def _fsdp2_available() -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _fsdp2_available(), reason="torch.distributed with gloo and FSDP2 is not available")

LAUNCH_TIMEOUT_S = 150  # one launch (normally ~5 s)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fsdp_worker.py")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs 2 CUDA devices: not tested")),
]
SCENARIO_NAMES = list(W.SCENARIOS)


def _launch(out_dir, device, phase, world=2, ckpt=None):
    args = ["--device", device, "--phase", phase, "--world", str(world), "--timeout", "90"]
    if ckpt is not None:
        args += ["--ckpt", str(ckpt)]
    return launch(WORKER, world, out_dir, args, LAUNCH_TIMEOUT_S, f"FSDP2 {phase}")


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, tmp_path_factory):
    device = request.param
    return device, _launch(tmp_path_factory.mktemp(f"fsdp2_{device}"), device, "train")


def _expected_skips(cfg):
    bad = {i // cfg["K"] for i in cfg["faults"]}
    return [w in bad for w in range(cfg["windows"])]


def _assert_ranks_agree(ranks, key):
    a, b = ranks[0], ranks[1]
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y), f"{key}: the ranks' full parameters differ"
    assert a["skipped"] == b["skipped"] and a["scales"] == b["scales"], f"{key}: the ranks' skips differ"


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_fsdp2_matches_torch_sgd_and_scaler(trained, name):
    device, ranks = trained
    cfg = W.SCENARIOS[name]
    for which in ("ours", "torch"):
        _assert_ranks_agree([r[name][which] for r in ranks], which)
    ours, ref = ranks[0][name]["ours"], ranks[0][name]["torch"]
    init = [p.detach() for p in W.make_model("cpu").parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(ours["params"], init))
    assert moved > 1e-3, f"parameters barely moved ({moved}): the comparison would be vacuous"
    assert_params_close(ours["params"], ref["params"], msg=f"{name}:")
    for i, (a, b) in enumerate(zip(ours["momentum"], ref["momentum"])):
        assert (a is None) == (b is None), f"momentum presence differs for param {i}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours["buffer_types"] == ref["buffer_types"] == ["DTensor"]
    if cfg["scaler"]:
        expected = _expected_skips(cfg)
        assert any(expected)
        assert ours["skipped"] == ref["skipped"] == expected, "skip decisions differ"
        assert ours["scales"] == ref["scales"], "scale history differs"


@pytest.mark.parametrize("name", [n for n in SCENARIO_NAMES if not W.SCENARIOS[n].get("bf16")])
def test_fsdp2_matches_single_process_reference(trained, name):
    device, ranks = trained
    cfg = W.SCENARIOS[name]
    K = cfg["K"]
    n = K * cfg["windows"]
    model = W.make_model(device)
    scaler = torch.amp.GradScaler(device, **W.SCALER_KW) if cfg["scaler"] else None
    # Any inf skips the window: the single process puts it into its one grad.
    inject = {i: "inf" for i in cfg["faults"]}
    _, trace = run_ref(model, W.make_data(n, device), K, opt_kwargs=cfg["opt"], scaler=scaler, inject=inject,
                       clip=cfg.get("clip"), clip_norm_type=cfg.get("clip_norm_type", 2.0))
    ours = ranks[0][name]["ours"]
    assert_params_close(ours["params"], [p.detach().cpu() for p in model.parameters()], msg=f"{name}:")
    if cfg["scaler"]:
        assert ours["skipped"] == trace.skipped and ours["scales"] == trace.scales


@pytest.mark.parametrize("name", [n for n in SCENARIO_NAMES if W.SCENARIOS[n]["faults"]])
def test_fsdp2_inf_in_one_rank_shard_skips_on_every_rank(trained, name):
    device, ranks = trained
    cfg = W.SCENARIOS[name]
    assert {rank for _, rank in cfg["faults"].values()} != {0, 1}, "the fault must be on one rank only"
    expected = _expected_skips(cfg)
    for r in ranks:
        assert r[name]["ours"]["skipped"] == expected


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_fsdp2_accumulate_switches_gradient_sync(trained, name):
    device, ranks = trained
    cfg = W.SCENARIOS[name]
    K = cfg["K"]
    for r in ranks:
        counts = r[name]["ours"]["reduce_scatters"]
        assert len(counts) == K * cfg["windows"]
        per_backward = max(counts)
        assert per_backward >= 1, "the counter never saw a reduce-scatter"
        if cfg["accumulate"]:
            expected = [per_backward if (i + 1) % K == 0 else 0 for i in range(len(counts))]
        else:
            expected = [per_backward] * len(counts)
        assert counts == expected, f"reduce-scatters per micro-batch: {counts}"
        assert r[name]["sync_after_exception"] == per_backward, "accumulate() left the sync off after an exception"


@pytest.mark.parametrize("name", [n for n in SCENARIO_NAMES if W.SCENARIOS[n].get("clip") is not None])
def test_fsdp2_fused_clip_norm_is_reduced_across_shards(trained, name):
    device, ranks = trained
    cfg = W.SCENARIOS[name]
    ours = [r[name]["ours"] for r in ranks]
    ref = ranks[0][name]["torch"]
    assert len(ours[0]["norms"]) == len(ref["norms"]) == cfg["windows"]
    for w, (a, b, t) in enumerate(zip(ours[0]["norms"], ours[1]["norms"], ref["norms"])):
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"window {w}: ranks' norms {a} vs {b}"
        if torch.isfinite(t):
            torch.testing.assert_close(a, t, rtol=1e-6, atol=0, msg=lambda m: f"window {w} norm: {m}")
        else:
            assert not torch.isfinite(a), f"window {w}: torch's norm is {t}, ours {a}"
    assert ours[0]["norm_types"] == ref["norm_types"] == ["DTensor"] * cfg["windows"]
    # Reduced already: torch's inf norm is Partial(max) (reduced when read),
    # its 2-norm Replicate; full_tensor() is the same value either way.
    assert ours[0]["norm_placements"] == ["(Replicate(),)"] * cfg["windows"]
    finite = [n.item() for n in ref["norms"] if torch.isfinite(n)]
    assert any(n > cfg["clip"] for n in finite) and any(n < cfg["clip"] for n in finite), \
        f"clipping must be active on some windows only: {finite} vs {cfg['clip']}"


@pytest.fixture(scope="module", params=DEVICES)
def checkpointed(request, tmp_path_factory):
    device = request.param
    root = tmp_path_factory.mktemp(f"fsdp2_dcp_{device}")
    ckpt = root / "ckpt"
    (root / "save").mkdir()
    return device, root, ckpt, _launch(root / "save", device, "save", ckpt=ckpt)


@pytest.mark.parametrize("world", [2, 1])
def test_fsdp2_dcp_resume_inside_a_window(checkpointed, world):
    device, root, ckpt, saved = checkpointed
    if device == "cuda" and world == 1:
        pytest.skip("the world-size change is tested on the CPU")
    out = root / f"resume{world}"
    out.mkdir()
    resumed = _launch(out, device, "resume", world=world, ckpt=ckpt)
    whole, again = saved[0], resumed[0]
    # the checkpoint: inside a window, with the counter where DCP keeps it
    assert whole["saved_micro"] == W.SAVE_AT + 1 and (W.SAVE_AT + 1) % W.RESUME["K"] != 0
    assert all(g["accumulation_micro_step"] == W.SAVE_AT + 1 for g in whole["saved_groups"])
    # the templates of the fresh processes: every momentum buffer, the window
    # untouched, no grads left behind by DCP's state-making step
    tpl = again["template"]
    assert tpl["buffers"] == tpl["state_keys"] and len(tpl["buffers"]) == len(whole["params"])
    assert tpl["micro"] == 0 and tpl["grads"] == [None] * len(whole["params"])
    assert again["loaded_micro"] == W.SAVE_AT + 1
    later_windows = len(again["skipped"])
    assert any(again["skipped"]), "a skipped window after the resume must be covered"
    assert again["skipped"] == whole["skipped"][-later_windows:]
    assert again["scales"] == whole["scales"][-later_windows:]
    if world == 2:
        for a, b in zip(again["params"], whole["params"]):
            assert torch.equal(a, b), "resumed run differs from the uninterrupted one"
        for a, b in zip(again["momentum"], whole["momentum"]):
            assert torch.equal(a, b)
    else:  # one rank sums the batch in another order
        assert_params_close(again["params"], whole["params"], msg="resumed on 1 rank:")


@pytest.mark.parametrize("world", [1, 2])
def test_fsdp2_grads_placed_unlike_their_params_are_refused(tmp_path, world):
    """On one rank a Replicate grad of a Shard(0) param has the local shape of
    the shard: only the placement tells it is wrong."""
    ranks = _launch(tmp_path, "cpu", "errors", world=world)
    for r in ranks:
        message, unchanged, no_state = r["replicate_grad"]
        assert message is not None and "placed" in message and "['params'][0]" in message, message
        assert unchanged and no_state
        message, unchanged, no_state = r["plain_grad"]
        assert message is not None and "needs a DTensor grad" in message, message
        assert unchanged and no_state


def test_hsdp_matches_torch_on_four_ranks(tmp_path):
    """HSDP, a (replicate, shard) mesh on 4 ranks: the flag and the norm reduce
    over the shard dim only (the replicas hold the same reduced grads; a
    reduction over them too would count each shard twice), as torch's do."""
    ranks = _launch(tmp_path, "cpu", "hsdp", world=4)
    for name, cfg in W.HSDP.items():
        ours = [r[name]["ours"] for r in ranks]
        ref = ranks[0][name]["torch"]
        for r in ours[1:]:
            for a, b in zip(ours[0]["params"], r["params"]):
                assert torch.equal(a, b), "the ranks' full parameters differ"
            assert r["skipped"] == ours[0]["skipped"]
        assert_params_close(ours[0]["params"], ref["params"], msg=f"{name}:")
        assert ours[0]["skipped"] == ref["skipped"] == _expected_skips(cfg) and any(ref["skipped"])
        assert ours[0]["scales"] == ref["scales"]
        for w, (a, t) in enumerate(zip(ours[0]["norms"], ref["norms"])):
            if torch.isfinite(t):
                torch.testing.assert_close(a, t, rtol=1e-6, atol=0, msg=lambda m: f"window {w} norm: {m}")
            else:
                assert not torch.isfinite(a)

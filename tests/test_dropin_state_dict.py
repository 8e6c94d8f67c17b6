"""state_dict / load_state_dict of AccumOptimizer, for every SGD option set
torch tests SGD with: a loaded copy continues in lockstep with the original,
names from ``named_parameters()`` travel as SGD's do, checkpoints survive
torch.save / torch.load(weights_only=True), old checkpoints load as SGD
loads them, and loading treats the given dict as SGD does.

(Interchange with torch.optim.SGD checkpoints and casting on load:
tests/test_dropin_sgd_interchange.py. Resuming mid-window and the format's
micro-batch counter: tests/test_state_dict.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from _dropin import (
    MATRIX_MODULE,
    MATRIX_REASON,
    assert_same,
    assert_same_settings,
    net_batch,
    sgd,
    small_net_pair,
    through_bytes,
    train,
    without_keys,
)
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import LATE_FLAGS, has_momentum, option_names, options  # noqa: E402

BATCHES = [net_batch(seed=40 + i) for i in range(8)]


def _params(net, named: bool):
    return list(net.named_parameters()) if named else list(net.parameters())



def _drop_names(sd: dict) -> dict:
    out = dict(sd)
    out["param_groups"] = [without_keys(g, "param_names") for g in sd["param_groups"]]
    return out


NAMINGS = ["plain>plain", "plain>named", "named>plain", "named>named"]


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("option", option_names())
def test_loaded_copy_continues_in_lockstep(option, naming):
    """Prime an optimizer, load its state into a second one over a copy of
    the model (built from parameters() or named_parameters(), either way
    round): both then take the same steps bit for bit and save the same
    state; param_names end up where SGD puts them."""
    src_named, dst_named = (side == "named" for side in naming.split(">"))
    net, twin_seed = small_net_pair()
    opt = AccumOptimizer(_params(net, src_named), **options(option))
    train(opt, net, BATCHES[:4])

    twin = copy.deepcopy(net)
    opt2 = AccumOptimizer(_params(twin, dst_named), **options(option))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert type(opt2.param_groups[0]["lr"]) is type(options(option).get("lr", 0.0))
    for i, batch in enumerate(BATCHES[4:]):
        train(opt, net, [batch])
        train(opt2, twin, [batch])
        assert_same(list(twin.parameters()), list(net.parameters()), f"step {i} params")
    assert_same(_drop_names(opt2.state_dict()), _drop_names(opt.state_dict()), "state dicts")

    # param_names: kept when either side had names, exactly as SGD does it
    ref_src = sgd(_params(twin_seed, src_named), **options(option))
    ref_dst = sgd(_params(copy.deepcopy(twin_seed), dst_named), **options(option))
    ref_dst.load_state_dict(ref_src.state_dict())
    expected = [g.get("param_names") for g in ref_dst.state_dict()["param_groups"]]
    assert [g.get("param_names") for g in opt2.state_dict()["param_groups"]] == expected
    assert (expected[0] is not None) == (src_named or dst_named)


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize("option", option_names())
def test_checkpoint_survives_torch_save(option, named):
    """The state dict is plain data: torch.load gives back an equal dict with
    weights_only=True and False (a tensor lr stays a tensor), and it loads."""
    net, _ = small_net_pair()
    opt = AccumOptimizer(_params(net, named), **options(option))
    train(opt, net, BATCHES[:3])
    sd = opt.state_dict()
    for weights_only in (True, False):
        back = through_bytes(sd, weights_only=weights_only)
        assert_same(back, sd, f"weights_only={weights_only}")
    opt.load_state_dict(through_bytes(sd))
    train(opt, net, BATCHES[3:4])


@pytest.mark.parametrize("option", option_names())
def test_checkpoint_without_late_flags_loads_like_sgd(option):
    """An SGD checkpoint from before SGD had foreach/fused/differentiable/
    maximize/nesterov loads as SGD loads it: the missing flags take their old
    defaults, and the next steps are SGD's."""
    net, ref_net = small_net_pair()
    src = sgd(net.parameters(), **options(option))
    train(src, net, BATCHES[:3])
    old = copy.deepcopy(src.state_dict())
    for g in old["param_groups"]:
        for flag in (*LATE_FLAGS, "nesterov"):
            g.pop(flag, None)
    ref_net.load_state_dict(net.state_dict())

    ref = sgd(ref_net.parameters(), **options(option))
    ours = AccumOptimizer(net.parameters(), **options(option))
    ref.load_state_dict(copy.deepcopy(old))
    ours.load_state_dict(copy.deepcopy(old))
    for key in ("nesterov", "maximize", "differentiable", "fused"):
        assert ours.param_groups[0][key] == ref.param_groups[0][key], key
    for batch in BATCHES[3:6]:
        train(ref, ref_net, [batch])
        train(ours, net, [batch])
    assert_same(list(net.parameters()), list(ref_net.parameters()), "params after the load")


@pytest.mark.parametrize("step_kind", ["int", "tensor"])
@pytest.mark.parametrize("option", option_names())
def test_extra_per_param_entries_load_like_sgd(option, step_kind):
    """Per-param entries SGD does not use (a ``step`` count, as other
    optimizers write, as a Python number or a tensor) load, are kept and
    saved again, and do not change the update: as SGD."""
    results = []
    for make in (sgd, AccumOptimizer):
        net, _ = small_net_pair()
        opt = make(net.parameters(), **options(option))
        train(opt, net, BATCHES[:2])
        sd = copy.deepcopy(opt.state_dict())
        for idx in sd["param_groups"][0]["params"]:
            sd["state"].setdefault(idx, {})["step"] = 5 if step_kind == "int" else torch.tensor(5.0)
        opt.load_state_dict(sd)
        train(opt, net, BATCHES[2:4])
        results.append((list(net.parameters()), opt.state_dict()["state"]))
    (ref_params, ref_state), (params, state) = results
    assert_same(params, ref_params, "params")
    assert_same(state, ref_state, "saved state")


@pytest.mark.parametrize("source", ["sgd", "ours"])
@pytest.mark.parametrize("option", option_names(has_momentum))
def test_load_treats_the_given_dict_as_sgd_does(option, source):
    """Loading leaves the dict it was given as it was (no key added, removed
    or cast), and the loaded momentum buffers share memory with that dict
    exactly where SGD's would."""
    net, _ = small_net_pair()
    make_src = sgd if source == "sgd" else AccumOptimizer
    src = make_src(net.parameters(), **options(option))
    train(src, net, BATCHES[:2])
    outcome = {}
    for name, make in (("SGD", sgd), ("ours", AccumOptimizer)):
        given = copy.deepcopy(src.state_dict())
        snapshot = copy.deepcopy(given)
        twin = copy.deepcopy(net)
        dst = make(twin.parameters(), **options(option))
        dst.load_state_dict(given)
        assert_same(given, snapshot, f"{name}: the dict after loading it")
        ids = given["param_groups"][0]["params"]
        outcome[name] = [
            dst.state[p]["momentum_buffer"] is given["state"][i]["momentum_buffer"]
            for p, i in zip(twin.parameters(), ids)
        ]
    assert outcome["ours"] == outcome["SGD"]


def test_repeated_group_is_saved_like_sgd():
    """A param_groups list that holds one group twice (a user appending the
    same dict again) is saved as SGD saves it."""
    saved = []
    for make in (sgd, AccumOptimizer):
        net, _ = small_net_pair()
        opt = make(net.parameters(), lr=0.1, momentum=0.9)
        train(opt, net, BATCHES[:2])
        opt.param_groups.append(opt.param_groups[0])
        saved.append(opt.state_dict())
    ref, ours = saved
    assert len(ours["param_groups"]) == len(ref["param_groups"]) == 2
    for g, rg in zip(ours["param_groups"], ref["param_groups"]):
        assert_same_settings(g, rg)
        assert g["params"] == rg["params"]
    assert_same(ours["state"], ref["state"], "state")

"""AccumOptimizer's checkpoint format: torch.optim.SGD's state dict (so
either loads the other's), plus ``"accumulation"``: the micro-batch counter
and K. Pack on save; validate, then restore, on load.

The counter is also in every saved param group (GROUP_KEY), because
torch.distributed.checkpoint's get/set_optimizer_state_dict keep only
"state" and "param_groups"; a load reads the top-level entry first. K is a
group key already (accumulation_steps). The live groups hold GROUP_KEY too,
as None (the window holds the counter): DCP's flattened format
(flatten_optimizer_state_dict=True, as torchtitan saves) loads only the
group keys the live groups have.

A torch.optim.SGD checkpoint saved with DCP lacks our three group keys
(accumulation_steps, grad_writeback, GROUP_KEY); DCP reads every key of the
target's template (dcp.load's planner) and of its live groups
(_unflatten_optim_state_dict, flattened format), before load_state_dict
runs. dcp.load(..., planner=DefaultLoadPlanner(allow_partial_load=True))
keeps the template's values for them, which are the constructor's for a
fresh optimizer (tests/test_dcp_state.py), as for torch's own optimizers
when torch adds a group key.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

from . import _momentum
from ._hyper import SGD_GROUP_DEFAULTS, validate_accumulation_steps

GROUP_KEY = "accumulation_micro_step"


def save(opt, window, base_state_dict) -> dict[str, Any]:
    """torch's Optimizer.state_dict (`base_state_dict`) with pack() as the
    first post-hook, so user post-hooks see the finished dict."""
    handle = opt.register_state_dict_post_hook(lambda _, sd: pack(sd, window.micro_step, window.k), prepend=True)
    try:
        return base_state_dict()
    finally:
        handle.remove()


def load(opt, window, base_load_state_dict, state_dict: dict[str, Any]) -> None:
    """torch's Optimizer.load_state_dict (`base_load_state_dict`) with
    validate() as the last pre-hook (after the user's, which may rewrite the
    dict) and restore() as the first post-hook."""
    loaded = []
    handles = (
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: loaded.append(validate(sd, o.param_groups, window.k))
        ),
        opt.register_load_state_dict_post_hook(
            lambda o: restore(window, o.defaults, o.param_groups, *loaded[-1]), prepend=True
        ),
    )
    try:
        base_load_state_dict(state_dict)
    finally:
        for h in handles:
            h.remove()


def fill_defaults(defaults: dict, param_groups: list[dict]) -> None:
    """Every key of ours a param group must hold: those older state dicts
    and pickles (or SGD's) lack, and GROUP_KEY, which no default gives (a
    new group gets it here too)."""
    defaults.setdefault("grad_writeback", True)
    for group in param_groups:
        for key, value in SGD_GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        # One micro-batch counter drives every group: K is the optimizer's.
        group.setdefault("accumulation_steps", defaults["accumulation_steps"])
        group.setdefault("grad_writeback", defaults["grad_writeback"])
        group.setdefault(GROUP_KEY, None)


def pack(sd: dict[str, Any], micro_step: int, k: int) -> dict[str, Any]:
    """torch's state dict of an AccumOptimizer, made SGD's (see
    _momentum.exported), with the window position added."""
    packed = {}
    for idx, s in sd["state"].items():
        s = _momentum.exported(s)
        if s is not None:  # as SGD: no entry before the first real update
            packed[idx] = s
    sd["state"] = packed
    sd["accumulation"] = {"micro_step": micro_step, "accumulation_steps": k}
    for group in sd["param_groups"]:
        group[GROUP_KEY] = micro_step
    return sd


def validate(sd: dict[str, Any], param_groups: list[dict], current_k: int) -> tuple[int, int]:
    """(micro_step, K) of a state dict about to be loaded; raises ValueError
    for anything that would fail only after the load changed state. An SGD
    state dict has no "accumulation": it starts a window."""
    acc = sd.get("accumulation")
    if acc is None:  # through DCP, or SGD's (no counter: a window starts)
        counters = {g.get(GROUP_KEY) or 0 for g in sd.get("param_groups", [])}
        if len(counters) > 1:
            raise ValueError(f"loaded state dict has param groups with different {GROUP_KEY}: {sorted(counters)}")
        acc = counters.pop() if counters else 0
    micro = acc.get("micro_step", 0) if isinstance(acc, dict) else acc
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
        raise ValueError(f"state_dict['accumulation']['micro_step'] must be an int >= 0, got {micro!r}")
    _check_buffer_shapes(sd, param_groups)
    # As torch loads every saved hyper-parameter over the constructor's, the
    # saved K wins too; it must be one valid K for all groups.
    ks = {g.get("accumulation_steps", current_k) for g in sd.get("param_groups", [])}
    if len(ks) > 1:
        raise ValueError(f"loaded state dict has param groups with different accumulation_steps: {sorted(ks)}")
    k = ks.pop() if ks else current_k
    try:
        validate_accumulation_steps(k)
    except ValueError as e:
        raise ValueError(f"loaded state dict: {e}") from None
    return micro, k


def restore(window, defaults: dict, param_groups: list[dict], micro_step: int, k: int) -> None:
    """After torch's load_state_dict (whose __setstate__ restored the
    momentum counters): the window position and K."""
    window.restart_at(micro_step, k)
    defaults["accumulation_steps"] = k
    for group in param_groups:
        group["accumulation_steps"] = k
        group[GROUP_KEY] = None  # the window holds the live counter


def is_dcp_state_init() -> bool:
    """Whether the caller's step() comes from torch.distributed.checkpoint's
    _init_optim_state: with the optimizer state empty and no grads, DCP sets
    zero grads and lr 0 and calls step() once, so that a stateful optimizer
    makes the state a checkpoint is loaded into. For AccumOptimizer with K > 1
    that call would only count a micro-batch (shifting the window and making
    no momentum buffers, so a loaded checkpoint's buffers would be dropped):
    step() does SGD's update instead (see AccumOptimizer.step). Recognised by
    the calling function itself, the one exact signal: lr 0 and zero grads
    are also a warmup's first step."""
    dcp = sys.modules.get("torch.distributed.checkpoint.state_dict")
    init = getattr(dcp, "_init_optim_state", None)
    code = getattr(init, "__code__", None)
    if code is None:
        return False
    frame = sys._getframe(1)
    for _ in range(8):  # step() is wrapped by torch's hooks and profiler
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _check_buffer_shapes(sd: dict[str, Any], param_groups: list[dict]) -> None:
    # torch checks the group sizes but not the buffers' shapes; a wrong
    # buffer would only fail at the next step, after the load changed state.
    saved_groups = sd.get("param_groups", [])
    saved_state = sd.get("state", {})
    if len(saved_groups) != len(param_groups):
        return  # torch's own ValueError follows
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            return
        for pi, (idx, p) in enumerate(zip(saved["params"], group["params"])):
            buf = saved_state.get(idx, {}).get(_momentum.MOMENTUM)
            if isinstance(buf, Tensor) and buf.shape != p.shape:
                raise ValueError(
                    f"loaded state dict has a momentum_buffer of shape {tuple(buf.shape)} for "
                    f"param_groups[{gi}]['params'][{pi}], whose shape is {tuple(p.shape)}"
                )

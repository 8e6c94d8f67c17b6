"""Momentum state: SGD's ``momentum_buffer`` plus a real-update counter.

NOTE: [momentum updates]
Each param with momentum has, besides SGD's ``momentum_buffer``, an entry
``momentum_updates``: a float32 0-dim tensor on the param's device counting
the buffer's real updates. 0 means "never written", so the next real update
sets b = g (SGD's first step). It lives on the device so a step skipped on
inf/NaN needs no host read to keep it; the kernels advance it. It is not
"step": that key means an optimizer step count that torch's dtype rules and
tools read. state_dict() never exports it (checkpoint.py); loading restores it
from whether a buffer was saved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dtensor
from ._layout import like

MOMENTUM = "momentum_buffer"
UPDATES = "momentum_updates"


def kernel_state(state, keys: list[Tensor], targets: list[Tensor], verify: bool, sharded: bool = False):
    """The buffers and update counters of params `keys` for the kernels, made
    where missing (zeroed buffer, 0 updates). `targets` are what the kernels
    update (a param, its local shard, or a dense stand-in of either): the
    kernels get buffers laid out like them; the state keeps them placed like
    the param (a DTensor param's buffer is a DTensor). When `verify`, buffers
    follow their targets' dtype, device and layout (params moved or cast
    since), as load_state_dict casts. `sharded`: keys may be DTensors."""
    if not verify:  # the steady state: every entry exists; C-level loops
        entries = list(map(state.__getitem__, keys))
        try:
            bufs = [s[MOMENTUM] for s in entries]
            counts = [s[UPDATES] for s in entries]
        except KeyError:
            pass
        else:
            if not any(b is None for b in bufs):
                return (_dtensor.locals_of(bufs) if sharded else bufs), counts
    bufs, counts = [], []
    for key, target in zip(keys, targets):
        s = state[key]
        buf = s.get(MOMENTUM)
        if buf is None:
            buf = s[MOMENTUM] = _dtensor.wrap_like(key, torch.zeros_like(target))
            s[UPDATES] = torch.zeros((), dtype=torch.float32, device=target.device)
        elif UPDATES not in s:  # a buffer that SGD (or its sparse step) wrote
            s[UPDATES] = torch.ones((), dtype=torch.float32, device=target.device)
        local = _dtensor.local(buf)
        if verify:
            if buf.dtype != target.dtype or buf.device != target.device:
                buf = s[MOMENTUM] = buf.to(device=target.device, dtype=target.dtype)
                local = _dtensor.local(buf)
            if s[UPDATES].device != target.device:
                s[UPDATES] = s[UPDATES].to(target.device)
            laid_out = like(local, target)
            if laid_out is not local:
                s[MOMENTUM], local = _dtensor.wrap_like(key, laid_out), laid_out
        bufs.append(local)
        counts.append(s[UPDATES])
    return bufs, counts


def after_sparse_step(state, params: list[Tensor], bufs: list[Tensor]) -> None:
    """torch's sparse SGD step made or replaced these buffers."""
    for p, b in zip(params, bufs):
        state[p][MOMENTUM] = b
        state[p].pop(UPDATES, None)  # kernel_state counts it as written


def after_load(state) -> None:
    """A loaded buffer has had a real update; an absent (None) one has not."""
    for p, s in state.items():
        if not isinstance(p, Tensor) or not isinstance(s, dict):
            continue
        if not isinstance(s.get(UPDATES), Tensor):  # only ours are: DCP may fill in others
            s.pop(UPDATES, None)
        if s.get(MOMENTUM) is None:
            s.pop(MOMENTUM, None)
            s.pop(UPDATES, None)
        elif UPDATES not in s or s[UPDATES].device != p.device:
            s[UPDATES] = torch.ones((), dtype=torch.float32, device=p.device)


def exported(s):
    """One param's state as SGD saves it: no counter, and no buffer before
    its first real update (SGD has no entry then: None)."""
    if not isinstance(s, dict) or UPDATES not in s:
        return s
    s = dict(s)  # the live state dict is shared: never edit it
    count = s.pop(UPDATES)
    # Meta params take shape-only steps: their buffers exist.
    if not count.is_meta and float(count) == 0:  # may sync: not the hot path
        s.pop(MOMENTUM, None)
    return s or None

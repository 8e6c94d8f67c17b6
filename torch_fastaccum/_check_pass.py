"""The GradScaler's pass over a step plan: one read-only inf/NaN check, or
one in-place unscale with the check, per (device, dtype)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dtensor, _ops
from ._layout import dense_real, real, to_device
from ._plan import StepPlan


CheckLists = dict[torch.device, dict[tuple[torch.dtype, tuple], list[Tensor]]]


def check_lists(plan: StepPlan, writeback: list | None = None) -> CheckLists:
    """Dense tensors to check, by device and (dtype, reduce key): the grads
    (real views of complex ones; local shards of DTensors, whose results
    reduce over the key's process groups, () for none) and the values of
    sparse grads. A grad that is not dense in memory is checked through a
    dense copy; with `writeback`, (grad, copy) pairs are appended there for
    the caller to copy back after writing."""
    out: CheckLists = {}
    for gp in plan.groups:
        for b in gp.buckets:
            if b.plain:
                if b.grads:
                    out.setdefault(b.device, {}).setdefault((b.grads[0].dtype, b.reduce), []).extend(b.grads)
                continue
            for g in b.grads:  # real views may differ in dtype from the param
                v = dense_real(g)
                if writeback is not None and v.data_ptr() != real(g).data_ptr():
                    writeback.append((g, v))
                out.setdefault(b.device, {}).setdefault((v.dtype, b.reduce), []).append(v)
        for i, (p, g) in enumerate(gp.sparse):
            if g.dtype is torch.float16:  # as torch: fp16 duplicates may overflow once summed
                p.grad = g = g.coalesce()
                gp.sparse[i] = (p, g)
            v = dense_real(g._values())
            out.setdefault(v.device, {}).setdefault((v.dtype, ()), []).append(v)
    return out


def reduce_flags(lists: CheckLists, per_device: dict[torch.device, Tensor]) -> None:
    """Every rank skips alike: each device's flag is reduced (MAX) over the
    process groups of its sharded grads (NOTE: [DTensor params])."""
    # In plan order, the same on every rank (a set's order would follow the
    # groups' ids, which differ between processes).
    keys = {device: list(dict.fromkeys(key for _, key in per_key if key)) for device, per_key in lists.items()}
    _dtensor.reduce_flags(per_device, keys)


def device_flag(found_inf: Tensor, device: torch.device) -> Tensor:
    """The inf/NaN flag a pass writes on `device`: found_inf itself on its
    own device, a new zeroed one elsewhere (torch's GradScaler keeps one per
    device)."""
    return found_inf if device == found_inf.device else torch.zeros_like(found_inf, device=device)


def refuse_fp16(lists: CheckLists) -> None:
    """torch's GradScaler.unscale_ refuses fp16 grads, with this wording."""
    if any(dtype is torch.float16 for per_key in lists.values() for dtype, _ in per_key):
        raise ValueError("Attempting to unscale FP16 gradients.")


@torch.no_grad()
def run_check(
    plan: StepPlan,
    found_inf: Tensor,
    grad_scale: Tensor | None = None,
    factor: float = 1.0,
    allow_fp16: bool = True,
) -> dict[torch.device, Tensor]:
    """Sets found_inf (a float32 0-dim tensor the caller zeroed) where a grad
    holds inf/NaN; with `grad_scale`, first multiplies the grads in place by
    inv_scale(scale) * factor (csrc/sgd_math.h). Returns the flag of each
    device: found_inf itself on its device, a new tensor on the others (as
    torch's GradScaler keeps one per device)."""
    writeback: list = []
    lists = check_lists(plan, writeback if grad_scale is not None else None)
    if not allow_fp16:
        refuse_fp16(lists)
    per_device: dict[torch.device, Tensor] = {}
    for device, per_dtype in lists.items():
        flag = per_device[device] = device_flag(found_inf, device)
        scale = None if grad_scale is None else to_device(grad_scale, device)
        for grads in per_dtype.values():
            if scale is None:
                _ops.nonfinite_check_(grads, flag)
            else:
                _ops.unscale_check_(grads, flag, scale, factor=factor)
    for g, dense in writeback:
        real(g).copy_(dense)
    reduce_flags(lists, per_device)
    return per_device

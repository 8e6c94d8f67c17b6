"""The fused clip_grad_norm_: the norm of the unscaled mean gradient in one
read pass (fastaccum::norm_check_, with the inf/NaN check), and the clip
coefficient as torch forms it, on the device. Nothing is written to the
grads here: the boundary update multiplies by the coefficient
(fused_sgd_'s clip_coef), so clipping adds no pass over gradient memory."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _dtensor, _ops
from ._check_pass import check_lists, device_flag, reduce_flags, refuse_fp16
from ._layout import to_device
from ._plan import StepPlan

SUPPORTED = (2.0, math.inf)


def validate(max_norm, norm_type) -> tuple[float, float]:
    """(max_norm, norm_type) as floats; ValueError for what the fused pass cannot do,
    before anything changes (torch accepts max_norm <= 0 and zeroes the
    grads; here that is refused as the mistake it almost always is)."""
    try:
        norm_type = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}") from None
    if norm_type not in SUPPORTED:
        raise ValueError(
            f"the fused clip_grad_norm_ supports norm_type 2.0 and inf, got {norm_type}; for other norms "
            "call scaler.unscale_(opt) (or opt.average_grads_()) and torch.nn.utils.clip_grad_norm_"
        )
    if isinstance(max_norm, Tensor):
        if max_norm.numel() != 1:
            raise ValueError(f"max_norm must be a number, got a tensor of {max_norm.numel()} elements")
        max_norm = max_norm.item()
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool):
        raise ValueError(f"max_norm must be a number, got {type(max_norm).__name__}")
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be positive and finite, got {max_norm}")
    return float(max_norm), norm_type


def _coalesce_sparse(plan: StepPlan) -> None:
    # A sparse grad's norm is that of its coalesced values (duplicates add).
    for gp in plan.groups:
        for i, (p, g) in enumerate(gp.sparse):
            if not g.is_coalesced():
                p.grad = g = g.coalesce()
                gp.sparse[i] = (p, g)


@torch.no_grad()
def total_norm(
    plan: StepPlan, norm_type: float, found_inf: Tensor, grad_scale: Tensor | None, factor: float,
    allow_fp16: bool = True,
) -> tuple[Tensor, dict[torch.device, Tensor]]:
    """The norm over every grad of the plan of x = g * inv_scale(scale) *
    factor, as torch.nn.utils.clip_grad_norm_ returns it for the grads the
    reference loop holds (on the first grad's device, in the grads' promoted
    dtype; a Replicate DTensor for DTensor grads), and the inf/NaN flag of
    each device (found_inf itself on its own). One norm_check_ per (device,
    dtype); the local sums of sharded grads are reduced across their shards
    (NOTE: [DTensor params]); no host sync. Without `allow_fp16`, fp16
    grads raise torch's unscale_ error first."""
    _coalesce_sparse(plan)
    lists = check_lists(plan)
    if not allow_fp16:
        refuse_fp16(lists)
    per_device: dict[torch.device, Tensor] = {}
    parts: list[Tensor] = []
    first = None
    result_dtype = None
    for device, per_key in lists.items():
        flag = per_device[device] = device_flag(found_inf, device)
        scale = None if grad_scale is None else to_device(grad_scale, device)
        for (dtype, reduce), grads in per_key.items():
            out = torch.empty((), dtype=torch.float64 if dtype is torch.float64 else torch.float32, device=device)
            _ops.norm_check_(grads, flag, out, norm_type=norm_type, grad_scale=scale, factor=factor)
            _dtensor.all_reduce(out, reduce, "max" if norm_type == math.inf else "sum")
            first = first or device
            result_dtype = dtype if result_dtype is None else torch.promote_types(result_dtype, dtype)
            parts.append(out)
    reduce_flags(lists, per_device)
    if first is None:  # no grads: torch returns 0.0
        return torch.zeros((), device=found_inf.device), per_device
    # Partials combine in plan order in float64, on the first grad's device.
    stacked = torch.stack([to_device(t, first).double() for t in parts])
    norm = stacked.max() if norm_type == math.inf else stacked.sum().sqrt()
    grads = (g for gp in plan.groups for g in gp.grads)
    return _dtensor.replicated_like(norm.to(result_dtype), grads), per_device


def coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)) in the norm's dtype, as torch forms
    it, as float32 for the kernels: exactly 1 when the norm is under
    max_norm, NaN for a NaN norm, 0 for an infinite one. (A DTensor norm is
    replicated: its local value is the norm.)"""
    norm = _dtensor.local(norm)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0).float()


def check_finite(norm: Tensor, norm_type: float) -> None:
    """torch's error_if_nonfinite, with its wording (a host sync)."""
    norm = _dtensor.local(norm)
    if torch.logical_or(norm.isnan(), norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )

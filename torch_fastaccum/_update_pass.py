"""The boundary update over a step plan: one fastaccum::fused_sgd_ call per
bucket, then the sparse pairs (torch's math)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _momentum, _ops
from ._hyper import as_float
from ._layout import is_dense, like, real, to_device
from ._plan import Bucket, StepPlan
from ._repeats import first_counts
from ._sparse_step import sparse_step


def run_update(plan: StepPlan, state, grad_factor: float, grad_scale: Tensor | None, found_inf: Tensor | None,
               clip_coef: Tensor | None = None) -> None:
    """The update of every bucket; `clip_coef` (a fused clip_grad_norm_'s
    coefficient) multiplies the unscaled grads once more."""
    per_device: dict[torch.device, tuple[Tensor | None, Tensor | None, Tensor | None]] = {}
    # The stored grads differ from what SGD used only when a factor applies.
    rescaled = grad_factor != 1.0 or grad_scale is not None or clip_coef is not None
    for gp in plan.groups:
        group = gp.group
        write_grads = rescaled and bool(group["grad_writeback"])
        hyper = dict(
            weight_decay=as_float(group["weight_decay"]),
            momentum=as_float(group["momentum"]),
            dampening=as_float(group["dampening"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
        )
        lr = group["lr"]
        momentum = hyper["momentum"] != 0
        # Taken before any launch (NOTE: [params listed twice] in _repeats.py).
        counts_before = first_counts(gp.repeats, state) if gp.repeats and momentum else []
        for i, b in enumerate(gp.buckets + gp.repeats):
            again = i >= len(gp.buckets)  # a param listed twice, stepped again
            write = write_grads and not again
            if b.device not in per_device:
                per_device[b.device] = tuple(
                    None if t is None else to_device(t, b.device) for t in (grad_scale, found_inf, clip_coef)
                )
            scale_d, inf_d, clip_d = per_device[b.device]
            factor = grad_factor
            if again and write_grads:  # .grad holds the unscaled (clipped) mean now
                factor, scale_d, clip_d = 1.0, None, None
            if isinstance(lr, Tensor) and lr.device == b.device:
                lr_f, lr_t = 1.0, lr
            else:
                lr_f, lr_t = as_float(lr), None
            params, grads, bufs, counts, writeback = kernel_lists(b, state, momentum, write)
            if again and momentum:
                counts = counts_before[i - len(gp.buckets)]
            _ops.fused_sgd_(
                params, grads, bufs, counts,
                lr=lr_f, lr_tensor=lr_t, grad_factor=factor, grad_scale=scale_d, found_inf=inf_d,
                write_grads=write, clip_coef=clip_d, **hyper,
            )
            for t, stand_in in writeback:
                t.copy_(stand_in)
        if gp.sparse:
            sparse_step(group, gp.sparse, gp.sparse_steps(), state, hyper, grad_factor, grad_scale, found_inf,
                        write_grads, clip_coef)


def kernel_lists(b: Bucket, state, momentum: bool, write_grads: bool):
    """params, grads, momentum buffers, update counters and write-backs of a
    bucket, creating missing state. Dense stand-ins of params (and of grads
    the kernel writes) are copied back after the kernel."""
    params, grads, writeback = b.params, b.grads, []
    if not b.plain:
        params, grads = [], []
        for p, g in zip(b.params, b.grads):
            target = p
            if not is_dense(p):
                target = p.contiguous()
                writeback.append((p, target))
            params.append(target)
            g_like = like(g, target)
            if write_grads and g_like is not g:
                writeback.append((g, g_like))
            grads.append(g_like)
    bufs, counts = _momentum.kernel_state(state, b.keys, params, b.verify_state, b.sharded) if momentum else ([], [])
    if not b.plain:
        params, grads, bufs = [real(t) for t in params], [real(t) for t in grads], [real(t) for t in bufs]
    return params, grads, bufs, counts, writeback

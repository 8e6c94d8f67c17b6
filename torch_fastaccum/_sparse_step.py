"""Sparse gradients: torch's own single-tensor SGD math, unfused, in the same
step as the fused dense buckets. With a loss scaler this is the one place a
host read of found_inf is allowed."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from . import _momentum, _ops
from ._hyper import as_float


def grad_multiplier(grad_factor: float, grad_scale: Tensor | None) -> float:
    """The dense kernels' grad multiplier, inv_scale(scale) * grad_factor
    (csrc/sgd_math.h), read back from unscale_check_ applied to a float64 1.0
    so that the reciprocal is formed in one place only."""
    if grad_scale is None:
        return grad_factor
    one = torch.ones(1, dtype=torch.float64, device=grad_scale.device)
    scratch = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
    _ops.unscale_check_([one], scratch, grad_scale, factor=grad_factor)
    return one.item()


def sparse_step(group: dict, pairs: list[tuple[Tensor, Tensor]], steps: list[tuple[Tensor, Tensor]], state,
                hyper: dict, grad_factor: float, grad_scale: Tensor | None, found_inf: Tensor | None,
                write_grads: bool, clip_coef: Tensor | None = None) -> None:
    """`pairs`: each sparse (param, grad) once, for the write-back; `steps`:
    every occurrence, as torch's loop steps a param listed twice twice."""
    mul = grad_multiplier(grad_factor, grad_scale)
    # A host read, as found_inf's below: the sparse path is the host path.
    clip = 1.0 if clip_coef is None else clip_coef.item()
    if write_grads and (mul != 1.0 or clip != 1.0):
        # As the dense kernels: .grad is left unscaled (and clipped), skipped
        # step or not; two roundings, as the reference's unscale and clip.
        for _, g in pairs:
            if mul != 1.0:
                g._values().mul_(mul)
            if clip != 1.0:
                g._values().mul_(clip)
        mul = clip = 1.0
    if found_inf is not None and found_inf.item() != 0:
        return
    momentum = hyper["momentum"] != 0
    params = [p for p, _ in steps]
    grads = [g * mul if mul != 1.0 else g for _, g in steps]
    grads = [g * clip if clip != 1.0 else g for g in grads]
    bufs = [state[p].get(_momentum.MOMENTUM) if momentum else None for p in params]
    torch_sgd(params, grads, bufs, foreach=False, fused=False, lr=as_float(group["lr"]), has_sparse_grad=True, **hyper)
    if momentum:
        _momentum.after_sparse_step(state, params, bufs)

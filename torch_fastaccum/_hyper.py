"""Validation of AccumOptimizer's hyper-parameters, with SGD's messages."""

from __future__ import annotations

from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused

# SGD's __setstate__ defaults for keys that older state dicts lack.
SGD_GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}


def as_float(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def validate_sgd(lr, momentum, dampening, weight_decay, nesterov, where: str = "") -> None:
    """torch.optim.SGD's checks and wording, prefixed with `where`."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"{where}Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"{where}Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"{where}Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{where}Nesterov momentum requires a momentum and zero dampening")


def validate_group(group: dict, k: int, where: str) -> None:
    """A param group as add_param_group filled it in."""
    validate_sgd(group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"], where)
    if group["differentiable"]:
        raise ValueError(f"{where}differentiable=True is not supported")
    if group["accumulation_steps"] != k:
        raise ValueError(
            f"{where}accumulation_steps={group['accumulation_steps']!r} differs from the "
            f"optimizer's {k!r}; one micro-batch counter drives every group"
        )


def validate_accumulation_steps(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid accumulation_steps: {k!r} (must be an int >= 1)")


def validate_options(accumulation_steps, grad_writeback, differentiable) -> None:
    """AccumOptimizer's own constructor arguments (SGD's: validate_sgd)."""
    validate_accumulation_steps(accumulation_steps)
    if not isinstance(grad_writeback, bool):
        raise ValueError(f"Invalid grad_writeback: {grad_writeback!r} (must be a bool)")
    if differentiable:
        raise ValueError(
            "AccumOptimizer does not support differentiable=True: its fused "
            "kernels update parameters in place outside autograd"
        )


def check_fused_request(param_groups: list[dict]) -> bool:
    """What SGD(fused=True) refuses at its first step, refused alike: torch's
    check and error, on the first param with a grad of a fused group. Our
    kernels would run on those params (meta, complex), but a loop that asks
    for fused=True must fail as it fails with torch, not train where torch's
    cannot. Returns whether a param was checked (SGD checks once)."""
    for group in param_groups:
        if group["fused"]:
            p = next((p for p in group["params"] if p.grad is not None), None)
            if p is not None:
                _device_dtype_check_for_fused(p)
                return True
    return False

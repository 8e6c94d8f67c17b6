"""Thin typed wrappers over torch.ops.fastaccum.* and their fake impls.

All per-element math lives in the kernels (csrc/); this module only forwards.
The ops mutate their inputs and return nothing, so their fake impls only check
what can be checked without data and return None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _op_checks as checks

__all__ = [
    "nonfinite_check_",
    "unscale_check_",
    "norm_check_",
    "fused_sgd_",
    "has_kernel_for",
    "cuda_launch_count",
    "cuda_table_stats",
]


def has_kernel_for(device_type: str) -> bool:
    """Whether the extension has kernels for a device type ("cpu", "cuda", or
    "meta": the fake impls below, registered as Meta kernels, give meta tensors
    a shape-only step)."""
    return device_type in _KERNEL_DEVICES


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def nonfinite_check_(grads: list[Tensor], found_inf: Tensor, sumsq: Tensor | None = None) -> None:
    """Read-only: ``found_inf <- 1`` if any element of ``grads`` is inf/NaN;
    ``sumsq += sum(g**2)`` when given. One (device, dtype) per call."""
    torch.ops.fastaccum.nonfinite_check_.default(grads, found_inf, sumsq)


@torch.library.register_fake("fastaccum::nonfinite_check_")
def _(grads, found_inf, sumsq=None):
    _check_flag_pass(grads, found_inf, sumsq)
    return None


def _check_flag_pass(grads, found_inf, sumsq, grad_scale=None):
    """nonfinite_check_'s and unscale_check_'s eager checks."""
    if grad_scale is not None:
        checks.check_scalar_f32(grad_scale, "grad_scale")
    checks.check_uniform(grads, "grads")
    checks.check_scalar_f32(found_inf, "found_inf")
    if sumsq is not None:
        checks.check_scalar_f32(sumsq, "sumsq")
    checks.check_on_device(found_inf, "found_inf", grads, "grads", cpu_ok=False)
    checks.check_on_device(sumsq, "sumsq", grads, "grads", cpu_ok=False)
    checks.check_on_device(grad_scale, "grad_scale", grads, "grads", cpu_ok=True)


def unscale_check_(
    grads: list[Tensor],
    found_inf: Tensor,
    grad_scale: Tensor,
    *,
    factor: float = 1.0,
    sumsq: Tensor | None = None,
) -> None:
    """In place ``g <- g * float(1/grad_scale) * factor`` with the inf/NaN check."""
    torch.ops.fastaccum.unscale_check_.default(grads, found_inf, grad_scale, factor=factor, sumsq=sumsq)


@torch.library.register_fake("fastaccum::unscale_check_")
def _(grads, found_inf, grad_scale, *, factor=1.0, sumsq=None):
    _check_flag_pass(grads, found_inf, sumsq, grad_scale)
    return None


def norm_check_(
    grads: list[Tensor],
    found_inf: Tensor,
    norm_out: Tensor,
    *,
    norm_type: float = 2.0,
    grad_scale: Tensor | None = None,
    factor: float = 1.0,
) -> None:
    """Read-only: with ``x = g * float(1/grad_scale) * factor`` rounded to the
    grads' dtype, ``found_inf <- 1`` if any x is inf/NaN and ``norm_out <-``
    sum(x**2) (norm_type 2) or max|x| (inf), deterministically. One (device,
    dtype) per call; norm_out is float32 (float64 for float64 grads)."""
    torch.ops.fastaccum.norm_check_.default(
        grads, found_inf, norm_out, norm_type=norm_type, grad_scale=grad_scale, factor=factor)


@torch.library.register_fake("fastaccum::norm_check_")
def _(grads, found_inf, norm_out, *, norm_type=2.0, grad_scale=None, factor=1.0):
    checks.check_uniform(grads, "grads")
    checks.check_scalar_f32(found_inf, "found_inf")
    checks.check_norm_args(grads, norm_out, norm_type)
    if grad_scale is not None:
        checks.check_scalar_f32(grad_scale, "grad_scale")
    checks.check_on_device(found_inf, "found_inf", grads, "grads", cpu_ok=False)
    checks.check_on_device(norm_out, "norm_out", grads, "grads", cpu_ok=False)
    checks.check_on_device(grad_scale, "grad_scale", grads, "grads", cpu_ok=True)
    return None


def fused_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_factor: float = 1.0,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grads: bool = False,
    clip_coef: Tensor | None = None,
) -> None:
    """The fused SGD step of one (device, dtype) group; see csrc/sgd_math.h.
    With ``write_grads`` each grad is left as the unscaled grad the update
    used (also on a skipped step). ``clip_coef`` multiplies the unscaled
    grad once more (a fused clip_grad_norm_)."""
    torch.ops.fastaccum.fused_sgd_.default(
        params,
        grads,
        momentum_buffers,
        steps,
        lr=lr,
        lr_tensor=lr_tensor,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        grad_factor=grad_factor,
        grad_scale=grad_scale,
        found_inf=found_inf,
        write_grads=write_grads,
        clip_coef=clip_coef,
    )


@torch.library.register_fake("fastaccum::fused_sgd_")
def _(params, grads, momentum_buffers, steps, *, lr, lr_tensor=None, weight_decay, momentum,
      dampening, nesterov, maximize, grad_factor=1.0, grad_scale=None, found_inf=None,
      write_grads=False, clip_coef=None):
    checks.check_sgd_lists(params, grads, momentum_buffers, steps, momentum != 0.0)
    if found_inf is not None:
        checks.check_scalar_f32(found_inf, "found_inf")
    if grad_scale is not None:
        checks.check_scalar_f32(grad_scale, "grad_scale")
    if lr_tensor is not None and lr_tensor.numel() != 1:
        raise RuntimeError("lr_tensor must have one element")
    if clip_coef is not None:
        checks.check_scalar_f32(clip_coef, "clip_coef")
    for t, name in ((found_inf, "found_inf"), (grad_scale, "grad_scale"), (lr_tensor, "lr_tensor"),
                    (clip_coef, "clip_coef")):
        checks.check_on_device(t, name, params, "params", cpu_ok=True)
    return None


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cuda_launch_count(numels: list[int], dtype: torch.dtype, *, momentum: bool = True,
                      captured: bool = False, arg_bytes: int = 32764) -> dict[str, int]:
    """The CUDA kernel launches one optimizer step makes for one (device,
    dtype) group of tensors with these element counts, per pass, computed by
    the C++ plan the launchers run (NOTE: [launch counts] in
    csrc/launch_plan.h), so it holds on a machine without a GPU.

    Keys: ``check`` (the scaler's check/unscale pass), ``norm`` (the fused
    clip's norm pass, which replaces ``check``), ``update`` and ``steps`` (the
    update and, with ``momentum``, its step counters), ``step`` (check +
    update + steps) and ``step_with_clip`` (norm + update + steps).
    ``captured``: the by-value launches used while a CUDA graph is being
    captured, within ``arg_bytes`` of kernel arguments (32764 with CUDA >=
    12.1 on sm70+, else 4096); otherwise the eager one-launch passes. Chunks
    count elements, so ``dtype`` (one the kernels take) does not change the
    count.
    """
    if dtype not in _KERNEL_DTYPES:
        raise TypeError(f"cuda_launch_count: dtype must be one of {_KERNEL_DTYPES}, got {dtype}")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in numels):
        raise ValueError("cuda_launch_count: numels must be non-negative ints")
    check, norm, update, steps = torch.ops.fastaccum._cuda_launch_count(
        list(numels), momentum, captured, arg_bytes)
    return {"check": check, "norm": norm, "update": update, "steps": steps,
            "step": check + update + steps, "step_with_clip": norm + update + steps}


def cuda_table_stats(clear: bool = False) -> dict[str, int]:
    """Counters of the CUDA launch-table cache (NOTE: [table cache] in
    csrc/cuda/launch_table.h) since the process started: ``hits`` (calls
    whose table was on the device already), ``uploads`` and ``upload_bytes``
    (calls that copied a changed table), ``allocations`` and ``entries``.
    All 0 without CUDA kernels. ``clear`` empties the cache after reading
    (the counters keep counting)."""
    hits, uploads, upload_bytes, allocations, entries = torch.ops.fastaccum._cuda_table_stats(clear)
    return {"hits": hits, "uploads": uploads, "upload_bytes": upload_bytes,
            "allocations": allocations, "entries": entries}


# A fact of the build, read once here, after the fake impls above registered
# the Meta kernels. A plain frozenset, so that dynamo traces has_kernel_for
# in a compiled step (it cannot trace into the C++ lookup). Not
# torch.compiler.assume_constant_result: that imports torch._dynamo (and
# inductor, sympy, ...) when the decorator runs, i.e. at `import
# torch_fastaccum`, which doubled the import time and made a dozen more
# attempts to import numpy.
_KERNEL_DEVICES = frozenset(
    device_type
    for device_type, key in _DISPATCH_KEYS.items()
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastaccum::fused_sgd_", key)
)

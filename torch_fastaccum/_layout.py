"""Tensor layout helpers: real views, dense stand-ins, device moves.

Which (param, grad) pairs need a stand-in is decided in C++ (csrc/fusable.h,
through _plan.py); these only build the stand-ins.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one span of numel slots."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda e: e[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def real(t: Tensor) -> Tensor:
    """The real view of a complex tensor; any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def dense_real(t: Tensor) -> Tensor:
    """A dense real tensor with t's values (a view where t is dense)."""
    t = real(t)
    return t if is_dense(t) else t.contiguous()


def like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` with the element order of `ref` (a dense copy only when it differs)."""
    if t.stride() == ref.stride() or all(s == 1 or a == b for s, a, b in zip(ref.shape, t.stride(), ref.stride())):
        return t
    return torch.empty_like(ref).copy_(t)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`, without a sync where the kernels read it on the device.
    A copy to the CPU is blocking: the CPU kernels read it at once, and a
    non-blocking device-to-host copy may not have landed yet."""
    return t.to(device, non_blocking=device.type != "cpu")

"""The ops' argument checks for their fake impls: csrc/check_inputs.h's
rules and messages, on metadata only.

The fake impls are also the ops' Meta kernels, and the dispatcher sends a
call to the Meta kernel whenever one tensor of it is on meta: a CPU (or
CUDA) list with one meta tensor never reaches the eager checks. So the fake
impls check what the eager impls check, with the same words, and a call
the eager path refuses is refused here too, not traced or run as a no-op
(tests/test_op_checks.py holds the two to the same messages).
"""

from __future__ import annotations

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# c10's ScalarType names, as the C++ messages print dtypes.
_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble", torch.int8: "Char", torch.uint8: "Byte",
    torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
}


def is_non_overlapping_and_dense(t: Tensor) -> bool:
    """c10's rule: the dims of size >= 2, by stride, are a contiguous layout
    (a tensor with a dim of size 0 or 1 element passes)."""
    if any(size == 0 for size in t.shape):
        return True
    require = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz >= 2):
        if stride != require:
            return False
        require *= size
    return True


def _dtype(t: Tensor) -> str:
    return _NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))


def _shape(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _fail(message: str) -> None:
    raise RuntimeError(message)


def check_uniform(tensors: list[Tensor], name: str) -> None:
    """One device and one dtype for the whole list, every tensor a dense span."""
    if not tensors:
        return
    device, dtype = tensors[0].device, tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.device != device:
            _fail(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}")
        if t.dtype != dtype:
            _fail(f"{name}[{i}] has dtype {_dtype(t)} but {name}[0] has {_dtype(tensors[0])}")
        if t.layout != torch.strided:
            _fail(f"{name}[{i}] must be dense")
        if not is_non_overlapping_and_dense(t):
            _fail(f"{name}[{i}] must be non-overlapping and dense")
        if t.dtype not in KERNEL_DTYPES:
            _fail(f"{name}[{i}] must be float32, float64, float16 or bfloat16, got {_dtype(t)}")


def check_like(refs: list[Tensor], tensors: list[Tensor], name: str) -> None:
    """Each tensor shaped, typed, placed and laid out like its param."""
    if len(tensors) != len(refs):
        _fail(f"{name} has {len(tensors)} tensors but params has {len(refs)}")
    for i, (t, r) in enumerate(zip(tensors, refs)):
        if t.device != r.device:
            _fail(f"{name}[{i}] is on {t.device} but its param is on {r.device}")
        if t.dtype != r.dtype:
            _fail(f"{name}[{i}] has dtype {_dtype(t)} but its param has {_dtype(r)}")
        if t.shape != r.shape:
            _fail(f"{name}[{i}] has shape {_shape(t.shape)} but its param has {_shape(r.shape)}")
        if t.layout != torch.strided:
            _fail(f"{name}[{i}] must be dense")
        if any(size > 1 and a != b for size, a, b in zip(t.shape, t.stride(), r.stride())):
            _fail(f"{name}[{i}] has strides {_shape(t.stride())} but its param has {_shape(r.stride())}")


def check_scalar_f32(t: Tensor, name: str) -> None:
    if t.numel() != 1:
        _fail(f"{name} must have one element, got {t.numel()}")
    if t.dtype != torch.float32:
        _fail(f"{name} must be float32, got {_dtype(t)}")


def check_sgd_lists(params, grads, momentum_buffers, steps, has_momentum: bool) -> None:
    check_uniform(params, "params")
    check_like(params, grads, "grads")
    if not has_momentum:
        if momentum_buffers or steps:
            _fail("momentum_buffers and steps must be empty when momentum == 0")
        return
    check_like(params, momentum_buffers, "momentum_buffers")
    if len(steps) != len(params):
        _fail(f"steps has {len(steps)} tensors but params has {len(params)}")
    for i, (s, p) in enumerate(zip(steps, params)):
        check_scalar_f32(s, "steps[i]")
        if s.device != p.device:
            _fail(f"steps[{i}] is on {s.device} but its param is on {p.device}")


def check_norm_args(grads: list[Tensor], norm_out: Tensor, norm_type: float) -> None:
    if not (norm_type == 2.0 or norm_type == float("inf")):
        _fail(f"norm_type must be 2.0 or inf, got {norm_type:g}")
    if norm_out.numel() != 1:
        _fail(f"norm_out must have one element, got {norm_out.numel()}")
    f64 = bool(grads) and grads[0].dtype == torch.float64
    want = torch.float64 if f64 else torch.float32
    if not (norm_out.dtype == want or (not grads and norm_out.dtype == torch.float64)):
        for_what = _NAMES[torch.float32] if not grads else _dtype(grads[0])
        _fail(f"norm_out must be {_NAMES[want]} for {for_what} grads, got {_dtype(norm_out)}")


def check_on_device(t: Tensor | None, name: str, ref: list[Tensor], what: str, cpu_ok: bool) -> None:
    """`t` (a flag, a scale, an output) on the device of the list `ref`
    (or the CPU, where the eager impls read it from host memory)."""
    if t is None or not ref:
        return
    device = ref[0].device
    if t.device != device and not (cpu_ok and t.device.type == "cpu"):
        _fail(f"{name} is on {t.device} but {what} are on {device}")

"""The fake impls refuse what the eager impls refuse, with their words.

A call with one meta tensor goes to the Meta kernel, which is the fake impl,
whatever device the other tensors are on: a CPU (or CUDA) list with a meta
tensor in it used to run there as a silent no-op. Each bad call below is
made twice, on CPU tensors (the C++ checks of csrc/check_inputs.h) and on
meta tensors (the fake impls, torch_fastaccum/_op_checks.py), and must fail
the same way; under FakeTensorMode (what torch.compile traces with) too.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_fastaccum  # noqa: F401  (loads the ops)

ops = torch.ops.fastaccum


def _sgd(params, grads, bufs=None, steps=None, momentum=0.9, **kw):
    if momentum and bufs is None:
        bufs = [torch.zeros_like(p) for p in params]
    if momentum and steps is None:
        steps = [torch.zeros((), device=p.device) for p in params]
    args = dict(lr=0.1, lr_tensor=None, weight_decay=0.0, momentum=momentum, dampening=0.0, nesterov=False,
                maximize=False)
    args.update(kw)
    ops.fused_sgd_.default(params, grads, bufs or [], steps or [], **args)


def _flag(d, dtype=torch.float32):
    return torch.zeros((), dtype=dtype, device=d)


BAD_CALLS = {
    "sgd params dtypes": lambda d: _sgd([torch.ones(3, device=d), torch.ones(3, device=d, dtype=torch.float64)],
                                        [torch.ones(3, device=d), torch.ones(3, device=d, dtype=torch.float64)]),
    "sgd grad shape": lambda d: _sgd([torch.ones(2, 3, device=d)], [torch.ones(3, 2, device=d)]),
    "sgd grad dtype": lambda d: _sgd([torch.ones(3, device=d)], [torch.ones(3, device=d, dtype=torch.float16)]),
    "sgd grad strides": lambda d: _sgd([torch.ones(2, 3, device=d)], [torch.ones(3, 2, device=d).t()]),
    "sgd grads count": lambda d: _sgd([torch.ones(3, device=d)], []),
    "sgd int params": lambda d: _sgd([torch.ones(3, device=d, dtype=torch.int32)],
                                     [torch.ones(3, device=d, dtype=torch.int32)]),
    "sgd overlapping param": lambda d: _sgd([torch.ones(1, device=d).expand(3)], [torch.ones(3, device=d)]),
    "sgd steps count": lambda d: _sgd([torch.ones(3, device=d)], [torch.ones(3, device=d)], steps=[]),
    "sgd step dtype": lambda d: _sgd([torch.ones(3, device=d)], [torch.ones(3, device=d)],
                                     steps=[_flag(d, torch.float64)]),
    "sgd buffers without momentum": lambda d: _sgd([torch.ones(3, device=d)], [torch.ones(3, device=d)],
                                                   bufs=[torch.ones(3, device=d)], momentum=0.0),
    "sgd found_inf dtype": lambda d: _sgd([torch.ones(3, device=d)], [torch.ones(3, device=d)],
                                          found_inf=_flag(d, torch.float64)),
    "sgd lr_tensor": lambda d: _sgd([torch.ones(3, device=d)], [torch.ones(3, device=d)],
                                    lr_tensor=torch.ones(2, device=d)),
    "check grads dtypes": lambda d: ops.nonfinite_check_.default(
        [torch.ones(3, device=d), torch.ones(3, device=d, dtype=torch.bfloat16)], _flag(d), None),
    "check found_inf size": lambda d: ops.nonfinite_check_.default(
        [torch.ones(3, device=d)], torch.zeros(2, device=d), None),
    "check sumsq dtype": lambda d: ops.nonfinite_check_.default(
        [torch.ones(3, device=d)], _flag(d), _flag(d, torch.float64)),
    "unscale scale dtype": lambda d: ops.unscale_check_.default(
        [torch.ones(3, device=d)], _flag(d), _flag(d, torch.float64)),
    "unscale non-dense grad": lambda d: ops.unscale_check_.default(
        [torch.ones(4, 3, device=d)[::2]], _flag(d), _flag(d)),
    "norm type": lambda d: ops.norm_check_.default(
        [torch.ones(3, device=d)], _flag(d), _flag(d), norm_type=3.0),
    "norm out dtype": lambda d: ops.norm_check_.default(
        [torch.ones(3, device=d, dtype=torch.float64)], _flag(d), _flag(d), norm_type=2.0),
    "norm out size": lambda d: ops.norm_check_.default(
        [torch.ones(3, device=d)], _flag(d), torch.zeros(2, device=d), norm_type=2.0),
    "norm grads dtypes": lambda d: ops.norm_check_.default(
        [torch.ones(3, device=d), torch.ones(3, device=d, dtype=torch.float16)], _flag(d), _flag(d)),
}


def _error(call, device):
    with pytest.raises(RuntimeError) as e:
        call(device)
    return str(e.value).splitlines()[0]


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_fake_impl_refuses_as_the_eager_impl(case):
    eager = _error(BAD_CALLS[case], "cpu")
    assert _error(BAD_CALLS[case], "meta") == eager
    with FakeTensorMode():
        assert _error(BAD_CALLS[case], "cpu") == eager


def _mixed(d_first, d_other):
    return [torch.ones(3, device=d_first), torch.ones(3, device=d_other)]


MIXED = {
    "fused_sgd_": lambda a, b: _sgd(_mixed(a, b), _mixed(a, b)),
    "fused_sgd_ grads": lambda a, b: _sgd(_mixed(a, a), _mixed(a, b)),
    "nonfinite_check_": lambda a, b: ops.nonfinite_check_.default(_mixed(a, b), _flag(a), None),
    "unscale_check_": lambda a, b: ops.unscale_check_.default(_mixed(a, b), _flag(a), _flag(a)),
    "norm_check_": lambda a, b: ops.norm_check_.default(_mixed(a, b), _flag(a), _flag(a)),
    "norm_check_ out": lambda a, b: ops.norm_check_.default(_mixed(a, a), _flag(a), _flag(b)),
    "nonfinite_check_ flag": lambda a, b: ops.nonfinite_check_.default(_mixed(a, a), _flag(b), None),
}


@pytest.mark.parametrize("first", ["cpu", "meta"])
@pytest.mark.parametrize("op", list(MIXED))
def test_a_list_mixing_meta_and_cpu_is_refused(op, first):
    """One meta tensor in a CPU call (or one CPU tensor in a meta call) sends
    it to the fake impl: refused there, naming the tensor and both devices,
    as the eager impls refuse a list mixing CPU and CUDA."""
    other = "cpu" if first == "meta" else "meta"
    with pytest.raises(RuntimeError, match=r"is on (meta|cpu) but .* (are|is) on (cpu|meta)"):
        MIXED[op](first, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", list(MIXED))
def test_a_list_mixing_meta_and_cuda_is_refused(op):
    with pytest.raises(RuntimeError, match=r"is on (meta|cuda:0) but .* (are|is) on (cuda:0|meta)"):
        MIXED[op]("cuda", "meta")

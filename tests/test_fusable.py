"""The triage of (param, grad) pairs (csrc/fusable.h, fusable.cpp): the one
statement of what goes to the kernels as it is, what needs a stand-in, and
what is an error. Both triage ops must agree with each other and with what
the optimizer then does."""

from __future__ import annotations

import pytest
import torch

import torch_fastaccum  # noqa: F401  (registers the ops)
from torch_fastaccum import AccumOptimizer
from torch_fastaccum._plan import PairKind

kinds_op = torch.ops.fastaccum._pair_kinds.default
first_op = torch.ops.fastaccum._first_unfusable.default


def _sparse_grad(p):
    i = torch.tensor([[0, 2]])
    return torch.sparse_coo_tensor(i, torch.ones(2, *p.shape[1:], dtype=p.dtype), p.shape)


# (name, param, grad, expected kind)
CASES = [
    ("no grad", torch.zeros(3), None, PairKind.NO_GRAD),
    ("fp32", torch.zeros(3), torch.ones(3), PairKind.FUSABLE),
    ("bf16 2-d", torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16), PairKind.FUSABLE),
    ("both transposed alike", torch.zeros(3, 4).t(), torch.ones(3, 4).t(), PairKind.FUSABLE),
    ("size-1 dim, odd stride", torch.zeros(1, 4), torch.ones(4, 1).t(), PairKind.FUSABLE),
    ("grad transposed", torch.zeros(4, 3), torch.ones(3, 4).t(), PairKind.STAND_IN),
    ("param strided view", torch.zeros(8)[::2], torch.ones(4), PairKind.STAND_IN),
    ("complex64", torch.zeros(3, dtype=torch.complex64), torch.ones(3, dtype=torch.complex64), PairKind.STAND_IN),
    ("sparse COO grad", torch.zeros(4, 2), None, PairKind.SPARSE),
    ("dtype mismatch", torch.zeros(3), torch.ones(3, dtype=torch.float64), PairKind.MISMATCH),
    ("shape mismatch", torch.zeros(3), torch.ones(4), PairKind.MISMATCH),
    ("int64", torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), PairKind.BAD_DTYPE),
    ("float8", torch.zeros(3, dtype=torch.float8_e4m3fn), torch.zeros(3, dtype=torch.float8_e4m3fn),
     PairKind.BAD_DTYPE),
    ("CSR grad", torch.zeros(2, 2), torch.eye(2).to_sparse_csr(), PairKind.BAD_LAYOUT),
]
CASES = [(n, p, _sparse_grad(p) if n == "sparse COO grad" else g, k) for n, p, g, k in CASES]


@pytest.mark.parametrize("name,p,g,kind", CASES, ids=[c[0] for c in CASES])
def test_pair_kind(name, p, g, kind):
    assert kinds_op([p], [g]) == [kind]
    first, _ = first_op([torch.zeros(2), p], [torch.ones(2), g])
    # _first_unfusable names the first pair that is neither fusable nor gradless.
    assert first == (-1 if kind in (PairKind.NO_GRAD, PairKind.FUSABLE) else 1)


def test_signature_follows_devices_and_dtypes():
    ps = [torch.zeros(3), torch.zeros(3)]
    gs = [torch.ones(3), torch.ones(3)]
    base = first_op(ps, gs)[1]
    assert first_op(ps, gs)[1] == base
    assert first_op([ps[0], ps[1].double()], [gs[0], gs[1].double()])[1] != base
    assert first_op(ps, [gs[0], None])[1] != base  # which params have grads
    assert first_op(ps[::-1], gs)[1] == base  # the same devices and dtypes in order


# (A CSR grad cannot be assigned to a strided param: autograd refuses it.)
@pytest.mark.parametrize("name", ["int64", "float8", "dtype mismatch"])
def test_each_error_kind_raises_before_any_state_changes(name):
    _, p, g, _ = next(c for c in CASES if c[0] == name)
    good = torch.nn.Parameter(torch.randn(3))
    good.grad = torch.randn(3)
    bad = torch.nn.Parameter(p.clone(), requires_grad=False)
    opt = AccumOptimizer([good, bad], lr=0.1, momentum=0.9)
    bad.grad_dtype = None  # lets autograd accept a grad of another dtype
    bad.grad = g
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0
    assert opt.is_accumulation_boundary  # the window did not advance


def test_op_boundary_rejects_dtypes_without_kernels():
    p = [torch.zeros(3, dtype=torch.float8_e5m2)]
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        torch.ops.fastaccum.fused_sgd_(p, [p[0].clone()], [], [], lr=0.1, weight_decay=0.0, momentum=0.0,
                                       dampening=0.0, nesterov=False, maximize=False)

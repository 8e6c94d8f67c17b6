"""AccumOptimizer vs torch.optim.SGD (default path) + the reference accumulation loop.

The rule: torch.optim.SGD's update math per element and in its order, with the
mean of the K micro-batch gradients at every K-th step() (the AccumOptimizer
docstring); fp32 params agree to rtol 1e-5 / atol 1e-6 after 100 updates
(RTOL/ATOL in tests/_helpers.py).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from _helpers import (
    ATOL,
    DEVICES,
    RTOL,
    assert_params_changed,
    assert_params_close,
    loss_fn_for,
    make_batches,
    make_mlp,
    make_model,
    params_of,
    run_ours,
    run_ref,
)
from torch_fastaccum import AccumOptimizer

pytestmark = pytest.mark.usefixtures("single_thread")

N_UPDATES = 100

# (momentum, dampening, nesterov): every valid combination of momentum {0, 0.9},
# dampening {0, 0.1}, nesterov {F, T} (nesterov needs momentum > 0 and no dampening).
MOMENTUM_CASES = [
    (m, d, n)
    for m, d, n in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True])
    if not (n and (m == 0 or d != 0))
]


def _ids(case):
    m, d, n = case
    return f"mom{m}-damp{d}-{'nesterov' if n else 'plain'}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["wd0", "wd1e-2"])
@pytest.mark.parametrize("mom_case", MOMENTUM_CASES, ids=_ids)
def test_hyperparameter_matrix(mom_case, weight_decay, maximize, K, device):
    """Every hyper-parameter combination of section 1, 100 updates of a tiny MLP."""
    momentum, dampening, nesterov = mom_case
    kw = dict(
        lr=0.05,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    # With maximize the objective is -MSE, so gradient ascent still converges and
    # the parameters stay in a well-conditioned range for 100 updates.
    sign = -1.0 if maximize else 1.0
    ours_m = make_mlp(seed=3, device=device)
    ref_m = copy.deepcopy(ours_m)
    init = params_of(ours_m)
    batches = make_batches("mlp", K * N_UPDATES, seed=11, device=device)
    run_ours(ours_m, batches, K, opt_kwargs=kw, sign=sign)
    run_ref(ref_m, batches, K, opt_kwargs=kw, sign=sign)
    assert_params_changed(init, ours_m)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 3, 4])
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3),
        dict(lr=0.05, momentum=0.9, dampening=0.1),
        dict(lr=0.1),
    ],
    ids=["nesterov-wd", "momentum-dampening", "plain"],
)
def test_cnn_parity(kw, K, device):
    """A small CIFAR-style CNN (conv/relu/maxpool/linear), cross-entropy, 100 updates."""
    ours_m = make_model("cnn", seed=5, device=device)
    ref_m = copy.deepcopy(ours_m)
    init = params_of(ours_m)
    batches = make_batches("cnn", K * N_UPDATES, seed=7, device=device)
    run_ours(ours_m, batches, K, opt_kwargs=kw, loss_fn=F.cross_entropy)
    run_ref(ref_m, batches, K, opt_kwargs=kw, loss_fn=F.cross_entropy)
    assert_params_changed(init, ours_m)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("K", [3, 5, 6])
def test_non_power_of_two_K(K):
    """1/K is not exact in binary; the mean must still match the (loss/K) loop."""
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    ours_m = make_mlp(seed=1)
    ref_m = copy.deepcopy(ours_m)
    batches = make_batches("mlp", K * N_UPDATES, seed=2)
    run_ours(ours_m, batches, K, opt_kwargs=kw)
    run_ref(ref_m, batches, K, opt_kwargs=kw)
    assert_params_close(ours_m.parameters(), ref_m.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_k1_in_users_own_accumulation_loop(device):
    """accumulation_steps=1 behaves exactly like SGD in any loop, including a loop
    that divides the loss itself and calls step() only every 4th iteration."""
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    ours_m = make_mlp(seed=4, device=device)
    ref_m = copy.deepcopy(ours_m)
    ours = AccumOptimizer(ours_m.parameters(), **kw)
    ref = torch.optim.SGD(ref_m.parameters(), foreach=False, **kw)
    K = 4
    for i, (x, y) in enumerate(make_batches("mlp", K * N_UPDATES, seed=9, device=device)):
        for m, o in ((ours_m, ours), (ref_m, ref)):
            (F.mse_loss(m(x), y) / K).backward()
            if (i + 1) % K == 0:
                assert o.step() is None
                o.zero_grad()
    assert_params_close(ours_m.parameters(), ref_m.parameters())


def test_k1_is_bitwise_like_sgd_for_plain_sgd():
    """With no momentum/weight decay the update is p - lr*g. lr = 0.125 is a power
    of two, so lr*g is exact and p - lr*g is a single rounding whether or not
    either side uses a fused multiply-add: a K=1 step must match SGD bit for bit."""
    m = make_mlp(seed=8)
    r = copy.deepcopy(m)
    x, y = make_batches("mlp", 1, seed=3)[0]
    for mod in (m, r):
        F.mse_loss(mod(x), y).backward()
    AccumOptimizer(m.parameters(), lr=0.125).step()
    torch.optim.SGD(r.parameters(), lr=0.125, foreach=False).step()
    for a, b in zip(m.parameters(), r.parameters()):
        assert torch.equal(a, b)


def test_updates_only_on_boundary_and_grads_accumulate():
    """Non-boundary step() leaves params alone; zero_grad() only acts right after a
    boundary step, so .grad holds the running SUM of the window's micro-batch grads."""
    K = 3
    m = make_mlp(seed=2)
    opt = AccumOptimizer(m.parameters(), lr=0.1, momentum=0.9, accumulation_steps=K)
    batches = make_batches("mlp", 2 * K, seed=4)
    ref_grads = None
    for i, (x, y) in enumerate(batches):
        before = params_of(m)
        assert opt.is_accumulation_boundary == ((i + 1) % K == 0)
        opt.zero_grad()
        if i % K == 0:
            # right after a boundary (or before the first step): zero_grad cleared
            assert all(p.grad is None for p in m.parameters())
            ref_grads = [torch.zeros_like(p) for p in m.parameters()]
        else:
            assert all(p.grad is not None for p in m.parameters())
        F.mse_loss(m(x), y).backward()
        # the contribution of this micro-batch alone
        mm = copy.deepcopy(m)
        for p in mm.parameters():
            p.grad = None
        F.mse_loss(mm(x), y).backward()
        ref_grads = [a + p.grad for a, p in zip(ref_grads, mm.parameters())]
        for p, g in zip(m.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
        opt.step()
        after = params_of(m)
        changed = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert changed == ((i + 1) % K == 0), f"micro-batch {i}: params changed={changed}"


def test_zero_grad_set_to_none_false():
    """zero_grad(set_to_none=False) zeroes in place (as SGD) -- only at a boundary."""
    K = 2
    m = make_mlp(seed=2)
    opt = AccumOptimizer(m.parameters(), lr=0.1, accumulation_steps=K)
    x, y = make_batches("mlp", 1, seed=4)[0]
    F.mse_loss(m(x), y).backward()
    g0 = [p.grad.clone() for p in m.parameters()]
    opt.step()  # micro-batch 0 of 2: not a boundary
    opt.zero_grad(set_to_none=False)
    for p, g in zip(m.parameters(), g0):
        assert torch.equal(p.grad, g), "zero_grad inside a window must not clear grads"
    F.mse_loss(m(x), y).backward()
    opt.step()  # boundary
    grads = [p.grad for p in m.parameters()]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(m.parameters(), grads):
        assert p.grad is g  # same tensor object, zeroed in place
        assert torch.count_nonzero(p.grad) == 0


def test_step_with_closure():
    """step(closure) evaluates the closure on every call and returns its loss."""
    kw = dict(lr=0.05, momentum=0.9)
    m = make_mlp(seed=6)
    r = copy.deepcopy(m)
    ours = AccumOptimizer(m.parameters(), **kw)
    ref = torch.optim.SGD(r.parameters(), foreach=False, **kw)
    for x, y in make_batches("mlp", 20, seed=1):

        def closure(mod=m, o=ours):
            o.zero_grad()
            loss = F.mse_loss(mod(x), y)
            loss.backward()
            return loss

        def rclosure(mod=r, o=ref):
            o.zero_grad()
            loss = F.mse_loss(mod(x), y)
            loss.backward()
            return loss

        a = ours.step(closure)
        b = ref.step(rclosure)
        assert isinstance(a, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert_params_close(m.parameters(), r.parameters())


@pytest.mark.parametrize("K", [1, 4])
def test_float64_parity(K):
    """fp64 params: the kernels compute in double; agreement must be near fp64 eps
    (rtol 1e-12 leaves room only for a different but correctly rounded operation
    order, e.g. fused multiply-add, over 100 updates)."""
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    m = make_mlp(seed=2, dtype=torch.float64)
    r = copy.deepcopy(m)
    batches = make_batches("mlp", K * N_UPDATES, seed=5, dtype=torch.float64)
    run_ours(m, batches, K, opt_kwargs=kw)
    run_ref(r, batches, K, opt_kwargs=kw)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert_params_close(m.parameters(), r.parameters(), rtol=1e-12, atol=1e-13)


# Half precision ----------------------------------------------------------------
#
# The rule (AccumOptimizer docstring: "fp16/bf16 tensors: math in fp32"): the
# parameter and the momentum buffer are stored in the half type, everything in
# between is float32.


def _emulate_half_step(p, b, gsum, *, first, K, lr, wd, momentum, dampening, nesterov, maximize):
    """Reference for one update of half params: float32 math, half storage."""
    g = gsum.float() * (1.0 / K) if K != 1 else gsum.float()
    if maximize:
        g = -g
    pf = p.float()
    if wd:
        g = g + wd * pf
    if momentum:
        if first:
            bf = g
        else:
            bf = momentum * b.float() + (1 - dampening) * g
        g = g + momentum * bf if nesterov else bf
        b = bf.to(p.dtype)
    return (pf - lr * g).to(p.dtype), b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False),
        dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=True),
        dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    ],
    ids=["momentum-dampening-wd", "nesterov-maximize", "plain"],
)
def test_half_params_float32_math(dtype, kw):
    """100 updates (K=2) of half params on synthetic grads vs a float32-math,
    half-storage emulation. Sizes straddle the SIMD width (1, 7, 33, 100).

    Tolerance: the only legitimate difference is the rounding of intermediate
    float32 results (e.g. a fused multiply-add), which can flip the final
    rounding to the half type by one unit in the last place; such flips
    propagate through the momentum buffer but are not amplified (lr*|g| << |p|),
    so 2 ulp of the half type (fp16 2*2^-10, bf16 2*2^-7 relative) bounds it.
    Doing the arithmetic in the half type instead (as torch's default path does)
    is off by far more than this (see the last assertion).
    """
    K = 2
    gen = torch.Generator().manual_seed(3)
    shapes = [(1,), (7,), (3, 11), (100,)]
    params = [torch.nn.Parameter((torch.rand(s, generator=gen) + 0.5).to(dtype)) for s in shapes]
    emu_p = [p.detach().clone() for p in params]
    emu_b = [None] * len(params)
    opt = AccumOptimizer(params, accumulation_steps=K, **kw)
    for step in range(100):
        micro = [[(torch.randn(s, generator=gen) * 0.5).to(dtype) for s in shapes] for _ in range(K)]
        for gs in micro:
            opt.zero_grad()
            for p, g in zip(params, gs):
                # autograd accumulation: .grad += g in the param dtype
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad += g
            opt.step()
        for i in range(len(params)):
            gsum = micro[0][i].clone()
            for gs in micro[1:]:
                gsum += gs[i]
            emu_p[i], emu_b[i] = _emulate_half_step(
                emu_p[i], emu_b[i], gsum, first=(step == 0), K=K,
                lr=kw["lr"], wd=kw["weight_decay"], momentum=kw["momentum"],
                dampening=kw["dampening"], nesterov=kw["nesterov"], maximize=kw["maximize"],
            )
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    for p, e in zip(params, emu_p):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach().float(), e.float(), rtol=2 * ulp, atol=1e-6)
    if kw["momentum"]:
        for p, b in zip(params, emu_b):
            buf = opt.state[p]["momentum_buffer"]
            assert buf.dtype == dtype
            torch.testing.assert_close(buf.float(), b.float(), rtol=2 * ulp, atol=2 * ulp * b.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_vs_fp32_reference(dtype):
    """A half-precision MLP trained with AccumOptimizer (K=4, 100 updates) stays
    close to the same model trained in fp32 with SGD.

    Tolerance: parameters here are |p| < 1, where one ulp is 2^-11 (fp16) or 2^-8
    (bf16); 100 roundings of the stored parameter random-walk to ~5 ulp, and the
    half-precision forward/backward perturbs every gradient by a few ulp as well.
    Measured: fp16 ~7e-4, bf16 ~7e-3 max abs deviation; we allow 5e-3 / 4e-2.
    And since ours does the update in float32, it must be no worse (up to a 1.5x
    slack) than torch's default SGD path run directly on the half model.
    """
    K = 4
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    m32 = make_mlp(seed=0)
    m_half = copy.deepcopy(m32).to(dtype)
    m_torch_half = copy.deepcopy(m_half)
    b32 = make_batches("mlp", K * N_UPDATES, seed=1)
    b_half = [(x.to(dtype), y.to(dtype)) for x, y in b32]
    run_ref(m32, b32, K, opt_kwargs=kw)
    run_ours(m_half, b_half, K, opt_kwargs=kw)
    run_ref(m_torch_half, b_half, K, opt_kwargs=kw)

    def err(m):
        return max((p.detach().float() - q.detach()).abs().max().item() for p, q in zip(m.parameters(), m32.parameters()))

    tol = 5e-3 if dtype == torch.float16 else 4e-2
    assert all(p.dtype == dtype for p in m_half.parameters())
    assert err(m_half) < tol, err(m_half)
    assert err(m_half) <= 1.5 * err(m_torch_half) + 1e-4, (err(m_half), err(m_torch_half))


def test_mixed_dtypes_in_one_group():
    """fp32, fp64 and bf16 params in one group (one fused launch per dtype)."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float64]
    ps = [torch.nn.Parameter(torch.randn(9, generator=gen).to(dt)) for dt in dtypes]
    rs = [torch.nn.Parameter(p.detach().clone().double()) for p in ps]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt = AccumOptimizer(ps, **kw)
    ref = torch.optim.SGD(rs, foreach=False, **kw)
    for _ in range(50):
        gs = [torch.randn(9, generator=gen) for _ in ps]
        for p, r, g in zip(ps, rs, gs):
            p.grad = g.to(p.dtype)
            r.grad = g.to(p.dtype).double()
        opt.step()
        ref.step()
    for p, r in zip(ps, rs):
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[p.dtype]
        torch.testing.assert_close(p.detach().double(), r.detach(), rtol=tol, atol=tol)

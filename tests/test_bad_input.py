"""Bad input: a clear Python exception, raised before anything changes.

The rule: a Python exception naming the parameter and the problem, with
parameters and state untouched, for a grad dtype/shape/device differing from
its parameter, a non-leaf or duplicated parameter (SGD's errors), SGD's
hyper-parameter checks, accumulation_steps an int >= 1, differentiable=True,
and a tensor on a device the extension has no kernels for.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from _helpers import HAS_CUDA, assert_params_close, make_batches, make_mlp, run_ours, run_ref
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")

KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    sd = copy.deepcopy(opt.state_dict())
    return params, sd


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    assert_params_close(model.parameters(), params, rtol=0, atol=0, msg="params changed by a failing step:")
    now = opt.state_dict()
    assert now.get("accumulation") == sd.get("accumulation"), "micro-batch counter changed by a failing step"
    assert sorted(now["state"]) == sorted(sd["state"]), "state keys changed by a failing step"
    for idx, s in sd["state"].items():
        assert set(now["state"][idx]) == set(s)
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(now["state"][idx][k], v), f"state[{idx}][{k}] changed by a failing step"
            else:
                assert now["state"][idx][k] == v
    assert now["param_groups"] == sd["param_groups"]


def _two_group_setup(K=2, scaler=None):
    """A trained 2-group optimizer (momentum state exists for every param) that is
    positioned right before a boundary step, with the window's grads in place.
    The bad grad goes on the LAST param of the SECOND group, so an
    implementation that validated lazily would already have updated group 0."""
    m = make_mlp(seed=1)
    params = list(m.parameters())
    opt = AccumOptimizer(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "nesterov": True, "dampening": 0.0}],
        accumulation_steps=K,
        **KW,
    )
    batches = make_batches("mlp", 3 * K, seed=2)
    run_ours(m, batches[: 2 * K], K, opt=opt, scaler=scaler)
    # fill the next window up to (not including) its boundary step
    run_ours(m, batches[2 * K : 3 * K - 1], K, opt=opt, scaler=scaler, start=2 * K)
    opt.zero_grad()
    x, y = batches[-1]
    loss = F.mse_loss(m(x), y)
    (scaler.scale(loss) if scaler else loss).backward()
    assert opt.is_accumulation_boundary
    return m, opt


BAD_GRADS = {
    "dtype": (lambda g: g.double(), r"dtype|float64"),
    "shape": (lambda g: torch.randn(g.numel() + 1), r"shape|size"),
    "shape-same-numel": (lambda g: torch.randn(g.shape[::-1] if g.dim() > 1 else (1, g.numel())), r"shape|size"),
}


@pytest.mark.parametrize("what", list(BAD_GRADS))
def test_bad_grad_raises_before_any_change(what):
    make_bad, pattern = BAD_GRADS[what]
    m, opt = _two_group_setup()
    last = list(m.parameters())[-1]
    good = last.grad.clone()
    last.grad.data = make_bad(last.grad)  # .grad = ... would be refused by autograd itself
    snap = _snapshot(m, opt)
    with pytest.raises((RuntimeError, ValueError), match=re.compile(pattern, re.I)) as info:
        opt.step()
    # names the parameter
    assert re.search(r"param", str(info.value), re.I), str(info.value)
    _assert_unchanged(m, opt, snap)
    assert opt.is_accumulation_boundary

    # fixing the grad and retrying performs the boundary update once
    last.grad = good
    opt.step()
    assert not opt.is_accumulation_boundary
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), snap[0]))


@pytest.mark.parametrize("what", ["dtype", "shape"])
def test_bad_grad_with_scaler_raises_before_any_change(what):
    make_bad, pattern = BAD_GRADS[what]
    scaler = GradScaler("cpu", init_scale=2.0**8)
    m, opt = _two_group_setup(scaler=scaler)
    last = list(m.parameters())[-1]
    last.grad.data = make_bad(last.grad)
    snap = _snapshot(m, opt)
    scale = scaler.get_scale()
    with pytest.raises((RuntimeError, ValueError), match=re.compile(pattern, re.I)):
        scaler.step(opt)
    _assert_unchanged(m, opt, snap)
    assert scaler.get_scale() == scale


@pytest.mark.skipif(not HAS_CUDA, reason="grad/param device mismatch needs a CUDA device (CPU-only machine)")
def test_bad_grad_device_raises_before_any_change():
    m, opt = _two_group_setup()
    last = list(m.parameters())[-1]
    last.grad.data = last.grad.cuda()
    snap = _snapshot(m, opt)
    with pytest.raises((RuntimeError, ValueError), match=re.compile(r"device|cuda", re.I)):
        opt.step()
    _assert_unchanged(m, opt, snap)


def test_device_without_kernels_raises_clearly(monkeypatch):
    """Parameters on a device the extension has no kernels for (simulated: the
    kernel lookup says no for every device; a CUDA tensor on a CPU-only build
    takes the same path): a clear RuntimeError naming the device, and no state
    is created."""
    from torch_fastaccum import _ops

    monkeypatch.setattr(_ops, "has_kernel_for", lambda device_type: False)
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    before = p.detach().clone()
    opt = AccumOptimizer([p], lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\].* on cpu;.*support CPU, CUDA and meta"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())
    assert opt.state_dict()["state"] == {}


@pytest.mark.skipif(not HAS_CUDA, reason="a CUDA tensor needs a CUDA device (CPU-only machine)")
@pytest.mark.skipif(
    torch._C._dispatch_has_kernel_for_dispatch_key("fastaccum::fused_sgd_", "CUDA"),
    reason="the extension was built with CUDA kernels",
)
def test_cuda_tensor_on_cpu_only_build_raises_clearly():
    p = torch.nn.Parameter(torch.randn(5, device="cuda"))
    p.grad = torch.randn(5, device="cuda")
    before = p.detach().clone()
    opt = AccumOptimizer([p], lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match=re.compile(r"cuda", re.I)):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_non_leaf_param_same_error_as_sgd():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError) as sgd_err:
        torch.optim.SGD([x * 2], lr=0.1)
    with pytest.raises(ValueError) as ours_err:
        AccumOptimizer([x * 2], lr=0.1)
    assert str(ours_err.value) == str(sgd_err.value)
    assert "leaf" in str(ours_err.value)


def test_duplicated_params_across_groups_same_error_as_sgd():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError) as sgd_err:
        torch.optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError) as ours_err:
        AccumOptimizer([{"params": [p]}, {"params": [p]}], lr=0.1)
    assert str(ours_err.value) == str(sgd_err.value)


def test_duplicated_params_in_group_same_warning_as_sgd():
    p = torch.nn.Parameter(torch.randn(3))

    def caught(ctor):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ctor([p, p], lr=0.1)
        return [str(x.message) for x in w if "duplicate" in str(x.message)]

    sgd_w = caught(torch.optim.SGD)
    assert sgd_w, "premise: torch warns about duplicate parameters"
    assert caught(AccumOptimizer) == sgd_w


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(lr=-0.1), "learning rate"),
        (dict(lr=torch.tensor(-0.1)), "learning rate"),
        (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
        (dict(lr=0.1, momentum=-0.5), "momentum"),
        (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
        (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
        (dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    ],
    ids=["neg-lr", "neg-tensor-lr", "2-elem-lr", "neg-momentum", "neg-wd", "nesterov-dampening", "nesterov-no-momentum"],
)
def test_hyperparameter_validation_like_sgd(kwargs, word):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError) as sgd_err:
        torch.optim.SGD([p], **kwargs)
    with pytest.raises(ValueError) as ours_err:
        AccumOptimizer([p], **kwargs)
    assert word.lower() in str(ours_err.value).lower()
    # "same wording style": torch's message is contained in ours
    assert str(sgd_err.value) in str(ours_err.value)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, False, "2", None, 2.0])
def test_accumulation_steps_validation(k):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="accumulation_steps"):
        AccumOptimizer([p], lr=0.1, accumulation_steps=k)


def test_differentiable_true_raises():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match="differentiable"):
        AccumOptimizer([p], lr=0.1, differentiable=True)


def test_bad_hyperparameters_in_add_param_group():
    """A bad group is refused and the optimizer keeps its groups."""
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3))
    opt = AccumOptimizer([p], lr=0.1, momentum=0.9)
    for bad in (dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0), dict(nesterov=True, dampening=0.5)):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [q], **bad})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [q], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0.9


def test_no_grads_at_all_is_fine():
    """Not bad input: a boundary step where no param has a grad does nothing (as SGD)."""
    m = make_mlp(seed=0)
    before = [p.detach().clone() for p in m.parameters()]
    opt = AccumOptimizer(m.parameters(), lr=0.1, momentum=0.9, accumulation_steps=2)
    opt.step()
    opt.step()
    assert_params_close(m.parameters(), before, rtol=0, atol=0)
    assert opt.state_dict()["state"] == {}

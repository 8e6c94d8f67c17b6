"""PyTorch's generic optimizer suite for SGD, run against AccumOptimizer.

AccumOptimizer is a drop-in for ``torch.optim.SGD`` (its docstring, and the
README's Usage section), and torch's own optimizer test suite for SGD (the
OptimizerInfo tests in PyTorch's test/test_optim.py) is the bar a drop-in must
pass. This module re-implements, for pytest, every
check of ``TestOptimRenewed`` (pytorch/pytorch test/test_optim.py) that applies to
SGD, driven by the SGD entry of the installed
``torch.testing._internal.common_optimizers.optim_db``:

* its ``optim_inputs_func(device="cpu")`` configurations (tensor lr included),
  expanded like torch's ``_get_optim_inputs_including_global_cliquey_kwargs``
  (every config plain, ``& fused`` and ``& differentiable``); torch only adds
  ``& foreach`` on devices with foreach kernels, so on CPU it is added here
  (AccumOptimizer accepts and ignores ``foreach`` everywhere);
* its ``optim_error_inputs_func`` error cases;
* its ``scheduler_inputs`` and ``metadata_for_sparse``.

Where torch compares two implementations (forloop vs foreach / fused, the
multi-device test), the reference is ``torch.optim.SGD`` on its single-tensor
path and the implementation under test is AccumOptimizer. Where torch compares
an optimizer with itself (complex vs real, tensor vs float lr, state_dict
load), AccumOptimizer is compared with itself, as torch does.

Deliberate deviation (AccumOptimizer docstring, ``differentiable``):
``differentiable=True`` raises ValueError, so the ``& differentiable``
configurations are skipped with a visible reason and
``test_differentiable_true_raises`` checks the error instead.
Tests that torch runs only on CUDA (or on several GPUs) are kept, and skipped
visibly where no such device is present.

The section at the end ("extensions") holds checks that are not in
TestOptimRenewed but that the drop-in contract names (pickling, zero_grad,
hook counts, mixed dtypes on CPU, non-contiguous and empty parameters, sparse
gradients with every SGD option, scheduler parity, loading old / SGD state).
"""

from __future__ import annotations

import copy
import functools
import pickle
import tempfile

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
# torch's test helpers need expecttest (and numpy); the GPU machines have no
# network to install them, `make test` (and CI) does.
pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's test helpers need expecttest and numpy (make test installs them)",
)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from torch_fastaccum import AccumOptimizer

DEVICE = "cpu"
SGD_INFO = next(info for info in optim_db if info.optim_cls is SGD)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="torch runs this test only on CUDA; no CUDA device here")
requires_multigpu = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2,
    reason="torch runs this test only with >= 2 CUDA devices; fewer here",
)
DIFFERENTIABLE_REASON = (
    "documented deviation (AccumOptimizer docstring): AccumOptimizer rejects differentiable=True "
    "(its fused kernels update in place outside autograd); test_differentiable_true_raises checks the error"
)


def _has_large_cuda(nbytes: int) -> bool:
    return HAS_CUDA and torch.cuda.get_device_properties(0).total_memory >= nbytes


# ----------------------------------------------------------------------------
# configurations from the OptimizerInfo
# ----------------------------------------------------------------------------


def configs(skip=()) -> list[tuple[str, dict]]:
    """(desc, kwargs) for every SGD configuration torch's suite would run on
    this device, fresh on every call (a tensor lr is mutated by schedulers)."""
    out = []
    for oi in _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, SGD_INFO, skip=skip):
        out.append((oi.desc, oi.kwargs))
        if "foreach" not in skip and " & " not in oi.desc:
            kw = copy.deepcopy(oi.kwargs)
            kw["foreach"] = True
            out.append((f"{oi.desc} & foreach", kw))
    return out


def base_configs() -> list[tuple[str, dict]]:
    """optim_info.optim_inputs_func(device) as is (no cliquey flags)."""
    return [(oi.desc, oi.kwargs) for oi in SGD_INFO.optim_inputs_func(device=DEVICE)]


def _id(desc: str) -> str:
    return desc.replace(" & ", "+").replace(" ", "_").replace("/", "")


def config_params(skip=()):
    params = []
    for desc, kw in configs(skip):
        marks = [pytest.mark.skip(reason=DIFFERENTIABLE_REASON)] if kw.get("differentiable") else []
        params.append(pytest.param(desc, id=_id(desc), marks=marks))
    return params


def get_config(desc: str, skip=()) -> dict:
    for d, kw in configs(skip):
        if d == desc:
            return kw
    raise KeyError(desc)


def base_config_params():
    return [pytest.param(desc, id=_id(desc)) for desc, _ in base_configs()]


def get_base_config(desc: str) -> dict:
    return dict(base_configs())[desc]


def reference_kwargs(kwargs: dict) -> dict:
    """The same SGD configuration on torch's single-tensor (forloop) path."""
    kw = copy.deepcopy(kwargs)
    kw["foreach"] = False
    kw["fused"] = False
    kw["differentiable"] = False
    return kw


# ----------------------------------------------------------------------------
# comparison helpers (TestCase.assertEqual semantics for what these tests use)
# ----------------------------------------------------------------------------


def assert_equal(actual, expected, *, rtol=None, atol=None, path="value"):
    if isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
            actual_t = torch.as_tensor(actual)
            expected_t = torch.as_tensor(expected)
            torch.testing.assert_close(
                actual_t, expected_t, rtol=rtol, atol=atol, check_dtype=False, msg=lambda m: f"{path}: {m}"
            )
            return
        if (
            actual.layout == expected.layout == torch.strided
            and actual.dtype == expected.dtype
            and actual.shape == expected.shape
            and actual.device == expected.device
            and torch.equal(actual, expected)
        ):
            return  # fast path: bitwise equal
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{path}: {m}")
        return
    if isinstance(actual, dict) and isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys differ: {sorted(map(str, actual))} vs {sorted(map(str, expected))}"
        for k in expected:
            assert_equal(actual[k], expected[k], rtol=rtol, atol=atol, path=f"{path}[{k!r}]")
        return
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: lengths differ: {len(actual)} vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal(a, e, rtol=rtol, atol=atol, path=f"{path}[{i}]")
        return
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"


class Tracker:
    """Re-implementation of torch's TensorTracker: queue clones of the
    reference's tensors, then pop each, compare it with the tensor under test
    and copy the reference value in, so error cannot compound across steps."""

    def __init__(self, rtol=None, atol=None):
        self.rtol, self.atol = rtol, atol
        self.tensors = []

    def add(self, t):
        self.tensors.append(t.detach().clone())

    def pop_check_set(self, t, path):
        assert self.tensors, "no tensors to pop"
        ref = self.tensors.pop(0)
        assert_equal(t, ref, rtol=self.rtol, atol=self.atol, path=path)
        with torch.no_grad():
            t.copy_(ref)

    def all_popped(self):
        return not self.tensors


def rosenbrock(t):
    assert t.size() == torch.Size([2])
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def drosenbrock(t):
    assert t.size() == torch.Size([2])
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


def _step_schedulers(schedulers, loss):
    for s in schedulers:
        if isinstance(s, ReduceLROnPlateau):
            s.step(loss)
        else:
            s.step()


# ============================================================================
# TestOptimRenewed ports
# ============================================================================


def _error_inputs():
    return SGD_INFO.optim_error_inputs_func(device=DEVICE, dtype=torch.float32)


@pytest.mark.parametrize("idx", range(len(_error_inputs())), ids=[_id(e.optimizer_error_input.desc) for e in _error_inputs()])
def test_errors(idx):
    """test_errors: every SGD error input raises / warns the same way."""
    err = _error_inputs()[idx]
    oi = err.optimizer_error_input
    params, kwargs = oi.params, oi.kwargs
    if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                AccumOptimizer(params, **kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                AccumOptimizer(params, **kwargs)
    elif err.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt = AccumOptimizer(params, **kwargs)
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                opt.step()
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                opt.step()
    else:
        raise NotImplementedError(err.error_on)


@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "lrsched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("desc", base_config_params())
def test_forloop_goes_right_direction(desc, contiguous, with_lrsched):
    """test_forloop_goes_right_direction: 20 steps lower (maximize: raise) the
    loss, for contiguous and strided params, with and without SGD's schedulers."""
    sched_lists = SGD_INFO.scheduler_inputs if with_lrsched else [None]
    for sched_list in sched_lists:
        kwargs = get_base_config(desc)  # fresh: schedulers mutate a tensor lr
        kwargs["foreach"] = False
        if contiguous:
            weight = Parameter(torch.randn(10, 5))
            bias = Parameter(torch.randn(10))
        else:
            weight = Parameter(torch.randn(10, 5, 2)[..., 0])
            bias = Parameter(torch.randn(10, 2)[..., 0])
        inp = torch.randn(5)
        opt = AccumOptimizer([weight, bias], **kwargs)
        schedulers = [s(opt) for s in (sched_list or [])]

        def closure():
            opt.zero_grad()
            loss = (weight.mv(inp) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = closure()
            opt.step()
            _step_schedulers(schedulers, loss)
        final = closure().item()
        if kwargs.get("maximize", False):
            assert final > initial, (sched_list, final, initial)
        else:
            assert final < initial, (sched_list, final, initial)


@requires_multigpu
@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "lrsched"])
def test_forloop_goes_right_direction_multigpu(with_lrsched):
    """test_forloop_goes_right_direction_multigpu: weight on cuda:0, bias on cuda:1."""
    sched_lists = SGD_INFO.scheduler_inputs if with_lrsched else [None]
    for sched_list in sched_lists:
        for oi in SGD_INFO.optim_inputs_func(device="cuda"):
            kwargs = oi.kwargs
            kwargs["foreach"] = False
            weight = Parameter(torch.randn(10, 5, device="cuda:0"))
            bias = Parameter(torch.randn(10, device="cuda:1"))
            inp = torch.randn(5, device="cuda:0")
            opt = AccumOptimizer([weight, bias], **kwargs)
            schedulers = [s(opt) for s in (sched_list or [])]

            def closure():
                opt.zero_grad()
                loss = (weight.mv(inp).cuda(1) + bias).pow(2).sum()
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                loss = opt.step(closure)
                _step_schedulers(schedulers, loss)
            final = closure().item()
            assert (final > initial) if kwargs.get("maximize", False) else (final < initial)


@pytest.mark.parametrize("sched_idx", range(len(SGD_INFO.scheduler_inputs)))
def test_param_group_with_lrscheduler_goes_right_direction(sched_idx):
    """test_param_group_with_lrscheduler_goes_right_direction: two groups (one
    with its own lr) driven by each of SGD's scheduler combinations; the loss
    returned by step(closure) feeds ReduceLROnPlateau."""
    weight = Parameter(torch.randn(10, 5))
    bias = Parameter(torch.randn(10))
    inp = torch.randn(5)
    opt = AccumOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
    schedulers = [s(opt) for s in SGD_INFO.scheduler_inputs[sched_idx]]

    def closure():
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        _step_schedulers(schedulers, loss)
    assert closure().item() < initial


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_tensor_lr(desc):
    """test_tensor_lr: lr=torch.tensor(1e-3) gives the same parameters as lr=1e-3.

    torch's version calls only the closure (never step) for optimizers that do
    not require one, so it cannot fail for SGD; this port steps both optimizers,
    which is what the test means to check."""
    kwargs = get_config(desc, skip=("differentiable",))
    weight = Parameter(torch.randn(10, 5))
    weight_c = weight.detach().clone().requires_grad_(True)
    bias = Parameter(torch.randn(10))
    bias_c = bias.detach().clone().requires_grad_(True)
    inp = torch.randn(5)
    kwargs.pop("lr", None)
    kwargs["lr"] = 1e-3
    opt_r = AccumOptimizer([weight, bias], **kwargs)
    kwargs["lr"] = torch.tensor(kwargs["lr"])
    opt = AccumOptimizer([weight_c, bias_c], **kwargs)

    def closure(o, w, b):
        o.zero_grad()
        loss = (w.mv(inp) + b).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        closure(opt_r, weight, bias)
        closure(opt, weight_c, bias_c)
        opt_r.step()
        opt.step()
        assert_equal(weight, weight_c, path="weight")
        assert_equal(bias, bias_c, path="bias")


def _sparse_inputs():
    """torch's test_rosenbrock_sparse config selection (skip differentiable and
    fused; drop the keys metadata_for_sparse overrides; de-duplicate; non-empty)."""
    kwarg_updates, _ = SGD_INFO.metadata_for_sparse
    out, seen = [], set()
    for desc, kw in configs(skip=("differentiable", "fused")):
        for k in kwarg_updates:
            kw.pop(k, None)
        key = tuple(sorted(kw.items()))
        if kw and key not in seen:
            seen.add(key)
            if "lr" in kwarg_updates:
                kw["lr"] = kwarg_updates["lr"]
            out.append(kw)
    return out


@pytest.fixture
def _one_thread():
    """dense.add_(sparse) on a 2-element tensor costs ~8 ms with 2 intra-op
    threads on this CPU (torch's own op; 1.6 us with one thread). Per-element
    results do not depend on the thread count; this only keeps the 1800-step
    Rosenbrock runs inside the time budget."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "lrsched"])
@pytest.mark.parametrize(
    "idx",
    range(len(_sparse_inputs())),
    ids=[",".join(f"{k}={v}" for k, v in sorted(kw.items())) for kw in _sparse_inputs()],
)
def test_rosenbrock_sparse(idx, with_lrsched):
    """test_rosenbrock_sparse: cyclic coordinate descent on Rosenbrock with
    uncoalesced sparse grads equals the same run with dense grads (atol/rtol
    5e-6) at every step, and gets closer to the solution. With foreach the
    optimizer holds a float32 and a float64 parameter."""
    dtype = torch.float64
    kwargs = _sparse_inputs()[idx]
    _, sched_ctors = SGD_INFO.metadata_for_sparse
    multi_tensor = kwargs.get("foreach", False)
    params_t = [torch.tensor([1.5, 1.5]), torch.tensor([1.5, 1.5], dtype=dtype)] if multi_tensor else [torch.tensor([1.5, 1.5])]

    params = [Parameter(t) for t in params_t]
    opt = AccumOptimizer(params, **kwargs)
    scheds = [s(opt) for s in (sched_ctors if with_lrsched else [])]
    params_c = [Parameter(t.clone()) for t in params_t]
    opt_c = AccumOptimizer(params_c, **kwargs)
    scheds_c = [s(opt_c) for s in (sched_ctors if with_lrsched else [])]

    solution = torch.tensor([1, 1])
    with torch.no_grad():
        initial_dist = sum(p.dist(solution) for p in params)

    def get_grad(param, sparse_grad, w):
        grad = drosenbrock(param)
        if sparse_grad:  # torture test: uncoalesced (duplicate index) sparse grad
            if w:
                i = torch.tensor([[0, 0]], dtype=torch.int64)
                x = grad[0]
                v = torch.tensor([x / 4.0, x - x / 4.0])
            else:
                i = torch.tensor([[1, 1]], dtype=torch.int64)
                y = grad[1]
                v = torch.tensor([y - y / 4.0, y / 4.0])
            return torch.sparse_coo_tensor(i, v, (2,), dtype=v.dtype)
        if w:
            return torch.tensor([grad[0], 0], dtype=param.dtype)
        return torch.tensor([0, grad[1]], dtype=param.dtype)

    def eval_(ps, sparse_grad, w):
        opt.zero_grad()
        loss = sum(rosenbrock(p) for p in ps) if multi_tensor else rosenbrock(ps[0])
        loss.backward()
        grads = [get_grad(p, sparse_grad, w) for p in ps]
        with torch.no_grad():
            ps[0].grad = grads[0]
            if multi_tensor:
                ps[1].grad = grads[1].to(dtype=dtype)
        return loss

    for i in range(1800):
        w = i % 2
        opt.step(functools.partial(eval_, params, True, w))
        for s in scheds:
            s.step(rosenbrock(params[0])) if isinstance(s, ReduceLROnPlateau) else s.step()
        opt_c.step(functools.partial(eval_, params_c, False, w))
        for s in scheds_c:
            s.step(rosenbrock(params_c[0])) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert_equal(params, params_c, atol=5e-6, rtol=5e-6, path=f"iteration {i}")

    with torch.no_grad():
        if not kwargs.get("maximize", False):
            assert sum(p.dist(solution) for p in params) <= initial_dist
        else:
            assert sum(rosenbrock(p) for p in params) >= sum(rosenbrock(t) for t in params_t)


@pytest.mark.parametrize("desc", config_params(skip=("differentiable", "fused")))
def test_complex(desc):
    """test_complex: complex params (plus one real one) step exactly like their
    view_as_real copies, at every intermediate step."""
    kwargs = get_config(desc, skip=("differentiable", "fused"))
    dtype = torch.complex64
    complex_params = [
        torch.randn(10, 5, dtype=dtype, requires_grad=True),
        torch.randn(10, dtype=dtype, requires_grad=True),
        torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
    ]
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
    ]
    complex_opt = AccumOptimizer(complex_params, **kwargs)
    real_opt = AccumOptimizer(real_params, **kwargs)
    real_steps, complex_steps, grads_losses = [], [], []

    def real_closure():
        for p in real_params:
            g = torch.randn_like(p)
            p.grad = g
            real_steps.append(p.detach().clone())
            grads_losses.append(g.clone())
        loss = torch.randn(1)
        grads_losses.append(loss.clone())
        return loss

    def complex_closure():
        for p in complex_params:
            if torch.is_complex(p):
                g = torch.view_as_complex(grads_losses.pop(0))
                complex_steps.append(torch.view_as_real_copy(p.detach()))
            else:
                g = grads_losses.pop(0)
                complex_steps.append(p.detach().clone())
            p.grad = g
        return grads_losses.pop(0)

    for _ in range(3):
        real_closure()
        complex_closure()
        real_opt.step()
        complex_opt.step()

    assert_equal(real_params, [torch.view_as_real(p) if p.is_complex() else p for p in complex_params], path="final params")
    assert_equal(complex_steps, real_steps, path="intermediate params")


@pytest.mark.parametrize("desc", config_params(skip=("differentiable", "fused")))
def test_complex_2d(desc):
    """test_complex_2d: a complex 2-vector on rosenbrock(.).abs() steps like
    its real and imaginary parts held as two real params."""
    kwargs = get_config(desc, skip=("differentiable", "fused"))
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    opt1 = AccumOptimizer([a1], **kwargs)
    opt2 = AccumOptimizer([a1_real, a1_imag], **kwargs)
    reals, imags, greals, gimags, losses = Tracker(), Tracker(), Tracker(), Tracker(), Tracker()

    def closure1():
        opt1.zero_grad()
        loss = rosenbrock(a1).abs()
        loss.backward()
        reals.add(a1.real)
        imags.add(a1.imag)
        greals.add(a1.grad.real)
        gimags.add(a1.grad.imag)
        losses.add(loss)
        return loss

    def closure2():
        opt2.zero_grad()
        reals.pop_check_set(a1_real, "a1_real")
        imags.pop_check_set(a1_imag, "a1_imag")
        loss = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
        losses.pop_check_set(loss, "loss")
        loss.backward()
        greals.pop_check_set(a1_real.grad, "a1_real.grad")
        gimags.pop_check_set(a1_imag.grad, "a1_imag.grad")
        return loss

    for _ in range(3):
        closure1()
        closure2()
        opt1.step()
        opt2.step()
        assert_equal(a1.real, a1_real, path="real part")
        assert_equal(a1.imag, a1_imag, path="imag part")
    assert all(t.all_popped() for t in (reals, imags, greals, gimags, losses))


# -- implementation parity (torch: forloop vs foreach / fused) ---------------


def _compare_between(inputs, models, optimizers, rtol=None, atol=None, assert_step_dtype=None):
    """torch's _compare_between: 7 iterations; a layer frozen at iteration 3 and
    unfrozen at 5; no grads at all at iteration 2; params and every state entry
    of the reference (optimizers[0]) compared and re-synchronised each step."""
    if not isinstance(inputs, list):
        inputs = [inputs, inputs]
    tracker = Tracker(rtol, atol)
    step_dtypes = []
    for i in range(7):
        states, updated = [], []
        for inp, model, opt in zip(inputs, models, optimizers):
            opt.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(inp).sum().backward()
            opt.step()
            states.append(opt.state)
            updated.append(list(model.parameters()))
        og_state, new_state = states
        for j, (og_p, new_p) in enumerate(zip(*updated)):
            tracker.add(og_p)
            tracker.pop_check_set(new_p, f"iteration {i} param {j}")
            og_s, new_s = og_state[og_p], new_state[new_p]
            if assert_step_dtype is not None:
                for s in (og_s, new_s):
                    if torch.is_tensor(s.get("step", None)):
                        step_dtypes.append((i, j, s["step"].dtype))
            for k in og_s:
                assert k in new_s, f"iteration {i} param {j}: state key {k!r} missing"
                tracker.add(og_s[k])
                tracker.pop_check_set(new_s[k], f"iteration {i} param {j} state[{k!r}]")
    assert tracker.all_popped()
    return step_dtypes


def _derived_models(dtype, kwargs, flag):
    """torch's _test_derived_optimizers setup: a 2-3-1 sigmoid MLP plus a
    0-dim parameter as the last param; reference = SGD forloop, tested =
    AccumOptimizer with `flag`=True."""
    models, opts = [], []
    inp = None
    for cls, kw in ((SGD, {**reference_kwargs(kwargs)}), (AccumOptimizer, {**kwargs, flag: True})):
        inp = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).to(dtype=dtype)
        empty_param = torch.empty((), dtype=dtype, requires_grad=True)
        empty_param.grad = torch.rand_like(empty_param)
        opts.append(cls(list(model.parameters()) + [empty_param], **kw))
        models.append(model)
    return inp, models, opts


@pytest.mark.parametrize("desc", base_config_params())
def test_foreach_matches_forloop(desc):
    """test_foreach_matches_forloop (float64): AccumOptimizer(foreach=True)
    matches torch.optim.SGD(foreach=False), params and momentum buffers."""
    kwargs = get_base_config(desc)
    inp, models, opts = _derived_models(torch.float64, kwargs, "foreach")
    _compare_between(inp, models, opts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("desc", base_config_params())
def test_fused_matches_forloop(desc, dtype):
    """test_fused_matches_forloop (CPU is in SGD's supports_fused_on; float64,
    float32, bfloat16, float16): AccumOptimizer(fused=True) matches
    torch.optim.SGD(fused=False) with torch's default tolerances per dtype."""
    kwargs = get_base_config(desc)
    inp, models, opts = _derived_models(dtype, kwargs, "fused")
    _compare_between(inp, models, opts)


def _set_default_dtype_run(desc, default_dtype):
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(default_dtype)
        kwargs = get_base_config(desc)
        inp, models, opts = _derived_models(torch.float64, kwargs, "foreach")
        tol = dict(atol=1e-5, rtol=1e-4) if default_dtype == torch.float16 else {}
        expected_step = torch.float64 if default_dtype == torch.float64 else torch.float32
        return _compare_between(inp, models, opts, assert_step_dtype=expected_step, **tol), expected_step
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("desc", base_config_params())
def test_set_default_dtype_works_with_foreach(desc, default_dtype):
    """test_set_default_dtype_works_with_foreach (torch: CUDA only; run on CPU
    here): with torch.set_default_dtype(float64 / float16) the float64 model
    still matches SGD forloop."""
    _set_default_dtype_run(desc, default_dtype)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("desc", base_config_params())
def test_set_default_dtype_step_dtype(desc, default_dtype):
    """The assert_step_dtype part of test_set_default_dtype_works_with_foreach:
    any tensor state['step'] is float64 under default dtype float64, float32
    otherwise (torch's _get_scalar_dtype convention)."""
    seen, expected = _set_default_dtype_run(desc, default_dtype)
    wrong = [(i, j, d) for i, j, d in seen if d != expected]
    assert not wrong, (
        f"state['step'] dtype should be {expected} under default dtype {default_dtype}; got "
        f"(iteration, param, dtype) {wrong[:3]}"
    )


@requires_multigpu
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_mixed_device_dtype(impl):
    """test_mixed_device_dtype: float64/32/16/bf16 params on cuda:0 and cuda:1."""
    params = [
        torch.rand(2, 3, dtype=dt, device=dev, requires_grad=True)
        for dev in ("cuda:0", "cuda:1")
        for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    ]
    _mixed_dtype_check(params, impl)


def _mixed_dtype_check(params, impl, configs_=None):
    for p in params:
        p.grad = torch.rand_like(p)
    iters = 7 if impl == "foreach" else 1
    for desc, kwargs in configs_ or base_configs():
        results = []
        for cls, kw in ((SGD, reference_kwargs(kwargs)), (AccumOptimizer, {**kwargs, impl: True})):
            clones = []
            for p in params:
                c = p.detach().clone().requires_grad_(True)
                c.grad = p.grad.detach().clone()
                clones.append(c)
            opt = cls(clones, **kw)
            for _ in range(iters):
                opt.step()
            results.append((opt.state, clones))
        (og_state, og_ps), (new_state, new_ps) = results
        for j, (og_p, new_p) in enumerate(zip(og_ps, new_ps)):
            rtol, atol = torch.testing._comparison.get_tolerances(new_p.dtype, rtol=None, atol=None)
            rtol, atol = 5 * rtol, 5 * atol
            assert_equal(new_p, og_p, rtol=rtol, atol=atol, path=f"{desc}: param {j} ({og_p.dtype})")
            for k in og_state[og_p]:
                assert_equal(new_state[new_p][k], og_state[og_p][k], rtol=rtol, atol=atol, path=f"{desc}: param {j} state[{k!r}]")


@pytest.mark.skipif(
    not _has_large_cuda(72 * 2**30),
    reason="torch's largeTensorTest: needs one CUDA device with >= 72 GB (64 GB for the fused variant)",
)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_large_tensor(impl):
    """test_foreach_large_tensor / test_fused_large_tensor: a 2**32-element
    float16 param (index arithmetic past 2**31) steps without error."""
    for oi in SGD_INFO.optim_inputs_func(device="cuda"):
        p = torch.ones(2**32, device="cuda", dtype=torch.float16)
        p.grad = torch.zeros_like(p)
        AccumOptimizer([p], **{impl: True}, **oi.kwargs).step()
        del p


@requires_cuda
def test_peak_memory_foreach():
    """test_peak_memory_foreach: a step's peak memory is at most SGD forloop's
    plus one intermediate of the parameters' size."""
    nparams = 10
    for _, kwargs in [(o.desc, o.kwargs) for o in SGD_INFO.optim_inputs_func(device="cuda")]:
        max_mems = []
        for cls, kw in ((SGD, {**kwargs, "foreach": False}), (AccumOptimizer, {**kwargs, "foreach": True})):
            param = torch.rand(16, 8, device="cuda")
            params = [torch.rand_like(param) for _ in range(nparams)]
            opt = cls(params, **kw)
            for p in params:
                p.grad = torch.rand_like(p)
            opt.step()
            import gc

            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            gc.collect()
            max_mems.append(torch.cuda.max_memory_allocated())
        st, mt = max_mems
        assert mt <= st + nparams * param.nelement() * param.element_size()


def test_fused_error_on_params_on_meta():
    """test_fused_error_on_params_on_meta, adapted: torch's fused=True raises
    on meta parameters; AccumOptimizer (fused=True is ignored) takes the
    shape-only step that SGD's default path takes, and after
    to_empty(device='cpu') it steps for real."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    opt = AccumOptimizer(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    opt.step()
    assert all(p.is_meta for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    model.to_empty(device=DEVICE)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()
    # to_empty made new parameter objects: the optimizer still holds (and
    # steps, shape-only) the meta ones, as torch.optim.SGD would.
    assert all(p.is_meta for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_fused_does_not_step_if_foundinf(device):
    """test_fused_does_not_step_if_foundinf (torch: CUDA only; AccumOptimizer's
    fused path also runs on CPU): with found_inf=1 (and grad_scale ones or None)
    params do not move and a tensor state['step'] stays 0."""
    for desc, kwargs in [(o.desc, o.kwargs) for o in SGD_INFO.optim_inputs_func(device=device)]:
        for no_grad_scale in (False, True):
            params = [torch.ones((1,), device=device) for _ in range(5)]
            params_c = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.ones_like(p)
            opt = AccumOptimizer(params, fused=True, **kwargs)
            opt.grad_scale = None if no_grad_scale else torch.ones((1,), device=device)
            opt.found_inf = torch.ones((), device=device)
            opt.step()
            for p in params:
                if "step" in opt.state[p]:
                    assert_equal(opt.state[p]["step"], torch.zeros((), device=device), path=f"{desc} step")
            assert_equal(params, params_c, path=desc)


@requires_cuda
@pytest.mark.parametrize("impl", ["fused"])
def test_cpu_load_state_dict(impl):
    """test_cpu_load_state_dict: a CPU state dict flagged fused=True loads into
    a CUDA optimizer and steps (capturable: SGD has none, skipped as in torch)."""
    for _, kwargs in [(o.desc, o.kwargs) for o in SGD_INFO.optim_inputs_func(device="cpu")]:
        param = torch.tensor([0.1, 0.2])
        opt = AccumOptimizer([param], **kwargs)
        param.grad = torch.rand_like(param)
        opt.step()
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0][impl] = True
        kwargs[impl] = True
        param_d = param.detach().clone().cuda()
        opt_d = AccumOptimizer([param_d], **kwargs)
        opt_d.load_state_dict(sd)
        opt_d.zero_grad()
        param_d.grad = torch.rand_like(param_d)
        opt_d.step()


# -- param groups --------------------------------------------------------------


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_param_groups_weight_decay(desc):
    """test_param_groups_weight_decay: weight group with the config, bias group
    with weight_decay=0; the loss moves the right way."""
    kwargs = get_config(desc, skip=("differentiable",))
    bias_kwargs = copy.deepcopy(kwargs)
    bias_kwargs["weight_decay"] = 0.0
    weight = Parameter(torch.randn(10, 5))
    bias = Parameter(torch.randn(10))
    inp = torch.randn(5)
    opt = AccumOptimizer([dict(params=[weight], **kwargs), dict(params=[bias], **bias_kwargs)])
    loss = (weight.mv(inp) + bias).pow(2).sum()
    initial = loss.item()
    for _ in range(20):
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        opt.step()
    if kwargs.get("maximize", False):
        assert loss.item() > initial
    else:
        assert loss.item() < initial


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_param_groups_lr(desc):
    """test_param_groups_lr: a group with the config's lr learns; a group left
    at the optimizer's lr=1e-28 is bit-for-bit unchanged."""
    kwargs = get_config(desc, skip=("differentiable",))
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    weight = Parameter(torch.randn(10, 5))
    bias = Parameter(torch.randn(10))
    irrelevant = Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.clone()
    inp = torch.randn(5)
    opt = AccumOptimizer([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28)
    loss = (weight.mv(inp) + bias).pow(2).sum()
    initial = loss.item()
    for _ in range(20):
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    if kwargs.get("maximize", False):
        assert loss.item() > initial
    else:
        assert loss.item() < initial
    assert_equal(irrelevant, irrelevant_clone, path="irrelevant")


# -- no-op steps -----------------------------------------------------------------


@pytest.mark.parametrize("desc", config_params())
def test_step_is_noop_when_params_have_no_grad(desc):
    """test_step_is_noop_when_params_have_no_grad: params without .grad are
    untouched by step(closure) (torch's current version no longer asserts the
    values; its earlier version did, and so does this port)."""
    kwargs = get_config(desc)
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.detach().clone() for p in params]
    opt = AccumOptimizer(params, **kwargs)
    opt.step(lambda: torch.tensor([1.0]))
    assert_equal(params, old)


@pytest.mark.parametrize("desc", config_params())
def test_step_is_noop_for_zero_grads(desc):
    """test_step_is_noop_for_zero_grads: zero grads leave the param unchanged
    (configs with weight_decay skipped, as in torch)."""
    kwargs = get_config(desc)
    if kwargs.get("weight_decay", 0) != 0:
        pytest.skip("weight decay moves params even with zero grads (skipped in torch too)")
    param = torch.randn(5, 1, requires_grad=True)
    old = param.detach().clone()
    opt = AccumOptimizer([param], **kwargs)
    param.grad = torch.zeros_like(param)
    opt.step(lambda: torch.tensor([1.0]))
    assert_equal(param, old)


@pytest.mark.parametrize("desc", config_params())
def test_optimizer_can_be_printed(desc):
    """test_optimizer_can_be_printed: repr() works (and has Optimizer's layout)."""
    kwargs = get_config(desc)
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = AccumOptimizer(params, **kwargs)
    text = repr(opt)
    assert text.startswith("AccumOptimizer (") and "Parameter Group 0" in text and "lr:" in text, text


# -- state_dict ------------------------------------------------------------------


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(sd):
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop("param_names", None)
    return sd


@pytest.mark.parametrize("is_named1", [True, False], ids=["named1", "unnamed1"])
@pytest.mark.parametrize("is_named0", [True, False], ids=["named0", "unnamed0"])
@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_state_dict_deterministic(desc, is_named0, is_named1):
    """test_state_dict_deterministic: after loading a primed optimizer's state
    into a new one on cloned params, both step identically; their state dicts
    are equal (param_names aside); a repeated group serialises identically."""
    kwargs = get_config(desc, skip=("differentiable",))
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inp = torch.randn(3, requires_grad=True)

    def fwd_bwd(o, w, b):
        o.zero_grad()
        loss = (w.mv(inp) + b).pow(2).sum()
        loss.backward()
        return loss

    opt = AccumOptimizer(_named([weight, bias], is_named0), **kwargs)
    for _ in range(10):
        fwd_bwd(opt, weight, bias)
        opt.step()
    with torch.no_grad():
        weight_c = Parameter(weight.clone())
        bias_c = Parameter(bias.clone())
    opt_c = AccumOptimizer(_named([weight_c, bias_c], is_named1), **kwargs)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        fwd_bwd(opt, weight, bias)
        fwd_bwd(opt_c, weight_c, bias_c)
        opt.step()
        opt_c.step()
        assert_equal(weight, weight_c, path="weight")
        assert_equal(bias, bias_c, path="bias")
    assert_equal(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()), path="state_dict")
    opt_c.param_groups.extend(opt_c.param_groups)
    assert_equal(
        _without_param_names(opt.state_dict())["param_groups"][-1],
        _without_param_names(opt_c.state_dict())["param_groups"][-1],
        path="repeated group",
    )


def _conv_bn_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _fwd_bwd_model(o, model, inp):
    o.zero_grad()
    loss = model(inp).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_can_load_older_state_dict(desc):
    """test_can_load_older_state_dict: a state dict without the flags SGD added
    later (not_og_supported_flags: foreach, differentiable, fused, maximize,
    capturable) loads and the optimizer still steps."""
    kwargs = get_config(desc, skip=("differentiable",))
    model, inp = _conv_bn_model()
    opt = AccumOptimizer(model.parameters(), **kwargs)
    for _ in range(3):
        _fwd_bwd_model(opt, model, inp)
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    for g in old["param_groups"]:
        for flag in SGD_INFO.not_og_supported_flags:
            g.pop(flag, None)
    opt.load_state_dict(old)
    _fwd_bwd_model(opt, model, inp)
    opt.step()


@pytest.mark.parametrize("is_named1", [True, False], ids=["named1", "unnamed1"])
@pytest.mark.parametrize("is_named0", [True, False], ids=["named0", "unnamed0"])
@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_can_load_from_to_named_state_dict(desc, is_named0, is_named1):
    """test_can_load_from_to_named_state_dict: state dicts move between
    optimizers built from parameters() and named_parameters(); param_names are
    kept when either side had them."""
    kwargs = get_config(desc, skip=("differentiable",))
    model, inp = _conv_bn_model()
    opt = AccumOptimizer(model.named_parameters() if is_named0 else model.parameters(), **kwargs)
    for _ in range(3):
        _fwd_bwd_model(opt, model, inp)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = AccumOptimizer(model.named_parameters() if is_named1 else model.parameters(), **kwargs)
    opt2.load_state_dict(sd)
    _fwd_bwd_model(opt2, model, inp)
    opt2.step()
    if is_named0 or is_named1:
        assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("is_named", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_save_load_equality_with_weights_only(desc, is_named):
    """test_save_load_equality_with_weights_only: torch.save then torch.load
    (and torch.load(weights_only=True)) give back an equal state dict."""
    kwargs = get_config(desc, skip=("differentiable",))
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inp = torch.randn(3, requires_grad=True)
    opt = AccumOptimizer(_named([weight, bias], is_named), **kwargs)

    def closure():
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    with tempfile.TemporaryFile() as f:
        torch.save(sd, f)
        f.seek(0)
        assert_equal(torch.load(f, weights_only=False), sd, path="torch.load")
        f.seek(0)
        assert_equal(torch.load(f, weights_only=True), sd, path="torch.load(weights_only=True)")


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_load_nontensor_step(desc):
    """test_load_nontensor_step: a state dict whose tensor 'step' entries were
    turned into Python numbers loads and steps."""
    kwargs = get_config(desc, skip=("differentiable",))
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = AccumOptimizer(params, **kwargs)
    for _ in range(3):
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        if "step" in s and torch.is_tensor(s["step"]):
            s["step"] = s["step"].item()
    opt.load_state_dict(sd)
    opt.step()


@requires_cuda
def test_state_dict_with_cuda_params():
    """test_state_dict_with_cuda_params: a CPU optimizer's state dict loads into
    a CUDA one (unmodified), and both then step identically."""
    for desc, kwargs in configs(skip=("differentiable",)):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = AccumOptimizer(params, **kwargs)
        for _ in range(3):
            opt.step()
        with torch.no_grad():
            params_cuda = [p.to("cuda") for p in params]
            for i, p in enumerate(params_cuda):
                p.grad = params[i].grad.to("cuda")
        opt_cuda = AccumOptimizer(params_cuda, **get_config(desc, skip=("differentiable",)))
        sd_cpu = copy.deepcopy(opt.state_dict())
        sd_cuda = copy.deepcopy(opt.state_dict())
        opt_cuda.load_state_dict(sd_cuda)
        assert_equal(sd_cuda, sd_cpu, path="state dict modified by load")
        for _ in range(5):
            opt.step()
            opt_cuda.step()
            assert_equal(params_cuda, params, path=desc)
            assert_equal(opt_cuda.state_dict(), opt.state_dict(), path=desc)


# -- state_dict / load_state_dict hooks -----------------------------------------


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("desc", config_params())
def test_state_dict_pre_hook(desc):
    """test_state_dict_pre_hook: a pre hook's non-parameter state entry
    (optimizer.state['test'] = 1) appears in state_dict()['state']."""
    opt = AccumOptimizer([torch.rand(2, 3, requires_grad=True)], **get_config(desc))
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    sd = opt.state_dict()
    assert sd["state"]["test"] == 1


@pytest.mark.parametrize("desc", config_params())
def test_state_dict_post_hook(desc):
    """test_state_dict_post_hook: the post hook runs and its edits are returned."""
    opt = AccumOptimizer([torch.rand(2, 3, requires_grad=True)], **get_config(desc))
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    sd = opt.state_dict()
    assert sd["ran_state_dict_pre_hook"] is False


@pytest.mark.parametrize("desc", config_params())
def test_state_dict_pre_post_hook(desc):
    """test_state_dict_pre_post_hook: pre and post hooks compose."""
    opt = AccumOptimizer([torch.rand(2, 3, requires_grad=True)], **get_config(desc))
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"]
    assert sd["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize("desc", config_params())
def test_load_state_dict_pre_hook_and_prepend(desc):
    """test_load_state_dict_pre_hook_and_prepend: a pre hook edits the loaded
    lr; a prepended hook that returns a new dict runs first."""
    opt = AccumOptimizer([torch.rand(2, 3, requires_grad=True)], **get_config(desc))
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002


@pytest.mark.parametrize("desc", config_params())
def test_load_state_dict_post_hook(desc):
    """test_load_state_dict_post_hook: a post hook runs after the load and may
    write non-parameter entries into optimizer.state."""
    opt = AccumOptimizer([torch.rand(2, 3, requires_grad=True)], **get_config(desc))
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    # bool(): with a tensor lr the comparison is a 0-dim tensor, for SGD too.
    assert bool(opt.state["ran_load_state_dict_pre_hook2"]) is False
    assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("desc", config_params())
def test_load_state_dict_pre_post_hook(desc):
    """test_load_state_dict_pre_post_hook: the dict a pre hook returns is the
    one loaded, and the post hook sees it."""
    opt = AccumOptimizer([torch.rand(2, 3, requires_grad=True)], **get_config(desc))
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is True
    assert opt.state["ran_load_state_dict_post_hook"] is True


# -- step hooks ------------------------------------------------------------------


@pytest.mark.parametrize("desc", config_params())
def test_step_post_hook(desc):
    """test_step_post_hook: a post hook fires once per step() until removed."""
    data = 2

    def post_hook(opt, args, kwargs):
        nonlocal data
        data += 2

    opt = AccumOptimizer([torch.tensor([1.0, 1.0])], **get_config(desc))
    handle = opt.register_step_post_hook(post_hook)
    opt.step()
    opt.step()
    assert data == 6
    handle.remove()
    opt.step()
    assert data == 6


@pytest.mark.parametrize("desc", config_params())
def test_step_pre_hook(desc):
    """test_step_pre_hook: a pre hook fires once per step() until removed."""
    data = 5

    def pre_hook(opt, args, kwargs):
        nonlocal data
        data += 2

    opt = AccumOptimizer([torch.tensor([1.0, 1.0])], **get_config(desc))
    handle = opt.register_step_pre_hook(pre_hook)
    opt.step()
    opt.step()
    assert data == 9
    handle.remove()
    opt.step()
    assert data == 9


@pytest.mark.parametrize("desc", config_params())
def test_step_all_hooks(desc):
    """test_step_all_hooks: global pre, local pre, local post, global post fire
    in that order, for AccumOptimizer and for a torch SGD beside it."""
    data = []
    params = [torch.tensor([1.0, 1.0])]
    opt = AccumOptimizer(params, **get_config(desc))
    opt2 = SGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt.register_step_post_hook(lambda o, a, k: data.append(2)),
        opt2.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt2.register_step_post_hook(lambda o, a, k: data.append(2)),
    ]
    try:
        opt.step()
        assert data == [0, 1, 2, 5]
        opt2.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step()
    opt2.step()
    assert data == [0, 1, 2, 5] * 3


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_deepcopy_copies_all_public_attrs(desc):
    """test_deepcopy_copies_all_public_attrs: after 3 steps, deepcopy keeps the
    set of public instance attributes."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = AccumOptimizer(params, **get_config(desc, skip=("differentiable",)))
    for _ in range(3):
        opt.step()

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(opt) == public(copy.deepcopy(opt))


@requires_cuda
def test_fused_cpu_matches_cuda():
    """test_fused_cpu_matches_cuda: the same model on CPU and CUDA steps alike."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for desc, kwargs in base_configs():
            inps, models, opts = [], [], []
            for dev in ("cpu", "cuda"):
                inp = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=dev).reshape(3, 2)
                torch.manual_seed(1)
                model = torch.nn.Sequential(
                    torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
                ).to(dtype=dtype, device=dev)
                empty = torch.empty((), device=dev, dtype=dtype, requires_grad=True)
                empty.grad = torch.rand_like(empty)
                opts.append(AccumOptimizer(list(model.parameters()) + [empty], **{**get_base_config(desc), "fused": True}))
                inps.append(inp)
                models.append(model)
            _compare_between(inps, models, opts)


@pytest.mark.skip(
    reason="test_defaults_changed_to_foreach (torch: CUDA only) mocks torch.optim.sgd._multi_tensor_sgd and "
    "asserts SGD dispatches to it; not applicable by design: AccumOptimizer always runs its own fused "
    "kernels and ignores foreach (AccumOptimizer docstring: foreach, fused)"
)
def test_defaults_changed_to_foreach():
    pass


@pytest.mark.parametrize("desc", base_config_params())
def test_non_empty_state(desc):
    """test_non_empty_state: after one step no per-param state entry is empty."""
    model = torch.nn.Linear(5, 5)
    inp = torch.rand(2, 5)
    opt = AccumOptimizer(model.parameters(), **get_base_config(desc))
    opt.zero_grad()
    model(inp).sum().backward()
    opt.step()
    for s in opt.state.values():
        assert len(s) > 0


# ============================================================================
# Extensions: drop-in checks the contract names that TestOptimRenewed lacks
# ============================================================================


@pytest.mark.parametrize("desc", [pytest.param(d, id=_id(d)) for d, kw in configs() if kw.get("differentiable")])
def test_differentiable_true_raises(desc):
    """Documented deviation: every '& differentiable' config raises ValueError
    naming differentiable, and nothing is left half-built."""
    with pytest.raises(ValueError, match="differentiable"):
        AccumOptimizer([Parameter(torch.randn(2, 3))], **get_config(desc))
    with pytest.raises(ValueError, match="differentiable"):
        opt = AccumOptimizer([Parameter(torch.randn(2, 3))])
        opt.add_param_group({"params": [Parameter(torch.randn(2))], "differentiable": True})


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_pickle_round_trip(desc):
    """pickle.dumps/loads (mid-training) keeps defaults (accumulation_steps
    included), param groups and state, and the copy then steps exactly like
    the original; the copy also has every public attribute."""
    kwargs = get_config(desc, skip=("differentiable",))
    model = torch.nn.Linear(4, 3)
    inp = torch.randn(6, 4)
    opt = AccumOptimizer(model.parameters(), **kwargs)
    for _ in range(3):
        _fwd_bwd_model(opt, model, inp)
        opt.step()
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert_equal(opt2.defaults, opt.defaults, path="defaults")
    assert opt2.defaults["accumulation_steps"] == 1
    assert {k for k in opt2.__dict__ if not k.startswith("_")} == {k for k in opt.__dict__ if not k.startswith("_")}
    assert_equal(opt2.state_dict(), opt.state_dict(), path="state_dict after pickle")
    for _ in range(3):
        _fwd_bwd_model(opt, model, inp)
        _fwd_bwd_model(opt2, model2, inp)
        opt.step()
        opt2.step()
    assert_equal(list(model2.parameters()), list(model.parameters()), path="params after pickle")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_amp_scaling_flag_and_counter(how):
    """A drop-in's deepcopy and pickling keep every setting. The
    optimizer sets _step_supports_amp_scaling = True (GradScaler relies on it
    to hand over grad_scale/found_inf instead of syncing), and the micro-batch
    counter drives accumulation; a copy must keep both. (torch's own
    SGD(fused=True) also drops the flag on copy; this is the contract's
    requirement, not an SGD-parity check: without the flag GradScaler.step
    falls back to unscale_ + found_inf.item(), a host sync per step.)"""
    p = Parameter(torch.randn(3))
    opt = AccumOptimizer([p], lr=0.1, accumulation_steps=3)
    p.grad = torch.ones(3)
    opt.step()  # micro-step 1 of 3
    assert opt._step_supports_amp_scaling is True
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.is_accumulation_boundary == opt.is_accumulation_boundary
    assert twin.accumulation_steps == 3
    assert getattr(twin, "_step_supports_amp_scaling", None) is True, (
        f"{how} of AccumOptimizer lost _step_supports_amp_scaling"
    )


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_set_to_none(set_to_none):
    """zero_grad(set_to_none=...) as SGD: None, or zeros in the same tensor;
    a grad with a grad_fn is detached; the default is set_to_none=True."""
    results = []
    for cls in (SGD, AccumOptimizer):
        model = torch.nn.Linear(3, 2)
        opt = cls(model.parameters(), lr=0.1)
        model(torch.randn(4, 3)).sum().backward()
        grads = [p.grad for p in model.parameters()]
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            results.append([p.grad is None for p in model.parameters()])
        else:
            results.append(
                [p.grad is g and bool((p.grad == 0).all()) for p, g in zip(model.parameters(), grads)]
            )
        model(torch.randn(4, 3)).sum().backward()
        opt.zero_grad()
        results.append([p.grad is None for p in model.parameters()])
    assert results[:2] == results[2:] and all(all(r) for r in results), results


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_step_closure_returns_loss_like_sgd(desc):
    """step(closure) evaluates the closure once with grad enabled (even under
    no_grad) and returns its value, as SGD does; the update matches SGD."""
    kwargs = get_config(desc, skip=("differentiable",))
    out = []
    for cls, kw in ((SGD, reference_kwargs(kwargs)), (AccumOptimizer, kwargs)):
        torch.manual_seed(3)
        model = torch.nn.Linear(4, 2)
        inp = torch.randn(5, 4)
        opt = cls(model.parameters(), **copy.deepcopy(kw))
        calls = []

        def closure():
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = model(inp).pow(2).sum()
            loss.backward()
            return loss

        with torch.no_grad():
            losses = [opt.step(closure) for _ in range(3)]
        out.append((calls, [loss.item() for loss in losses], [p.detach().clone() for p in model.parameters()]))
    (c_ref, l_ref, p_ref), (c, l, p) = out
    assert c == c_ref == [True] * 3
    assert_equal(l, l_ref, path="returned losses")
    assert_equal(p, p_ref, path="params")


def _run_pair(make_params, kwargs, steps, grads_fn):
    """Run SGD (forloop) and AccumOptimizer on identical params and grads."""
    results = []
    for cls, kw in ((SGD, reference_kwargs(kwargs)), (AccumOptimizer, copy.deepcopy(kwargs))):
        torch.manual_seed(7)
        params = make_params()
        opt = cls(params, **kw)
        for i in range(steps):
            torch.manual_seed(100 + i)
            for p, g in zip(params, grads_fn(params)):
                p.grad = g
            opt.step()
        results.append((params, opt))
    return results


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_noncontiguous_params_match_sgd(desc):
    """Non-contiguous params (transposed, channels_last, strided slice, expanded
    storage-free 0-stride excluded) step exactly like SGD, stay the same tensor
    (data_ptr, strides) and get grads of any layout."""
    kwargs = get_config(desc, skip=("differentiable",))

    def make_params():
        return [
            Parameter(torch.randn(5, 7).t()),
            Parameter(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)),
            Parameter(torch.randn(6, 4, 2)[..., 1]),
            Parameter(torch.randn(3, 8)[:, ::2]),
        ]

    def grads(params):
        return [
            torch.randn(7, 5),  # contiguous grad for a transposed param
            torch.randn(2, 3, 4, 4),  # contiguous grad for a channels_last param
            torch.randn(4, 6).t(),  # transposed grad for a strided param
            torch.randn(3, 4),
        ]

    (ref_params, ref_opt), (params, opt) = _run_pair(make_params, kwargs, 4, grads)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_equal(p, r, path=f"param {i}")
        if "momentum_buffer" in ref_opt.state[r]:
            assert_equal(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], path=f"buf {i}")
    # identity and layout survive the step
    torch.manual_seed(7)
    fresh = make_params()
    ptrs = [(p.data_ptr(), p.stride()) for p in fresh]
    o = AccumOptimizer(fresh, **get_config(desc, skip=("differentiable",)))
    for p, g in zip(fresh, grads(fresh)):
        p.grad = g
    o.step()
    assert [(p.data_ptr(), p.stride()) for p in fresh] == ptrs


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_empty_and_scalar_params_match_sgd(desc):
    """Zero-size params (shape (0,), (3, 0)) and a 0-dim param in one optimizer
    with ordinary ones: no error, same result as SGD."""
    kwargs = get_config(desc, skip=("differentiable",))

    def make_params():
        return [
            Parameter(torch.empty(0)),
            Parameter(torch.randn(4)),
            Parameter(torch.empty(3, 0)),
            Parameter(torch.randn(())),
        ]

    (ref_params, _), (params, _) = _run_pair(make_params, kwargs, 3, lambda ps: [torch.randn_like(p) for p in ps])
    assert_equal(params, ref_params)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("desc", base_config_params())
def test_mixed_dtype_cpu(desc, impl):
    """test_mixed_device_dtype's check on CPU (torch runs it on 2 GPUs only):
    float64, float32, float16, bfloat16 params in one optimizer match SGD
    forloop within 5x torch's per-dtype tolerances (7 steps for foreach, 1 for
    fused, as in torch)."""
    params = [torch.rand(2, 3, dtype=dt, requires_grad=True) for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    _mixed_dtype_check(params, impl, [(desc, get_base_config(desc))])


@pytest.mark.parametrize("desc", config_params(skip=("differentiable", "fused")))
def test_complex_matches_sgd(desc):
    """Complex params (mixed with a real one) give the same result as
    torch.optim.SGD on the same complex params."""
    kwargs = get_config(desc, skip=("differentiable", "fused"))

    def make_params():
        return [
            Parameter(torch.randn(4, 3, dtype=torch.complex64)),
            Parameter(torch.randn(5, dtype=torch.complex128)),
            Parameter(torch.randn(4, 3)),
        ]

    (ref_params, ref_opt), (params, opt) = _run_pair(make_params, kwargs, 3, lambda ps: [torch.randn_like(p) for p in ps])
    assert_equal(params, ref_params)
    assert_equal(opt.state_dict()["state"], ref_opt.state_dict()["state"], path="state")


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_sparse_grads_match_sgd(desc):
    """nn.Embedding(sparse=True) beside a dense layer, every SGD config: same
    outcome as SGD forloop (same params, or the same exception type and the
    same params left behind where SGD rejects the config, e.g. weight decay on
    sparse grads)."""
    kwargs = get_config(desc, skip=("differentiable",))
    idx = torch.tensor([[1, 3, 3], [0, 7, 1]])
    outcomes = []
    for cls, kw in ((SGD, reference_kwargs(kwargs)), (AccumOptimizer, copy.deepcopy(kwargs))):
        torch.manual_seed(11)
        emb = torch.nn.Embedding(10, 4, sparse=True)
        lin = torch.nn.Linear(4, 2)
        before = [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
        opt = cls([*emb.parameters(), *lin.parameters()], **kw)
        try:
            for _ in range(3):
                opt.zero_grad()
                lin(emb(idx)).pow(2).sum().backward()
                opt.step()
            outcomes.append(("ok", [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]))
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            after = [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
            outcomes.append((type(e).__name__, str(e), before, after))
    ref, got = outcomes
    assert ref[0] == got[0], f"SGD: {ref[:2] if ref[0] != 'ok' else 'ok'}; AccumOptimizer: {got[:2] if got[0] != 'ok' else 'ok'}"
    if ref[0] == "ok":
        assert_equal(got[1], ref[1], path="params")
    else:  # SGD raised on the first (sparse) param, before touching any param
        assert_equal(got[3], ref[3], path="params after the error (SGD leaves them untouched)")


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("sched_idx", range(len(SGD_INFO.scheduler_inputs)))
def test_lr_schedulers_match_sgd(sched_idx, tensor_lr):
    """Each of SGD's scheduler combinations, with a float or a tensor lr and
    momentum: 20 steps give SGD's params and SGD's lr sequence."""
    runs = []
    for cls in (SGD, AccumOptimizer):
        torch.manual_seed(5)
        model = torch.nn.Linear(4, 2)
        inp = torch.randn(6, 4)
        lr = torch.tensor(0.05) if tensor_lr else 0.05
        opt = cls(model.parameters(), lr=lr, momentum=0.9)
        scheds = [s(opt) for s in SGD_INFO.scheduler_inputs[sched_idx]]
        lrs = []
        for _ in range(20):
            loss = _fwd_bwd_model(opt, model, inp)
            opt.step()
            _step_schedulers(scheds, loss)
            lrs.append(float(opt.param_groups[0]["lr"]))
        runs.append((lrs, [p.detach().clone() for p in model.parameters()]))
    assert runs[1][0] == runs[0][0]
    assert_equal(runs[1][1], runs[0][1], path="params")


@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_older_state_dict_loads_like_sgd(desc):
    """The state dict of test_can_load_older_state_dict (flags SGD added later
    removed; 'nesterov' too, which SGD's __setstate__ also defaults, and our
    'accumulation' entries) loaded into a fresh optimizer of the same config
    gives the same param_groups and next step as torch.optim.SGD loading it:
    a missing flag means the old default (False), as SGD.__setstate__ does."""
    kwargs = get_config(desc, skip=("differentiable",))
    model, inp = _conv_bn_model()
    opt = AccumOptimizer(model.parameters(), **kwargs)
    for _ in range(3):
        _fwd_bwd_model(opt, model, inp)
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    old.pop("accumulation", None)
    for g in old["param_groups"]:
        for flag in (*SGD_INFO.not_og_supported_flags, "nesterov", "accumulation_steps"):
            g.pop(flag, None)
    results = []
    for cls, kw in ((SGD, reference_kwargs(kwargs)), (AccumOptimizer, copy.deepcopy(kwargs))):
        m = copy.deepcopy(model)
        o = cls(m.parameters(), **kw)
        o.load_state_dict(copy.deepcopy(old))
        _fwd_bwd_model(o, m, inp)
        o.step()
        flags = {k: o.param_groups[0][k] for k in ("maximize", "nesterov")}
        results.append((flags, [p.detach().clone() for p in m.parameters()]))
    (ref_flags, ref_p), (flags, p) = results
    assert flags == ref_flags, f"after loading a state dict without them, SGD has {ref_flags}, AccumOptimizer {flags}"
    assert_equal(p, ref_p, path="params after step")


@pytest.mark.parametrize("direction", ["sgd_to_accum", "accum_to_sgd"])
@pytest.mark.parametrize("desc", config_params(skip=("differentiable",)))
def test_state_dict_interchange_with_sgd(desc, direction):
    """State dicts interchange with SGD (README, Usage): a torch.optim.SGD
    checkpoint loads into AccumOptimizer and the reverse; training then
    continues exactly as the uninterrupted SGD run."""
    kwargs = get_config(desc, skip=("differentiable",))
    src_cls, dst_cls = (SGD, AccumOptimizer) if direction == "sgd_to_accum" else (AccumOptimizer, SGD)
    src_kw = reference_kwargs(kwargs) if src_cls is SGD else copy.deepcopy(kwargs)
    dst_kw = reference_kwargs(kwargs) if dst_cls is SGD else copy.deepcopy(kwargs)
    torch.manual_seed(2)
    model = torch.nn.Linear(4, 3)
    inp = torch.randn(5, 4)
    ref_model = copy.deepcopy(model)
    ref = SGD(ref_model.parameters(), **reference_kwargs(kwargs))
    src = src_cls(model.parameters(), **src_kw)
    for _ in range(3):
        _fwd_bwd_model(src, model, inp)
        src.step()
        _fwd_bwd_model(ref, ref_model, inp)
        ref.step()
    sd = copy.deepcopy(src.state_dict())
    model2 = copy.deepcopy(model)
    dst = dst_cls(model2.parameters(), **dst_kw)
    dst.load_state_dict(sd)
    for _ in range(3):
        _fwd_bwd_model(dst, model2, inp)
        dst.step()
        _fwd_bwd_model(ref, ref_model, inp)
        ref.step()
    assert_equal(list(model2.parameters()), list(ref_model.parameters()), path="params")


@pytest.mark.parametrize("K", [1, 2])
def test_hooks_fire_once_per_call(K):
    """As torch's suite requires: step pre/post hooks and state_dict /
    load_state_dict pre/post hooks fire exactly once per call (with
    accumulation_steps=K too, where most step() calls only count)."""
    p = Parameter(torch.randn(3))
    opt = AccumOptimizer([p], lr=0.1, momentum=0.9, accumulation_steps=K)
    counts = dict.fromkeys(["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"], 0)

    def bump(name):
        def hook(*args):
            counts[name] += 1

        return hook

    opt.register_step_pre_hook(bump("step_pre"))
    opt.register_step_post_hook(bump("step_post"))
    opt.register_state_dict_pre_hook(bump("sd_pre"))
    opt.register_state_dict_post_hook(bump("sd_post"))
    opt.register_load_state_dict_pre_hook(bump("load_pre"))
    opt.register_load_state_dict_post_hook(bump("load_post"))
    for _ in range(4):
        opt.zero_grad()
        p.grad = torch.ones(3)
        opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert counts == {"step_pre": 4, "step_post": 4, "sd_pre": 1, "sd_post": 1, "load_pre": 1, "load_post": 1}


def test_state_dict_post_hook_sees_final_state_dict():
    """A state_dict post hook receives the state dict that state_dict() returns
    (SGD's format plus 'accumulation'), not an intermediate one with internal
    entries: torch calls post hooks on the finished dict."""
    p = Parameter(torch.randn(3))
    opt = AccumOptimizer([p], lr=0.1, momentum=0.9, accumulation_steps=2)
    p.grad = torch.ones(3)
    opt.step()
    opt.step()  # one real update: momentum_buffer exists
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.__setitem__("sd", copy.deepcopy(sd)))
    final = opt.state_dict()
    assert_equal(seen["sd"], final, path="state dict seen by the post hook")


def test_load_state_dict_post_hook_sees_loaded_counter():
    """A load_state_dict post hook runs after the load has fully taken effect:
    the micro-batch counter (is_accumulation_boundary) is already restored."""
    p = Parameter(torch.randn(3))
    opt = AccumOptimizer([p], lr=0.1, momentum=0.9, accumulation_steps=2)
    p.grad = torch.ones(3)
    for _ in range(3):  # mid-window: the next step() is a boundary
        opt.step()
    sd = opt.state_dict()
    seen = {}
    fresh = AccumOptimizer([Parameter(torch.randn(3))], lr=0.1, momentum=0.9, accumulation_steps=2)
    fresh.register_load_state_dict_post_hook(lambda o: seen.__setitem__("boundary", o.is_accumulation_boundary))
    fresh.load_state_dict(sd)
    assert fresh.is_accumulation_boundary is True
    assert seen["boundary"] is True, "the post hook saw the pre-load micro-batch counter"

"""SGD's implementation flags and SGD's errors, on AccumOptimizer.

* ``foreach`` and ``fused`` are accepted, kept in param_groups as given, and
  change nothing: the fused kernels always run (AccumOptimizer docstring);
  ``fused=True`` only adds torch's fused SGD's refusals (below).
* ``differentiable=True`` is refused (a documented deviation: the kernels
  update in place outside autograd), at construction and in add_param_group.
* Every error input torch declares for SGD gives the same exception (or
  warning) type and message; a refused load_state_dict leaves the optimizer
  as it was.
* Meta params take SGD's shape-only step; with ``fused=True`` they are refused
  as torch's fused SGD refuses them (complex params too).
* The GradScaler hand-over (``grad_scale`` / ``found_inf`` attributes, set by
  torch's GradScaler for optimizers that take them): a step with found_inf
  set leaves no trace, grad_scale divides the gradient.

(Bad grads and bad hyper-parameters: tests/test_bad_input.py. Meta params
with accumulation windows: tests/test_meta_params.py.)
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _dropin import MATRIX_MODULE, MATRIX_REASON, Pair, assert_same, random_grads, sgd, values
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import ERROR_NAMES, ErrorWhen, error_inputs, option_names, options  # noqa: E402

FLAGS = {
    "foreach": dict(foreach=True),
    "no-foreach": dict(foreach=False),
    "fused": dict(fused=True),
    "no-fused": dict(fused=False),
    "foreach-and-fused": dict(foreach=True, fused=True),
}


def _four_params():
    return [nn.Parameter(torch.randn(9, 4)), nn.Parameter(torch.randn(9)), nn.Parameter(torch.randn(33)),
            nn.Parameter(torch.randn(()))]


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("option", option_names())
def test_implementation_flags_change_nothing(option, flags):
    pair = Pair(_four_params, options(option), ours_kwargs=FLAGS[flags])
    gen = torch.Generator().manual_seed(61)
    for step in range(4):
        pair.step(random_grads(pair.params, gen))
        pair.check(f"step {step}")
    for key in ("foreach", "fused"):
        assert pair.ours.param_groups[0][key] == FLAGS[flags].get(key)


@pytest.mark.parametrize("option", option_names())
def test_differentiable_is_refused(option):
    with pytest.raises(ValueError, match="differentiable"):
        AccumOptimizer(_four_params(), differentiable=True, **options(option))
    pair = Pair(_four_params, options(option))
    with pytest.raises(ValueError, match="differentiable"):
        pair.ours.add_param_group({"params": [nn.Parameter(torch.randn(2))], "differentiable": True})
    assert len(pair.ours.param_groups) == 1
    pair.step(random_grads(pair.params, torch.Generator().manual_seed(62)))
    pair.check("a step after the refusal")


def _outcome(make, err):
    """What constructing (and, for step errors, stepping) gives: the
    exception or the warnings, as (type, message) pairs."""
    oi = err.optimizer_error_input
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = make(oi.params, **oi.kwargs)
            if err.error_on == ErrorWhen.STEP_ERROR:
                opt.step()
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            return ("raised", type(e), str(e))
    return ("warned", [(w.category, str(w.message)) for w in caught])


@pytest.mark.parametrize("case", range(len(ERROR_NAMES)), ids=ERROR_NAMES)
def test_sgd_error_inputs_fail_the_same_way(case):
    ref = _outcome(sgd, error_inputs()[case])
    ours = _outcome(AccumOptimizer, error_inputs()[case])
    assert ours == ref
    err = error_inputs()[case]
    if ref[0] == "raised":  # premise: this is the failure torch declares
        assert issubclass(ref[1], err.error_type)
    else:
        assert any(issubclass(c, err.error_type) for c, _ in ref[1])


def _corrupt(sd: dict, how: str) -> dict:
    sd = copy.deepcopy(sd)
    if how == "extra-group":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    elif how == "short-group":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif how == "buffer-shape":
        first, second = sd["param_groups"][0]["params"][:2]
        sd["state"][first]["momentum_buffer"] = sd["state"][second]["momentum_buffer"].clone()
    return sd


@pytest.mark.parametrize("how", ["extra-group", "short-group", "buffer-shape"])
def test_refused_load_changes_nothing(how):
    """A state dict that does not fit is refused with a ValueError (SGD's own
    message where SGD refuses it; SGD takes a momentum buffer of the wrong
    shape and fails at the next step instead), and the optimizer continues
    exactly as an untouched twin."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    pair = Pair(_four_params, kw)
    gen = torch.Generator().manual_seed(63)
    pair.step(random_grads(pair.params, gen))
    twin = copy.deepcopy(pair.ours)  # with its own copies of the params
    twin_params = twin.param_groups[0]["params"]
    bad = _corrupt(pair.ours.state_dict(), how)
    with pytest.raises(ValueError) as ours_err:
        pair.ours.load_state_dict(bad)
    if how != "buffer-shape":
        with pytest.raises(ValueError) as ref_err:
            pair.ref.load_state_dict(_corrupt(pair.ref.state_dict(), how))
        assert str(ours_err.value) == str(ref_err.value)
    assert_same(pair.ours.state_dict(), twin.state_dict(), "state after the refused load", rtol=0, atol=0)
    grads = random_grads(pair.params, gen)
    pair.step(grads)
    for p, g in zip(twin_params, grads):
        p.grad = g.clone()
    twin.step()
    assert_same(values(pair.params), values(twin_params), "next step", rtol=0, atol=0)


class _MetaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 1)


@pytest.mark.parametrize("option", option_names())
def test_meta_params_take_the_shape_only_step(option):
    """Meta params take the shape-only step SGD's default path takes: same
    state structure. Materialising the model with to_empty() makes new
    params; the optimizer keeps (and steps) the meta ones, as SGD does."""
    nets, opts = [], []
    for make in (sgd, AccumOptimizer):
        with torch.device("meta"):
            net = _MetaNet()
            for p in net.parameters():
                p.grad = torch.empty_like(p)
        opt = make(net.parameters(), **options(option))
        opt.step()
        nets.append(net)
        opts.append(opt)
    (ref_net, ours_net), (ref, ours) = nets, opts
    assert all(p.is_meta for p in ours_net.parameters())
    shapes = [
        {i: {k: (v.shape, v.dtype, v.device.type) for k, v in s.items()} for i, s in o.state_dict()["state"].items()}
        for o in (ref, ours)
    ]
    assert shapes[1] == shapes[0]

    ours_net.to_empty(device="cpu")
    for p in ours_net.parameters():
        p.grad = torch.ones_like(p)
    ours.step()
    assert all(p.is_meta for p in ours.param_groups[0]["params"])


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("where", ["constructor", "param_group"])
@pytest.mark.parametrize("kind", ["meta", "complex"])
def test_fused_true_refuses_what_torch_fused_sgd_refuses(kind, where, K):
    """SGD(fused=True) raises at its first step on meta (or complex) params;
    so does AccumOptimizer(fused=True), with torch's error, before anything
    changes (the micro-batch is not counted; no state is made)."""
    def make_params():
        if kind == "meta":
            with torch.device("meta"):
                net = _MetaNet()
            for p in net.parameters():
                p.grad = torch.empty_like(p)
            return list(net.parameters())
        p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
        p.grad = torch.randn_like(p)
        return [p]

    def build(make, params, **kw):
        if where == "constructor":
            return make(params, lr=0.1, momentum=0.9, fused=True, **kw)
        opt = make([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9, **kw)
        opt.add_param_group({"params": params, "fused": True})
        return opt

    ref = build(torch.optim.SGD, make_params())
    with pytest.raises(RuntimeError) as ref_err:
        ref.step()
    ours = build(AccumOptimizer, make_params(), accumulation_steps=K)
    with pytest.raises(RuntimeError) as our_err:
        ours.step()
    assert str(our_err.value) == str(ref_err.value)
    assert "`fused=True` requires all the params" in str(our_err.value)
    assert ours._micro_step == 0 and not ours.state


@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["finite", "found-inf"])
@pytest.mark.parametrize("grad_scale", [None, 4.0], ids=["no-scale", "scale-4"])
@pytest.mark.parametrize("option", option_names())
def test_grad_scaler_hand_over(option, grad_scale, found_inf):
    """found_inf=1: params keep their bits, no momentum state is saved, and
    the next plain step is SGD's first step. found_inf=0: the step is SGD's on
    grad / grad_scale (a power of two: exact). Either way .grad is left
    divided by grad_scale."""
    pair = Pair(_four_params, options(option))
    gen = torch.Generator().manual_seed(64)
    grads = random_grads(pair.params, gen)
    scale = 1.0 if grad_scale is None else grad_scale
    before = values(pair.params)
    for p, g in zip(pair.params, grads):
        p.grad = g * scale
    pair.ours.grad_scale = None if grad_scale is None else torch.tensor(grad_scale)
    pair.ours.found_inf = torch.tensor(found_inf)
    pair.ours.step()
    del pair.ours.grad_scale, pair.ours.found_inf
    assert_same([p.grad for p in pair.params], grads, ".grad after the step", rtol=0, atol=0)
    if found_inf:
        assert_same(values(pair.params), before, "params after a skipped step", rtol=0, atol=0)
        assert pair.ours.state_dict()["state"] == {}
        grads = random_grads(pair.params, gen)
        pair.step(grads)  # both optimizers' first real step
    else:
        for p, g in zip(pair.ref_params, grads):
            p.grad = g.clone()
        pair.ref.step()
    pair.check("after the hand-over")

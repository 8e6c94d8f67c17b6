"""`torch.compile(opt.step)` gives the eager result for every K.

It used not to: dynamo dropped the writes to the optimizer's int counter
inside a compiled step, so with K > 1 no boundary was ever reached and the
parameters never moved, silently (K = 1 hid it). The counter now lives in a
plain window object whose writes dynamo replays.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from _helpers import make_batches, make_model
from torch_fastaccum import AccumOptimizer, GradScaler

OPT = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
MICRO = 12


def _train(K, compile_kw=None, scaler=False, closure=False):
    """12 micro-batches; returns params, .grad after the run, the counter and
    the compile counter (None when eager)."""
    torch._dynamo.reset()
    m = make_model("mlp")
    opt = AccumOptimizer(m.parameters(), accumulation_steps=K, **OPT)
    counter = None
    if compile_kw is not None:
        counter = CompileCounterWithBackend(compile_kw.pop("backend"))
        # As users do it, so that GradScaler.step calls the compiled step too.
        opt.step = torch.compile(opt.step, backend=counter, **compile_kw)
    s = GradScaler("cpu", init_scale=2.0**8, growth_interval=2) if scaler else None
    for x, y in make_batches("mlp", MICRO):
        opt.zero_grad()
        loss_of = lambda: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
        if s is not None:
            s.scale(loss_of()).backward()
            s.step(opt)
            s.update()
        elif closure:

            def fn():
                loss = loss_of()
                loss.backward()
                return loss

            opt.step(fn)
        else:
            loss_of().backward()
            opt.step()
    params = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    return params, grads, opt._micro_step, counter


def _assert_equal(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph", "fullgraph"])
@pytest.mark.parametrize("K", [1, 2, 4, 3])
def test_compiled_step_equals_eager(K, fullgraph):
    e_params, e_grads, e_micro, _ = _train(K)
    c_params, c_grads, c_micro, counter = _train(K, dict(backend="aot_eager", fullgraph=fullgraph))
    assert c_micro == e_micro == MICRO
    _assert_equal(c_params, e_params)
    _assert_equal(c_grads, e_grads)
    assert counter.frame_count > 0, "the step must actually have been compiled"
    # The counter is guarded symbolically: a graph for the first calls, then
    # one per side of the boundary, not one per micro-batch value.
    assert counter.frame_count <= 4, f"{counter.frame_count} compilations for {MICRO} calls"


def test_compiled_step_with_closure_equals_eager():
    e = _train(4, closure=True)
    c = _train(4, dict(backend="aot_eager"), closure=True)
    assert c[2] == e[2] == MICRO
    _assert_equal(c[0], e[0])


def test_compiled_step_under_grad_scaler_equals_eager():
    e = _train(4, scaler=True)
    c = _train(4, dict(backend="aot_eager"), scaler=True)
    assert c[2] == e[2] == MICRO
    _assert_equal(c[0], e[0])
    _assert_equal(c[1], e[1])


def test_compiled_step_inductor_equals_eager():
    e = _train(4)
    c = _train(4, dict(backend="inductor", fullgraph=True))
    assert c[2] == e[2] == MICRO
    _assert_equal(c[0], e[0])
    _assert_equal(c[1], e[1])

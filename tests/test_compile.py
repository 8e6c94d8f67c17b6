"""The ops trace under torch.compile(fullgraph=True) through their fake impls
and give the eager results."""

import pytest
import torch

import torch_fastaccum  # noqa: F401

ops = torch.ops.fastaccum


def _step(params, grads, bufs, steps, scale, found_inf):
    ops.nonfinite_check_(grads, found_inf)
    ops.fused_sgd_(params, grads, bufs, steps, lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0,
                   nesterov=True, maximize=False, grad_factor=0.5, grad_scale=scale, found_inf=found_inf)


def _inputs(seed, poison=False):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in (1, 7, 300)]
    grads = [torch.randn(n, generator=g) for n in (1, 7, 300)]
    if poison:
        grads[1][3] = float("inf")
    bufs = [torch.randn(n, generator=g) for n in (1, 7, 300)]
    steps = [torch.tensor(float(i % 2)) for i in range(3)]
    return params, grads, bufs, steps, torch.tensor(4.0), torch.zeros(())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "inf"])
def test_fullgraph_compile_matches_eager(poison, backend):
    torch._dynamo.reset()
    eager = _inputs(0, poison)
    compiled = _inputs(0, poison)
    _step(*eager)
    torch.compile(_step, fullgraph=True, backend=backend)(*compiled)
    for a, b in zip(eager[0] + eager[2] + eager[3] + [eager[5]], compiled[0] + compiled[2] + compiled[3] + [compiled[5]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if poison:
        assert compiled[5].item() == 1.0
        torch.testing.assert_close(compiled[0], _inputs(0, poison)[0], rtol=0, atol=0)  # skipped: untouched
    else:
        assert compiled[5].item() == 0.0
        assert not torch.equal(compiled[0][2], _inputs(0)[0][2])

"""A param listed twice in one group: what torch.optim.SGD does with it.

The common case is a tied weight (an LM's embedding and output head share
one tensor) given as ``list(model.head.parameters()) +
list(model.parameters())``. SGD warns, then steps the tensor once per
occurrence with the same ``.grad``, the occurrences sharing one momentum
buffer (NOTE: [params listed twice] in torch_fastaccum/_plan.py). These
tests hold AccumOptimizer to SGD's result bit for bit in fp32, in the
reference accumulation loop, for every update path, with a scaler, with the
fused clip, and on the per-tensor (sparse, complex, strided) paths.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _dropin import assert_same, feed, random_grads, sgd
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _tied_params(m: TiedLM) -> list[nn.Parameter]:
    # The mistake: the tied weight comes once from the head and once more
    # from the model (parameters() itself lists it once).
    return list(m.head.parameters()) + list(m.parameters())


def _quiet(ctor, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
        return ctor(*args, **kwargs)


def _batches(n, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (8,), generator=g), torch.randint(0, vocab, (8,), generator=g))
            for _ in range(n)]


def _loss(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


OPTIONS = {
    "momentum": dict(lr=0.05, momentum=0.9),
    "wd-dampening": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov-maximize": dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True),
    "no-momentum-wd": dict(lr=0.05, weight_decay=0.02),
}


def _reference(m, kw, K, batches, clip=None):
    """SGD's default path in the reference loop: loss / K, step every K."""
    opt = _quiet(sgd, _tied_params(m), **kw)
    sign = -1.0 if kw.get("maximize") else 1.0
    grads_at_steps, norms = [], []
    for i, (x, y) in enumerate(batches):
        (sign * _loss(m, x, y) / K).backward()
        if (i + 1) % K == 0:
            if clip is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), clip))
            opt.step()
            grads_at_steps.append([p.grad.clone() for p in m.parameters()])
            opt.zero_grad()
    return opt, grads_at_steps, norms


def _ours(m, kw, K, batches, clip=None, scaler=None, **extra):
    opt = _quiet(AccumOptimizer, _tied_params(m), accumulation_steps=K, **kw, **extra)
    sign = -1.0 if kw.get("maximize") else 1.0
    grads_at_steps, norms = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = sign * _loss(m, x, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        boundary = opt.is_accumulation_boundary
        if boundary and clip is not None:
            norms.append(scaler.clip_grad_norm_(opt, clip) if scaler is not None else opt.clip_grad_norm_(clip))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if boundary:
            grads_at_steps.append([p.grad.clone() for p in m.parameters()])
    return opt, grads_at_steps, norms


def _assert_runs_equal(ref_m, ours_m, ref_opt, our_opt, ref_grads, our_grads):
    assert_same(list(ours_m.parameters()), list(ref_m.parameters()), "params")
    ref_bufs = [ref_opt.state[p].get("momentum_buffer") for p in ref_m.parameters()]
    our_bufs = [our_opt.state[p].get("momentum_buffer") for p in ours_m.parameters()]
    assert_same(our_bufs, ref_bufs, "momentum buffers")
    assert_same(our_grads, ref_grads, ".grad after each step")


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_tied_weight_listed_twice_trains_as_sgd(option, K):
    kw = OPTIONS[option]
    torch.manual_seed(0)
    ref_m = TiedLM()
    ours_m = copy.deepcopy(ref_m)
    batches = _batches(3 * K)
    ref_opt, ref_grads, _ = _reference(ref_m, kw, K, batches)
    our_opt, our_grads, _ = _ours(ours_m, kw, K, batches)
    _assert_runs_equal(ref_m, ours_m, ref_opt, our_opt, ref_grads, our_grads)


@pytest.mark.parametrize(
    "option, K, clip, scaled, writeback",
    [
        pytest.param("wd-dampening", 4, 0.5, True, True, id="scaler"),
        pytest.param("wd-dampening", 4, 0.5, True, False, id="scaler-no-writeback"),
        pytest.param("momentum", 2, 0.3, False, True, id="no-scaler"),
    ],
)
def test_tied_weight_with_the_fused_clip(option, K, clip, scaled, writeback):
    """The clip norm counts the tied grad once, as
    clip_grad_norm_(model.parameters()) does. A power-of-two loss scale is
    exact, so the reference is SGD without a scaler (torch's
    GradScaler.unscale_ divides a grad listed twice by the scale twice: ours
    divides it once)."""
    kw = OPTIONS[option]
    torch.manual_seed(0)
    ref_m = TiedLM()
    ours_m = copy.deepcopy(ref_m)
    batches = _batches(3 * K)
    _, ref_grads, ref_norms = _reference(ref_m, kw, K, batches, clip=clip)
    scaler = GradScaler("cpu", init_scale=2.0**8) if scaled else None
    _, our_grads, our_norms = _ours(ours_m, kw, K, batches, clip=clip, grad_writeback=writeback, scaler=scaler)
    _assert_clipped_runs_close(ref_m, ours_m, ref_norms, our_norms, ref_grads, our_grads if writeback else None)


def _assert_clipped_runs_close(ref_m, ours_m, ref_norms, our_norms, ref_grads, our_grads):
    """The fused norm sums in another order than torch's: an ulp apart, so
    the clipped steps are compared within fp32 tolerance (as in
    tests/test_clip_grad_norm.py); a grad counted twice is off by far more."""
    assert len(our_norms) == len(ref_norms) and ref_norms
    assert any(n > 0.5 for n in ref_norms), "premise: some window clips"
    assert_same(our_norms, ref_norms, "clip norms", rtol=1e-6, atol=0)
    assert_same(list(ours_m.parameters()), list(ref_m.parameters()), "params", rtol=1e-5, atol=1e-6)
    if our_grads is not None:
        assert_same(our_grads, ref_grads, ".grad after each step", rtol=1e-5, atol=1e-6)


def _twice(make):
    """The same param list, with its first param listed again, twice over."""
    a, b = make(), make()
    return [a[0], *a, a[0]], [b[0], *b, b[0]]


@pytest.mark.parametrize(
    "kind",
    ["dense", "strided", "complex"],
)
def test_param_listed_three_times_with_random_grads(kind):
    """AccumOptimizer([p, q, p, p]) steps p three times per step, as SGD does,
    on the plain path and on the per-tensor path (a non-contiguous or a
    complex param)."""
    def make():
        torch.manual_seed(5)
        if kind == "strided":
            p = torch.randn(6, 4).t().requires_grad_()  # not contiguous: a dense stand-in
            return [p.detach().requires_grad_(), torch.randn(5, requires_grad=True)]
        dtype = torch.complex64 if kind == "complex" else torch.float32
        return [torch.randn(4, 3, dtype=dtype, requires_grad=True), torch.randn(5, dtype=dtype, requires_grad=True)]

    ref_params, our_params = _twice(make)
    kw = dict(lr=0.1, momentum=0.8, weight_decay=0.05, nesterov=True)
    ref = _quiet(sgd, ref_params, **kw)
    ours = _quiet(AccumOptimizer, our_params, **kw)
    gen = torch.Generator().manual_seed(2)
    unique = lambda ps: list(dict.fromkeys(ps))  # noqa: E731
    for _ in range(3):
        grads = random_grads(unique(ref_params), gen)
        feed(unique(ref_params), grads)
        feed(unique(our_params), [g.clone() for g in grads])
        ref.step()
        ours.step()
    tol = {} if kind != "complex" else dict(rtol=1.3e-6, atol=1e-5)
    assert_same(unique(our_params), unique(ref_params), "params", **tol)
    assert_same([ours.state[p]["momentum_buffer"] for p in unique(our_params)],
                [ref.state[p]["momentum_buffer"] for p in unique(ref_params)], "momentum buffers", **tol)


@pytest.mark.parametrize("K", [1, 3])
def test_sparse_param_listed_twice(K):
    """nn.Embedding(sparse=True)'s weight listed twice: torch's sparse math,
    twice per step, with the window's mean grad (1/K applied once)."""
    torch.manual_seed(0)
    ref_e = nn.Embedding(9, 4, sparse=True)
    our_e = copy.deepcopy(ref_e)
    kw = dict(lr=0.1, momentum=0.9)
    ref = _quiet(sgd, [ref_e.weight, ref_e.weight], **kw)
    ours = _quiet(AccumOptimizer, [our_e.weight, our_e.weight], accumulation_steps=K, **kw)
    g = torch.Generator().manual_seed(3)
    for i in range(3 * K):
        x = torch.randint(0, 9, (5,), generator=g)
        (ref_e(x).square().sum() / K).backward()
        if (i + 1) % K == 0:
            ref.step()
            ref_grad = ref_e.weight.grad.clone()
            ref.zero_grad()
        ours.zero_grad()
        our_e(x).square().sum().backward()
        ours.step()
        if (i + 1) % K == 0:
            assert_same(our_e.weight.grad, ref_grad, ".grad after the step")
    assert_same(our_e.weight, ref_e.weight, "params")
    assert_same(ours.state[our_e.weight]["momentum_buffer"], ref.state[ref_e.weight]["momentum_buffer"], "buffer")


def test_average_grads_divides_a_grad_listed_twice_once():
    torch.manual_seed(0)
    p = torch.randn(5, requires_grad=True)
    opt = _quiet(AccumOptimizer, [p, p], lr=0.1, accumulation_steps=2)
    g1, g2 = torch.randn(5), torch.randn(5)
    p.grad = g1.clone()
    opt.step()  # counts the first micro-batch
    p.grad += g2
    opt.average_grads_()
    assert_same(p.grad, (g1 + g2) / 2, "the mean grad")

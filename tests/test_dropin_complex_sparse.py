"""Complex parameters and sparse gradients, which torch.optim.SGD supports on
its default path, for every SGD option set torch tests SGD with.

Complex: SGD's update of a complex param is the real update of its
(real, imag) pairs; ours must equal SGD's on complex params bit for bit,
equal our own update of the view_as_real copies, and equal our update of the
real and imaginary parts held as two real params.

Sparse: SGD's rules (no weight decay with sparse grads); ours must give
SGD's outcome, and an uncoalesced sparse gradient (an index repeated) must
act as the dense gradient with the same values.

(With accumulation windows and a GradScaler: tests/test_api_compat.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _dropin import MATRIX_MODULE, MATRIX_REASON, Pair, assert_same, random_grads, sgd, values
from torch_fastaccum import AccumOptimizer

pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)
from _sgd_matrix import option_names, options  # noqa: E402


def _mixed_complex():
    return [
        nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)),
        nn.Parameter(torch.randn(5, dtype=torch.complex128)),
        nn.Parameter(torch.randn(4, 3)),
    ]


def _real_view_copies(params):
    return [nn.Parameter(torch.view_as_real(p.detach()).clone() if p.is_complex() else p.detach().clone())
            for p in params]


@pytest.mark.parametrize("option", option_names())
def test_complex_params_step_like_sgd_and_like_their_real_view(option):
    """Ours on complex params (complex64, complex128, beside a real one):
    SGD's step on the same complex params (within tolerance, see
    tests/_dropin.py), and bit for bit SGD's step, and our own, on their
    view_as_real copies."""
    pair = Pair(_mixed_complex, options(option))
    ours_real, ref_real = _real_view_copies(pair.params), _real_view_copies(pair.params)
    on_real = [AccumOptimizer(ours_real, **options(option)), sgd(ref_real, **options(option))]
    gen = torch.Generator().manual_seed(17)
    for step in range(6):
        grads = random_grads(pair.params, gen)
        pair.step(grads)
        for opt, copies in zip(on_real, (ours_real, ref_real)):
            for r, g in zip(copies, grads):
                r.grad = torch.view_as_real(g).clone() if g.is_complex() else g.clone()
            opt.step()
        pair.check(f"step {step}")
        seen_as_real = [torch.view_as_real(p.detach()) if p.is_complex() else p.detach() for p in pair.params]
        assert_same(seen_as_real, values(ref_real), f"step {step}: SGD on the real views")
        assert_same(seen_as_real, values(ours_real), f"step {step}: ours on the real views", rtol=0, atol=0)
    assert pair.params[0].dtype == torch.complex64 and pair.params[1].dtype == torch.complex128


@pytest.mark.parametrize("option", option_names())
def test_complex_param_steps_like_its_two_real_parts(option):
    """A complex vector trained on a real loss through autograd, and the same
    vector held as a real part and an imaginary part: the same trajectory."""
    target = torch.tensor([0.5 - 1.0j, -0.25 + 0.75j, 1.5 + 0.0j])
    z = nn.Parameter(torch.tensor([1.0 + 0.5j, -0.5 - 0.5j, 0.25 + 1.0j]))
    re, im = (nn.Parameter(part.detach().clone()) for part in (z.real, z.imag))
    whole = AccumOptimizer([z], **options(option))
    split = AccumOptimizer([re, im], **options(option))

    def loss_of(v):
        return (v * v - target).abs().pow(2).sum() + (v.conj() * target).real.sum()

    for step in range(5):
        for opt, v in ((whole, lambda: z), (split, lambda: torch.complex(re, im))):
            opt.zero_grad()
            loss_of(v()).backward()
        assert_same([z.grad.real, z.grad.imag], [re.grad, im.grad], f"step {step} grads")
        whole.step()
        split.step()
        assert_same([z.detach().real, z.detach().imag], values([re, im]), f"step {step} params")


def _embedding_model():
    emb = nn.Embedding(12, 3, sparse=True)  # first: SGD meets the sparse grad before any dense one
    lin = nn.Linear(3, 2)
    return [*emb.parameters(), *lin.parameters()], emb, lin


@pytest.mark.parametrize("option", option_names())
def test_sparse_grads_have_sgd_outcome(option):
    """An nn.Embedding(sparse=True) beside a dense layer: SGD's parameters, or
    (where SGD refuses, weight decay on a sparse grad) the same exception
    type, raised by ours before any parameter changes."""
    idx = torch.tensor([[1, 4, 4], [0, 9, 1]])
    outcome = {}
    for name, make in (("SGD", sgd), ("ours", AccumOptimizer)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(23)
            params, emb, lin = _embedding_model()
        start = values(params)
        opt = make(params, **options(option))
        try:
            for _ in range(3):
                opt.zero_grad()
                lin(emb(idx)).pow(2).sum().backward()
                opt.step()
            outcome[name] = ("stepped", values(params))
        except RuntimeError as e:
            outcome[name] = ("refused", str(e))
            if name == "ours":
                assert_same(values(params), start, "params after the refusal", rtol=0, atol=0)
    assert outcome["ours"][0] == outcome["SGD"][0]
    if outcome["SGD"][0] == "stepped":
        assert_same(outcome["ours"][1], outcome["SGD"][1], "params")
    else:
        assert options(option).get("weight_decay", 0) != 0
        assert "sparse" in outcome["ours"][1] and "weight_decay" in outcome["ours"][1]


def _objective_grad(v: torch.Tensor) -> torch.Tensor:
    """Gradient of f(a, b) = 2 (a - 0.5)^2 + (b + a)^2 + 0.5 a^4."""
    a, b = v.detach().double()
    return torch.stack([4 * (a - 0.5) + 2 * (b + a) + 2 * a**3, 2 * (b + a)])


def _coordinate_grad(v: torch.Tensor, coord: int, sparse: bool) -> torch.Tensor:
    """The gradient's ``coord`` entry only; sparse: split over two entries of
    the same index (uncoalesced), 30% and 70%."""
    g = _objective_grad(v)[coord]
    if not sparse:
        dense = torch.zeros(2, dtype=torch.float64)
        dense[coord] = g
        return dense.to(v.dtype)
    values_ = torch.stack([0.3 * g, 0.7 * g]).to(v.dtype)
    return torch.sparse_coo_tensor(torch.tensor([[coord, coord]]), values_, (2,), check_invariants=True)


SPARSE_SETTINGS = {
    "plain": dict(lr=0.02),
    "momentum": dict(lr=0.02, momentum=0.8),
    "momentum-dampening": dict(lr=0.02, momentum=0.8, dampening=0.4),
}


@pytest.mark.usefixtures("single_thread")  # dense.add_(sparse) on 2 elements: ~ms with 2 threads, us with one
@pytest.mark.parametrize("scheduled", [False, True], ids=["fixed-lr", "StepLR"])
@pytest.mark.parametrize("setting", list(SPARSE_SETTINGS))
def test_uncoalesced_sparse_grads_act_like_dense(setting, scheduled):
    """Coordinate descent on a smooth 2-d objective, a float32 and a float64
    copy of the point in one optimizer, the coordinates taking turns: with
    uncoalesced sparse grads, ours equals SGD bit for bit at every step,
    stays within 5e-6 of our run with dense grads, and nears the minimum."""
    kw = SPARSE_SETTINGS[setting]
    start = torch.tensor([1.25, 0.75])

    def make_point():
        return [nn.Parameter(start.clone()), nn.Parameter(start.double())]

    runs = {}
    for name, make, sparse in (("SGD", sgd, True), ("ours", AccumOptimizer, True), ("dense", AccumOptimizer, False)):
        pts = make_point()
        opt = make(pts, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.7) if scheduled else None
        runs[name] = (pts, opt, sched, sparse)
    root = 0.45339765  # a^3 + 2a - 1 = 0: the minimum is at (root, -root)
    minimum = torch.tensor([root, -root], dtype=torch.float64)
    far = (start.double() - minimum).norm()
    for step in range(160):
        for pts, opt, sched, sparse in runs.values():
            opt.zero_grad()
            for p in pts:
                p.grad = _coordinate_grad(p, step % 2, sparse)
            opt.step()
            if sched is not None:
                sched.step()
        assert_same(values(runs["ours"][0]), values(runs["SGD"][0]), f"step {step}: ours vs SGD")
        assert_same(values(runs["ours"][0]), values(runs["dense"][0]), f"step {step}: sparse vs dense",
                    rtol=5e-6, atol=5e-6)
    for p in runs["ours"][0]:
        assert (p.detach().double() - minimum).norm() < 0.25 * far

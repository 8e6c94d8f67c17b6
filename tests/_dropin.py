"""Shared pieces of the tests/test_dropin_*.py modules.

Those modules check what a drop-in replacement for ``torch.optim.SGD`` owes
its users. Most of them run the same script twice, once on
``torch.optim.SGD`` (its default single-tensor path, ``foreach=False``) and
once on ``AccumOptimizer``, and compare what comes out.

How close "the same" is: float32 and float64 results must agree bit for bit
(README, Parity), because the kernels round exactly as torch's op chain does.
That holds where both sides run their vectorised kernels (torch's AVX2/AVX512
builds with fused multiply-adds, and our AVX2 build); where either side is
forced onto its baseline build, only torch's default float tolerances are
promised. Complex params: SGD runs complex arithmetic, which rounds a*b+c
differently from the fused multiply-add the real view gets, so complex results
are held to torch's default tolerances against SGD (and bit for bit against
our own update of the real view). Half types are compared with explicit
tolerances by the tests that use them: AccumOptimizer computes their update
in float32 where torch's default path computes in the half type.

Only the public surface of torch_fastaccum is used here.
"""

from __future__ import annotations

import copy
import io
import os
from typing import Callable, Sequence

import torch
from torch import nn

from torch_fastaccum import AccumOptimizer

# The modules driven by torch's SGD option matrix (tests/_sgd_matrix.py) need
# torch's test helpers, which import expecttest and numpy. The GPU machines
# have no network to install them (`make test` does): those modules then skip,
# naming themselves and this reason, instead of failing collection.
MATRIX_MODULE = "torch.testing._internal.common_optimizers"
MATRIX_REASON = (
    "the SGD option matrix comes from torch's test helpers, which need expecttest and numpy "
    "(make test installs them)"
)

EXACT = (
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and os.environ.get("FASTACCUM_CPU_CAPABILITY", "").strip().lower() != "default"
)

BITWISE_DTYPES = (torch.float32, torch.float64)


def sgd(params, **kwargs) -> torch.optim.SGD:
    """The reference: torch's SGD on its single-tensor path."""
    kwargs.setdefault("foreach", False)
    return torch.optim.SGD(params, **kwargs)


def assert_same(actual, expected, what: str = "value", rtol: float | None = None, atol: float | None = None):
    """``actual`` equals ``expected``: tensors (also inside lists, tuples and
    dicts) of the same dtype, shape and device, with equal values: bit for
    bit for float32/float64 where EXACT, else within torch's default
    tolerance for the dtype; NaNs equal NaNs. ``rtol`` / ``atol`` (both or
    neither) set the tolerance instead."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor), (
            f"{what}: {type(actual).__name__} vs {type(expected).__name__}"
        )
        a, e = actual.detach(), expected.detach()
        assert (a.dtype, a.shape, a.device) == (e.dtype, e.shape, e.device), (
            f"{what}: {a.dtype}{tuple(a.shape)}@{a.device} vs {e.dtype}{tuple(e.shape)}@{e.device}"
        )
        if a.is_sparse:
            a, e = a.coalesce().to_dense(), e.coalesce().to_dense()
        if a.device.type == "meta":
            return
        if rtol is None and a.dtype in BITWISE_DTYPES and EXACT:
            rtol = atol = 0.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{what}: keys {sorted(map(str, actual))} vs {sorted(map(str, expected))}"
        )
        for k in expected:
            assert_same(actual[k], expected[k], f"{what}[{k!r}]", rtol, atol)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (
            f"{what}: {actual!r} vs {expected!r}"
        )
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]", rtol, atol)
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def assert_same_settings(group: dict, ref_group: dict) -> None:
    """A param group of ours holds every setting of the SGD group ``ref_group``
    with the same value (``params`` aside; ``foreach`` aside too, as the
    reference is built with foreach=False)."""
    keys = set(ref_group) - {"params", "foreach"}
    assert_same({k: group.get(k, "<missing>") for k in keys}, {k: ref_group[k] for k in keys}, "group settings")


def half_tolerance(dtype: torch.dtype, factor: float = 1.0) -> dict:
    """torch.testing's default tolerances for ``dtype``, times ``factor``."""
    rtol, atol = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}[dtype]
    return dict(rtol=rtol * factor, atol=atol * factor)


def half_step_tolerance(dtype, exact: bool = EXACT):
    """Our half step against SGD's float32 step rounded to the half type: the
    same float32 values, so the same bits where the float32 results agree
    bit for bit (``exact``); else within one unit in the last place of
    ``dtype`` (two near the bottom of a binade)."""
    if exact:
        return dict(rtol=0.0, atol=0.0)
    return dict(rtol=2.0 ** (-9 if dtype == torch.float16 else -6), atol=1e-6)


def fresh(kwargs: dict) -> dict:
    """A private copy of optimizer kwargs (a tensor lr is mutable)."""
    return copy.deepcopy(kwargs)


def twin_params(make: Callable[[], Sequence[torch.Tensor]]):
    """Two independent, identical parameter lists from one seeded factory."""
    out = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(20251)
            out.append(list(make()))
    return out


def feed(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Give each param a private copy of its grad (None: no grad)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def buffers(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list:
    """Each param's momentum buffer, or None."""
    return [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]


def values(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def through_bytes(obj, weights_only: bool = True):
    """``obj`` after torch.save and torch.load, as a new process would see it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def without_keys(group: dict, *keys: str) -> dict:
    return {k: v for k, v in group.items() if k not in keys}


class Pair:
    """A torch.optim.SGD and an AccumOptimizer over twin copies of the same
    params, fed the same gradients. ``ours_kwargs`` add to (or override) the
    shared kwargs on our side only."""

    def __init__(self, make, kwargs: dict, ours_kwargs: dict | None = None, groups=None):
        self.ref_params, self.params = twin_params(make)
        if groups is None:
            ref_arg, our_arg = self.ref_params, self.params
        else:
            ref_arg, our_arg = groups(self.ref_params), groups(self.params)
        self.ref = sgd(ref_arg, **fresh(kwargs))
        self.ours = AccumOptimizer(our_arg, **fresh(kwargs), **(ours_kwargs or {}))

    def step(self, grads) -> None:
        feed(self.ref_params, grads)
        feed(self.params, grads)
        self.ref.step()
        self.ours.step()

    def check(self, what: str = "", **tol) -> None:
        assert_same(values(self.params), values(self.ref_params), f"{what} params", **tol)
        assert_same(
            buffers(self.ours, self.params), buffers(self.ref, self.ref_params), f"{what} momentum buffers", **tol
        )


class Float32Shadow:
    """The reference for half-precision params: torch's SGD on float32 copies.
    Before each step it takes over our params, momentum buffers and grads
    (upcast), so that each of our steps is compared with SGD's float32 step
    from the same point, rounded to the half type."""

    def __init__(self, params, kwargs):
        self.ours = list(params)
        self.shadow = [nn.Parameter(p.detach().float()) for p in self.ours]
        self.opt = sgd(self.shadow, **kwargs)

    def step(self, ours_opt):
        with torch.no_grad():
            for p, s, b in zip(self.ours, self.shadow, buffers(ours_opt, self.ours)):
                s.copy_(p.float())
                s.grad = None if p.grad is None else p.grad.float()
                if b is not None:
                    self.opt.state[s]["momentum_buffer"] = b.float()
        self.opt.step()

    def expected(self):
        dt = self.ours[0].dtype
        return values([s.to(dt) for s in self.shadow]), [
            None if b is None else b.to(dt) for b in buffers(self.opt, self.shadow)
        ]


def random_grads(params, gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    """Fresh grads shaped (and typed) like ``params``, from ``gen``."""
    out = []
    for p in params:
        real = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
        g = torch.randn(real.shape, generator=gen, dtype=torch.float64) * scale
        g = g.to(real.dtype)
        out.append(torch.view_as_complex(g) if p.is_complex() else g)
    return out


class SmallNet(nn.Module):
    """A few hundred parameters: two linear layers and a 0-dim output gain."""

    def __init__(self, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.gain = nn.Parameter(torch.tensor(0.75))
        self.to(dtype=dtype, device=device)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x))) * self.gain


def small_net_pair(dtype=torch.float32, device="cpu", seed: int = 7):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallNet(dtype=dtype, device=device)
    return net, copy.deepcopy(net)


def net_batch(dtype=torch.float32, device="cpu", seed: int = 3, rows: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=g).to(dtype=dtype, device=device)
    y = torch.randn(rows, 3, generator=g).to(dtype=dtype, device=device)
    return x, y


def net_loss(net, x, y):
    return (net(x) - y).pow(2).mean()


def train(opt, net, batches) -> None:
    """One zero_grad / backward / step per (x, y) batch."""
    for x, y in batches:
        opt.zero_grad()
        net_loss(net, x, y).backward()
        opt.step()

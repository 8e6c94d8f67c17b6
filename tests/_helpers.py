"""Shared models, data and the two training loops the parity tests compare.

* ``run_ours``   : AccumOptimizer (+ torch_fastaccum.GradScaler): the user calls
  ``zero_grad(); backward(); step()`` (scaler: ``scale/step/update``) on EVERY
  micro-batch and does not divide the loss.
* ``run_ref``    : torch.optim.SGD on its default (single-tensor, foreach=False)
  path (+ torch.amp.GradScaler): ``(loss / K).backward()`` and
  step/update/zero_grad only every K-th micro-batch: the loop whose results
  ours must reproduce.

Both loops take the same model copy, the same micro-batches and the same
fault-injection plan, and return a ``Trace`` (scale history, skip decisions, the
unscaled gradients seen before clipping) so tests can compare them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_fastaccum import AccumOptimizer, GradScaler

# The parity rule: fp32 parameters agree with the reference loop to rtol 1e-5 /
# atol 1e-6 after 100 updates.
RTOL = 1e-5
ATOL = 1e-6

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
# Core parity tests are parametrized over these; the cuda case skips visibly.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


# --------------------------------------------------------------------------
# models and data (random, seeded, never zeros)
# --------------------------------------------------------------------------


def make_mlp(seed: int = 0, dtype=torch.float32, device="cpu", d_in=10, hidden=16, d_out=3) -> nn.Module:
    """A tiny smooth MLP (tanh) -- a few hundred parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    return m.to(device=device, dtype=dtype)


def make_cnn(seed: int = 0, dtype=torch.float32, device="cpu") -> nn.Module:
    """A small CIFAR-style CNN for 3x16x16 inputs (conv/pool/conv/pool/linear)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )
    return m.to(device=device, dtype=dtype)


class Fp16Autocast(nn.Module):
    """fp32 master weights, fp16 compute (CPU autocast): the scaled backward
    overflows fp16 on its own once the scale grows too large."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.float16):
            return self.m(x)


def make_model(kind: str, seed: int = 0, dtype=torch.float32, device="cpu") -> nn.Module:
    return {"mlp": make_mlp, "cnn": make_cnn}[kind](seed=seed, dtype=dtype, device=device)


def make_batches(kind: str, n: int, seed: int = 1, dtype=torch.float32, device="cpu", batch=None):
    """``n`` micro-batches (x, y) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "mlp":
            b = batch or 8
            x = torch.randn(b, 10, generator=g)
            y = torch.randn(b, 3, generator=g)
            out.append((x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)))
        elif kind == "cnn":
            b = batch or 4
            x = torch.randn(b, 3, 16, 16, generator=g)
            y = torch.randint(0, 10, (b,), generator=g)
            out.append((x.to(device=device, dtype=dtype), y.to(device=device)))
        else:
            raise ValueError(kind)
    return out


def loss_fn_for(kind: str):
    return F.mse_loss if kind == "mlp" else F.cross_entropy


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor], rtol=RTOL, atol=ATOL, msg=""):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, nn.Parameter):
            x = x.detach()
        if isinstance(y, nn.Parameter):
            y = y.detach()
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{msg} param {i}: {m}")


def assert_params_changed(before, model):
    """Guards against vacuous parity: training must have moved the parameters."""
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), before))
    assert moved > 1e-4, f"parameters barely moved ({moved}); the parity check would be vacuous"


# --------------------------------------------------------------------------
# the two loops
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Trace:
    # one entry per boundary (K micro-batches): (scale after update, growth tracker)
    scales: list = dataclasses.field(default_factory=list)
    # one entry per boundary: whether the update was skipped (found inf/NaN)
    skipped: list = dataclasses.field(default_factory=list)
    # one entry per boundary when clip is set: unscaled grads right after unscale_
    unscaled_grads: list = dataclasses.field(default_factory=list)
    # ours only: scale observed after every micro-batch update()
    micro_scales: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    # one entry per boundary: .grad right after the step (None where unset)
    grads_after: list = dataclasses.field(default_factory=list)
    # one entry per boundary when clipping: the total norm clip_grad_norm_ returned
    norms: list = dataclasses.field(default_factory=list)


def _inject(model, i, inject, where):
    """Fault injection for micro-batch ``i``: ``inject`` maps i -> kind."""
    kind = inject.get(i) if inject else None
    if kind not in ("inf", "-inf", "nan") or where != "grad":
        return
    p = next(model.parameters())
    val = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}[kind]
    with torch.no_grad():
        p.grad.view(-1)[0] = val


def _grads(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _loss(model, x, y, loss_fn, sign, i, inject, autocast=None, penalty=None):
    if autocast is None:
        loss = loss_fn(model(x), y) * sign
    else:
        with torch.autocast(x.device.type, dtype=autocast):
            loss = loss_fn(model(x), y) * sign
    if penalty is not None:
        loss = loss + penalty(model)
    kind = inject.get(i) if inject else None
    if kind == "loss_inf":
        loss = loss * float("inf")
    elif kind == "loss_nan":
        loss = loss * float("nan")
    return loss


def _record_scale(trace, scaler, before):
    after = scaler.get_scale()
    trace.scales.append((after, scaler._get_growth_tracker()))
    # torch's update() halves the scale exactly when the step was skipped
    trace.skipped.append(after < before)


def run_ours(
    model: nn.Module,
    batches,
    K: int,
    opt: AccumOptimizer | None = None,
    *,
    opt_kwargs: dict | None = None,
    scaler: GradScaler | None = None,
    loss_fn: Callable = F.mse_loss,
    sign: float = 1.0,
    inject: dict | None = None,
    clip: float | None = None,
    fused_clip: bool = False,
    clip_norm_type: float = 2.0,
    scheduler_fn: Callable | None = None,
    before_micro: Callable | None = None,
    trace: Trace | None = None,
    start: int = 0,
    autocast: torch.dtype | None = None,
    penalty: Callable | None = None,
):
    """AccumOptimizer loop: every micro-batch zero_grad/backward/step, loss not divided.

    ``start`` is the global index of batches[0] (for resumed runs). ``autocast``:
    the forward's autocast dtype; ``penalty(model)`` is added to every loss.
    Clipping: with a scaler ``scaler.unscale_`` and torch's clip_grad_norm_,
    or with ``fused_clip`` ``scaler.clip_grad_norm_``; without one
    ``opt.clip_grad_norm_`` (fused too)."""
    if opt is None:
        opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **(opt_kwargs or {}))
    sched = scheduler_fn(opt) if scheduler_fn else None
    trace = trace if trace is not None else Trace()
    for j, (x, y) in enumerate(batches):
        i = start + j
        boundary = (i + 1) % K == 0
        assert opt.is_accumulation_boundary == boundary, f"micro-batch {i}: is_accumulation_boundary wrong"
        if before_micro:
            before_micro(i, model, opt)
        opt.zero_grad()
        with opt.accumulate(model):
            loss = _loss(model, x, y, loss_fn, sign, i, inject, autocast, penalty)
            trace.losses.append(loss.item())
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        _inject(model, i, inject, "grad")
        if scaler is not None:
            before = scaler.get_scale()
            if clip is not None and opt.is_accumulation_boundary and fused_clip:
                trace.norms.append(scaler.clip_grad_norm_(opt, clip, clip_norm_type))
            elif clip is not None and opt.is_accumulation_boundary:
                scaler.unscale_(opt)
                trace.unscaled_grads.append([p.grad.detach().clone() for p in model.parameters()])
                trace.norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, clip_norm_type))
            scaler.step(opt)
            scaler.update()
            trace.micro_scales.append(scaler.get_scale())
            if boundary:
                _record_scale(trace, scaler, before)
            else:
                # Non-boundary step/update change nothing: the scale is fixed
                # within a window (GradScaler docstring).
                assert scaler.get_scale() == before, f"scale changed inside a window at micro-batch {i}"
        else:
            if clip is not None and opt.is_accumulation_boundary:
                trace.norms.append(opt.clip_grad_norm_(clip, clip_norm_type))
            opt.step()
        if boundary:
            trace.grads_after.append(_grads(model))
        if boundary and sched is not None:
            sched.step()
    return opt, trace


def run_ref(
    model: nn.Module,
    batches,
    K: int,
    opt: torch.optim.Optimizer | None = None,
    *,
    opt_kwargs: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
    loss_fn: Callable = F.mse_loss,
    sign: float = 1.0,
    inject: dict | None = None,
    clip: float | None = None,
    clip_norm_type: float = 2.0,
    scheduler_fn: Callable | None = None,
    trace: Trace | None = None,
    start: int = 0,
    autocast: torch.dtype | None = None,
    penalty: Callable | None = None,
):
    """Reference: torch.optim.SGD default path, ``(loss / K).backward()``,
    step (+ scaler step/update) and zero_grad only at boundaries."""
    if opt is None:
        kw = dict(opt_kwargs or {})
        kw.setdefault("foreach", False)
        opt = torch.optim.SGD(model.parameters(), **kw)
    sched = scheduler_fn(opt) if scheduler_fn else None
    trace = trace if trace is not None else Trace()
    for j, (x, y) in enumerate(batches):
        i = start + j
        boundary = (i + 1) % K == 0
        loss = _loss(model, x, y, loss_fn, sign, i, inject, autocast, penalty)
        trace.losses.append(loss.item())
        loss = loss / K
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        _inject(model, i, inject, "grad")
        if boundary:
            if scaler is not None:
                before = scaler.get_scale()
                if clip is not None:
                    scaler.unscale_(opt)
                    trace.unscaled_grads.append([p.grad.detach().clone() for p in model.parameters()])
                    trace.norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, clip_norm_type))
                scaler.step(opt)
                scaler.update()
                _record_scale(trace, scaler, before)
            else:
                if clip is not None:
                    trace.norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, clip_norm_type))
                opt.step()
            trace.grads_after.append(_grads(model))
            opt.zero_grad()
            if sched is not None:
                sched.step()
    return opt, trace


def parity_pair(kind="mlp", seed=0, dtype=torch.float32, device="cpu"):
    """Two identical copies of a model."""
    m = make_model(kind, seed=seed, dtype=dtype, device=device)
    return m, copy.deepcopy(m)

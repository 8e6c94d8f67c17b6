"""Parity: the same CNN trained from one seed by the reference PyTorch loop
(torch.optim.SGD + torch.amp.GradScaler, loss / K, step every K) and by
AccumOptimizer + torch_fastaccum.GradScaler, with injected overflows.

The data are learnable (benchmarks/models.py: a class pattern plus noise,
20% of the labels redrawn at random), so the loss falls from ln 10 ~ 2.30
towards ~0.9 instead of sitting at chance level, and the gradients the two
loops must agree on stay large throughout."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from torch_fastaccum import AccumOptimizer, GradScaler

from .models import Net, synthetic_batches


def run_parity(updates: int, k: int, overflow_at: list[int], device: str, progress=None,
               deadline: float | None = None, clock=time.perf_counter, threads: int | None = 1) -> dict:
    """Both loops on the same micro-batches; the verdict compares parameters,
    skip decisions and scale histories. With a `deadline` (a `clock` value)
    the run stops at the end of the first window that ends past it and judges
    the windows it ran ("updates" < "updates_planned", "cut_by_budget").

    `threads`: torch's intra-op threads during the run (restored after; None
    keeps the current number). One by default: both loops see the same number
    whatever it is, and a CNN this small gains nothing from more, while on a
    busy 2-core machine two OpenMP threads made this stage ~15x slower
    (waiting at barriers for a core)."""
    before = torch.get_num_threads()
    if threads is not None and device == "cpu":
        torch.set_num_threads(threads)
    try:
        out = _run_parity(updates, k, overflow_at, device, progress, deadline, clock)
    finally:
        torch.set_num_threads(before)
    out["threads"] = threads if threads is not None and device == "cpu" else before
    return out


def _run_parity(updates, k, overflow_at, device, progress, deadline, clock) -> dict:
    if device == "cuda":
        # Both loops must see the same gradients: nondeterministic conv-backward
        # algorithms would make the comparison measure cuDNN, not this package.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    ref_model = Net().to(device)
    our_model = copy.deepcopy(ref_model)
    hyper = dict(lr=0.02, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True)
    ref_opt = torch.optim.SGD(ref_model.parameters(), **hyper)
    our_opt = AccumOptimizer(our_model.parameters(), accumulation_steps=k, **hyper)
    scaler_kw = dict(init_scale=2.0**12, growth_interval=20)
    ref_scaler = torch.amp.GradScaler(device, **scaler_kw)
    our_scaler = GradScaler(device, **scaler_kw)
    loss_fn = nn.CrossEntropyLoss()
    data = synthetic_batches(updates * k, 16, seed=1)
    overflow = set(overflow_at)
    rec = {"ref_loss": [], "our_loss": [], "ref_skipped": [], "our_skipped": [], "ref_scale": [], "our_scale": [],
           "param_diff": []}
    window_ref, window_our = 0.0, 0.0
    for i, (x, y) in enumerate(data):
        x, y = x.to(device), y.to(device)
        boom = float("inf") if i in overflow else 1.0
        # Reference: loss / K, step and update at the window's end.
        ref_loss = loss_fn(ref_model(x), y)
        ref_scaler.scale(ref_loss * boom / k).backward()
        # Ours: the same micro-batch, every call on every micro-batch.
        boundary = our_opt.is_accumulation_boundary
        our_before = our_scaler.get_scale()
        our_opt.zero_grad()
        our_loss = loss_fn(our_model(x), y)
        our_scaler.scale(our_loss * boom).backward()
        our_scaler.step(our_opt)
        our_scaler.update()
        window_ref += ref_loss.item() / k
        window_our += our_loss.item() / k
        if (i + 1) % k == 0:
            before = ref_scaler.get_scale()
            ref_scaler.step(ref_opt)
            ref_scaler.update()
            ref_opt.zero_grad()
            rec["ref_skipped"].append(ref_scaler.get_scale() < before)
            rec["ref_scale"].append(ref_scaler.get_scale())
            rec["our_scale"].append(our_scaler.get_scale())
            assert boundary, "AccumOptimizer's window disagrees with the reference loop"
            rec["our_skipped"].append(our_scaler.get_scale() < our_before)
            rec["ref_loss"].append(window_ref)
            rec["our_loss"].append(window_our)
            rec["param_diff"].append(_max_abs_diff(ref_model, our_model))
            window_ref = window_our = 0.0
            if progress:
                progress(len(rec["ref_loss"]), updates)
            if deadline is not None and len(rec["ref_loss"]) < updates and clock() > deadline:
                break
    done = len(rec["ref_loss"])
    micro_batches = done * k
    max_diff = _max_abs_diff(ref_model, our_model)
    bitwise = all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), our_model.parameters()))
    max_abs = max(a.abs().max().item() for a in ref_model.parameters())
    loss_diff = max(abs(a - b) for a, b in zip(rec["ref_loss"], rec["our_loss"]))
    out = {
        "updates": done,
        "accumulation_steps": k,
        "micro_batches": micro_batches,
        # (a run cut by the budget lists the overflows it reached)
        "overflow_micro_batches": sorted(i for i in overflow if deadline is None or i < micro_batches),
        "max_param_abs_diff": max_diff,
        "params_bitwise_identical": bitwise,
        "max_param_abs": max_abs,
        "skips_identical": rec["ref_skipped"] == rec["our_skipped"],
        "skipped_windows": sum(rec["ref_skipped"]),
        "skipped_window_indices": [i for i, s in enumerate(rec["ref_skipped"]) if s],
        "scale_history_identical": rec["ref_scale"] == rec["our_scale"],
        "final_scale": rec["our_scale"][-1],
        "max_loss_curve_diff": loss_diff,
        "ref_loss": rec["ref_loss"],
        "our_loss": rec["our_loss"],
        "param_diff_per_update": rec["param_diff"],  # max |param diff| after each update
        "data": "learnable synthetic CIFAR-shaped images (class pattern + noise, 20% labels random), seed 1",
        "pass": (
            rec["ref_skipped"] == rec["our_skipped"]
            and rec["ref_scale"] == rec["our_scale"]
            and max_diff <= 1e-6 + 1e-5 * max_abs
        ),
    }
    if deadline is not None:
        out.update(updates_planned=updates, cut_by_budget=done < updates)
    return out


def _max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))

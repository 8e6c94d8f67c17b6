"""Shared by tests/test_checkpoint_resume.py and the fresh process it starts
(tests/_resume_worker.py): the run configuration and the training loop, so the
resumed run executes exactly the same code as the uninterrupted one.

A position in the loop is (i, phase): micro-batch i, and
* "before_zero_grad": micro-batches 0..i-1 are complete (step + update done);
* "before_step": micro-batch i has also done zero_grad + backward (+ fault),
  its step/update not yet.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _helpers import make_batches, make_mlp  # noqa: E402

K = 4
WINDOWS = 6
N = K * WINDOWS
OPT_KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False)
SCALER_KW = dict(init_scale=2.0**10, growth_interval=2)
HIDDEN = 32
SEED_MODEL, SEED_DATA = 21, 22
# inf in a grad: window 0 (skipped first window: momentum stays uninitialised)
# and window 3 (micro-batch 1 of it)
FAULTS = {1: "inf", 3 * K + 1: "nan"}
PHASES = ("before_zero_grad", "before_step")


def make_model(seed=SEED_MODEL):
    return make_mlp(seed=seed, hidden=HIDDEN)


def data():
    return make_batches("mlp", N, seed=SEED_DATA)


def build(model):
    from torch_fastaccum import AccumOptimizer, GradScaler

    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **OPT_KW)
    scaler = GradScaler("cpu", **SCALER_KW)
    return opt, scaler


def checkpoint(model, opt, scaler):
    return {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
    }


def restore(ckpt, model, opt, scaler):
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    scaler.load_state_dict(ckpt["scaler"])
    for p, g in zip(model.parameters(), ckpt["grads"]):
        p.grad = None if g is None else g.clone()


def train(model, opt, scaler, batches, start=(0, "before_zero_grad"), on_position=None, trace=None):
    """Run from position ``start`` to the end. ``on_position(i, phase)`` is
    called at every position reached (the place to save a checkpoint).
    Returns the trace: per boundary, (scale, growth tracker, skipped)."""
    trace = [] if trace is None else trace
    i0, phase0 = start
    for i in range(i0, len(batches)):
        x, y = batches[i]
        resume_mid = i == i0 and phase0 == "before_step"
        if not resume_mid:
            if on_position:
                on_position(i, "before_zero_grad")
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            kind = FAULTS.get(i)
            if kind:
                with torch.no_grad():
                    next(model.parameters()).grad.view(-1)[0] = float(kind)
            if on_position:
                on_position(i, "before_step")
        boundary = opt.is_accumulation_boundary
        assert boundary == ((i + 1) % K == 0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if boundary:
            after = scaler.get_scale()
            trace.append((after, scaler._get_growth_tracker(), after < before))
    return trace


def final_state(model, opt, scaler, trace):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "trace": trace,
    }

"""One rank of the DDP test (tests/test_ddp.py), run as its own process:

    python tests/_ddp_worker.py --rank R --world 2 --port P --device cpu --out DIR

It joins a gloo process group on 127.0.0.1:P, runs every scenario in SCENARIOS
in order (DistributedDataParallel + AccumOptimizer [+ GradScaler]) and writes
its results to DIR/rank{R}.pt. Importing this module has no side effects: the
test imports SCENARIOS / the model and data builders from here, so the
single-process reference uses exactly the same configuration.

Data: micro-batch i of the global run is make_batches("mlp", ...)[i] (8
samples); rank r takes rows [4r, 4r + 4). The loss is the mean over the local
rows, so the DDP average of the two ranks' gradients is the gradient of the
mean loss over the whole micro-batch.

Clipping: a scenario with `clip` calls scaler.clip_grad_norm_(opt, clip,
clip_norm_type) (opt.clip_grad_norm_ without a scaler) at every boundary,
after the boundary's backward, and records the norms it returns.

Faults, keyed by global micro-batch index -> (rank, kind):
* ("grad_inf", r): after backward, rank r writes +inf into element 0 of the
  first parameter's .grad. Used only on non-boundary micro-batches, so the
  next all-reduce (at the boundary) carries it to every rank.
* ("loss_nan", r): rank r's loss is multiplied by NaN (all its grads NaN),
  also on a boundary micro-batch: the all-reduce of that backward spreads it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _helpers import make_batches, make_mlp  # noqa: E402
from _spawn import run_rank  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 8
HIDDEN = 32  # params: 10*32 + 32 + 32*3 + 3 = 451 floats in 4 tensors
# ~1 KB buckets: the 4 parameter tensors land in several DDP buckets, so
# "one round" (every bucket once) is distinguishable from "one bucket". (torch
# 2.13 starts with a single bucket unless find_unused_parameters=True, so the
# scenarios that check several buckets set it; accum_plain keeps the default.)
BUCKET_CAP_MB = 1000 / 2**20
SEED_MODEL = 11
SEED_DATA = 12

SCENARIOS = {
    # accumulate(): one all-reduce round per window; scaler; an inf on rank 0
    # in window 2 (micro-batch 0 of the window), a NaN loss on rank 1 at the
    # boundary micro-batch of window 4.
    "accum_scaler": dict(
        K=4, windows=7, accumulate=True, scaler=True, ddp=dict(find_unused_parameters=True),
        opt=dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        faults={2 * 4 + 0: ("grad_inf", 0), 4 * 4 + 3: ("loss_nan", 1)},
    ),
    # The same without accumulate(): K rounds per window (the counter can tell),
    # and still the same parameters (DDP all-reduces the accumulated .grad).
    "no_accum_scaler": dict(
        K=4, windows=7, accumulate=False, scaler=True, ddp=dict(find_unused_parameters=True),
        opt=dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        faults={2 * 4 + 0: ("grad_inf", 0), 4 * 4 + 3: ("loss_nan", 1)},
    ),
    # gradient_as_bucket_view=True: .grad are views into DDP's bucket buffers
    # (accumulated in place under no_sync); an inf on rank 1 in window 1.
    "accum_bucket_view": dict(
        K=3, windows=5, accumulate=True, scaler=True,
        ddp=dict(find_unused_parameters=True, gradient_as_bucket_view=True),
        opt=dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        faults={1 * 3 + 1: ("grad_inf", 1)},
    ),
    # No scaler, nesterov + maximize, K=3.
    "accum_plain": dict(
        K=3, windows=6, accumulate=True, scaler=False, ddp={},
        opt=dict(lr=0.02, momentum=0.8, nesterov=True, maximize=True, weight_decay=1e-3),
        faults={},
    ),
    # Fused clipping at every boundary, after the boundary's all-reduce:
    # scaler.clip_grad_norm_ (L2) with an inf on rank 0 in window 1, and
    # opt.clip_grad_norm_ (inf norm) without a scaler. `clip` is about the
    # median of the reference's window norms, so some windows clip.
    "accum_clip_scaler": dict(
        K=4, windows=8, accumulate=True, scaler=True, ddp=dict(find_unused_parameters=True),
        opt=dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        faults={1 * 4 + 1: ("grad_inf", 0)}, clip=0.67, clip_norm_type=2.0,
    ),
    "accum_clip_plain": dict(
        K=3, windows=6, accumulate=True, scaler=False, ddp={},
        opt=dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
        faults={}, clip=0.2, clip_norm_type=float("inf"),
    ),
}
SCALER_KW = dict(init_scale=2.0**10, growth_interval=2)


def make_model(device):
    return make_mlp(seed=SEED_MODEL, device=device, hidden=HIDDEN)


def make_data(n, device):
    return make_batches("mlp", n, seed=SEED_DATA, device=device, batch=GLOBAL_BATCH)


def local_rows(t, rank):
    per = t.shape[0] // WORLD
    return t[rank * per : (rank + 1) * per]


def run_scenario(name, cfg, rank, device):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torch_fastaccum import AccumOptimizer, GradScaler

    K = cfg["K"]
    n = K * cfg["windows"]
    model = make_model(device)
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB, **cfg["ddp"])
    current = {"micro": -1}
    calls = []  # (micro-batch, bucket index, is_last, numel)

    def counting_hook(state, bucket):
        calls.append((current["micro"], bucket.index(), bool(bucket.is_last()), bucket.buffer().numel()))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    opt = AccumOptimizer(ddp.parameters(), accumulation_steps=K, **cfg["opt"])
    scaler = GradScaler(device, **SCALER_KW) if cfg["scaler"] else None
    sync_flags = []  # require_backward_grad_sync seen inside the context, per micro-batch
    scales, skipped = [], []
    norms = []  # per window, with clip: what clip_grad_norm_ returned
    for i, (x, y) in enumerate(make_data(n, device)):
        current["micro"] = i
        boundary = (i + 1) % K == 0
        assert opt.is_accumulation_boundary == boundary
        fault = cfg["faults"].get(i)
        opt.zero_grad()
        if cfg["accumulate"]:
            ctx = opt.accumulate(ddp)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            sync_flags.append(bool(ddp.require_backward_grad_sync))
            loss = F.mse_loss(ddp(local_rows(x, rank)), local_rows(y, rank))
            if fault == ("loss_nan", rank):
                loss = loss * float("nan")
            (scaler.scale(loss) if scaler else loss).backward()
        if fault == ("grad_inf", rank):
            assert not boundary, "grad faults only before the boundary's all-reduce"
            with torch.no_grad():
                next(model.parameters()).grad.view(-1)[0] = float("inf")
        if boundary and cfg.get("clip") is not None:
            # The grads are all-reduced already: the local norm is the global one.
            clip_args = (cfg["clip"], cfg["clip_norm_type"])
            norm = scaler.clip_grad_norm_(opt, *clip_args) if scaler else opt.clip_grad_norm_(*clip_args)
            norms.append(norm.detach().cpu().clone())
        if scaler:
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if boundary:
                after = scaler.get_scale()
                scales.append((after, scaler._get_growth_tracker()))
                skipped.append(after < before)
            else:
                assert scaler.get_scale() == before
        else:
            opt.step()

    # An exception inside accumulate() on a non-boundary micro-batch must
    # leave DDP syncing again (no_sync's state restored).
    opt2 = AccumOptimizer(ddp.parameters(), accumulation_steps=2, lr=0.0)
    restored = None
    try:
        with opt2.accumulate(ddp):
            assert not ddp.require_backward_grad_sync
            raise KeyError("interrupt")
    except KeyError:
        restored = bool(ddp.require_backward_grad_sync)

    bucket_sizes = ddp._get_ddp_logging_data().get("bucket_sizes", "")
    dist.barrier()
    return dict(
        n_buckets=len([b for b in str(bucket_sizes).split(",") if b.strip()]),
        params=[p.detach().cpu().clone() for p in model.parameters()],
        momentum=[
            None if opt.state[p].get("momentum_buffer") is None else opt.state[p]["momentum_buffer"].detach().cpu().clone()
            for p in model.parameters()
        ],
        calls=calls,
        sync_flags=sync_flags,
        scales=scales,
        skipped=skipped,
        norms=norms,
        sync_restored_after_exception=restored,
        numel=sum(p.numel() for p in model.parameters()),
    )


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=WORLD)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    assert a.world == WORLD

    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(a.port)
    device = a.device
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo", rank=a.rank, world_size=a.world, timeout=datetime.timedelta(seconds=a.timeout)
    )
    try:
        results = {name: run_scenario(name, cfg, a.rank, device) for name, cfg in SCENARIOS.items()}
        torch.save(results, os.path.join(a.out, f"rank{a.rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(main)

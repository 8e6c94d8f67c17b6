"""End-to-end: time per micro-batch of the whole training loop (forward,
backward, scaler, optimizer) for the reference PyTorch loop and for ours,
run in alternating blocks so machine drift hits both alike."""

from __future__ import annotations

import time

import torch
from torch import nn

from torch_fastaccum import AccumOptimizer, GradScaler
from torch_fastaccum._ops import cuda_table_stats

from .models import Net, synthetic_batches
from .stats import summarize


def time_e2e(device: str, k: int, blocks: int, block_updates: int,
             deadline: float | None = None, clock=time.perf_counter, micro_batch: int = 64) -> dict:
    """Median ms per micro-batch of both loops over `blocks` timed blocks
    (and min, spread and the noisy flag of each loop: benchmarks/stats.py).

    With a `deadline` (a `clock` value) the warm-up block is timed first and
    only as many blocks as end before the deadline are timed; when not one
    fits, the result has "skipped" (the reason) and no timings."""
    data = [(x.to(device), y.to(device)) for x, y in synthetic_batches(k * block_updates, micro_batch, seed=3)]
    loss_fn = nn.CrossEntropyLoss()
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def reference():
        model = Net().to(device)
        opt = torch.optim.SGD(model.parameters(), **hyper)
        scaler = torch.amp.GradScaler(device)

        def run():
            for i, (x, y) in enumerate(data):
                scaler.scale(loss_fn(model(x), y) / k).backward()
                if (i + 1) % k == 0:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()

        return run

    def ours():
        model = Net().to(device)
        opt = AccumOptimizer(model.parameters(), accumulation_steps=k, **hyper)
        scaler = GradScaler(device)

        def run():
            for x, y in data:
                opt.zero_grad()
                scaler.scale(loss_fn(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()

        return run

    loops = {"torch_default": reference(), "fastaccum": ours()}
    samples = {name: [] for name in loops}
    # NOTE: [table cache] in csrc/cuda/launch_table.h: our loop zeroes with
    # set_to_none, so every window's backward allocates new grads; a pass
    # uploads its table again only when the caching allocator handed back
    # other addresses. Counted over the timed blocks.
    tables = {"uploads": 0, "hits": 0, "upload_bytes": 0}
    planned = blocks
    t_warm = clock()
    for b in range(planned + 1):
        if deadline is not None and b == 1:
            now = clock()
            per_block = now - t_warm  # the warm-up block: an upper bound of a timed one
            blocks = min(planned, int(max(0.0, deadline - now) // max(per_block, 1e-9)))
            if blocks < 1:
                return {"skipped": f"time budget: the warm-up block took {per_block:.1f} s and "
                                   f"{max(0.0, deadline - now):.1f} s were left",
                        "blocks_planned": planned, "blocks": 0}
        if b > blocks:
            break
        for name, run in loops.items():
            before = cuda_table_stats()
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            if b > 0:  # block 0 warms up
                samples[name].append((time.perf_counter() - t0) / len(data))
                after = cuda_table_stats()
                for key in tables:
                    tables[key] += after[key] - before[key]
    out = {"accumulation_steps": k, "micro_batch": micro_batch, "micro_batches_per_block": len(data),
           "blocks": blocks, "loops": {}}
    if deadline is not None:
        out.update(blocks_planned=planned, cut_by_budget=blocks < planned)
    for name, s in samples.items():
        st = summarize(s)  # per micro-batch, in ms
        out["loops"][name] = st
        out[name + "_ms_per_micro_batch"] = st["median_ms"]
        out[name + "_min_ms_per_micro_batch"] = st["min_ms"]
    out["noisy"] = any(st["noisy"] for st in out["loops"].values())
    if device == "cuda":
        out["launch_tables"] = dict(tables, updates=blocks * block_updates)
    out["speedup"] = out["torch_default_ms_per_micro_batch"] / out["fastaccum_ms_per_micro_batch"]
    return out

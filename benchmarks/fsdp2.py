"""FSDP2 step time: the updating optimizer step with a GradScaler on a model
sharded with fully_shard over 2 ranks (gloo, CPU, one thread per rank),
path against path in one run.

    python -m benchmarks.fsdp2 [--quick] [--params N] [--tensors T] [--repeats R]

Paths (momentum 0.9, weight_decay 1e-4, lr 1e-3, K = 1; grads made once by
a backward and kept):

* torch_default: ``torch.optim.SGD`` (foreach=None: on the CPU its
  per-tensor loop, each op dispatched through DTensor) + ``torch.amp.GradScaler``;
* torch_foreach: the same with ``foreach=True``;
* fastaccum: ``AccumOptimizer`` + ``torch_fastaccum.GradScaler``.

Each timed round runs every path once (round-robin), each step between two
barriers, so a sample is one rank's wall time of ``scaler.step(opt);
scaler.update()``. The scale is 1 with no growth: the grads stay what they
are while every path still unscales them. GB/s counts the minimum traffic
of the local shard, 24 B per fp32 parameter (grad read twice, param and
momentum read and written); the default ``.grad`` write-back adds 4 B that
is not counted. Writes results/fsdp2-cpu-<date>.json and .md (rank 0's
samples; every rank's medians in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import socket
import sys
import time

import torch

PATHS = ("torch_default", "torch_foreach", "fastaccum")
BYTES_PER_PARAM = 24


def _model(n_params: int, n_tensors: int):
    # Square Linear layers (weight and bias): n_tensors / 2 of them.
    layers = max(1, n_tensors // 2)
    width = max(8, int((n_params / layers) ** 0.5))
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, width


def _make(path: str, model):
    from torch_fastaccum import AccumOptimizer, GradScaler

    kw = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler_kw = dict(init_scale=1.0, growth_interval=10**9)
    if path == "fastaccum":
        return AccumOptimizer(model.parameters(), **kw), GradScaler("cpu", **scaler_kw)
    foreach = True if path == "torch_foreach" else None
    return torch.optim.SGD(model.parameters(), foreach=foreach, **kw), torch.amp.GradScaler("cpu", **scaler_kw)


def _updates(model, opt, scaler) -> bool:
    """Whether one step of a path changes the local shards (no path may time
    a no-op, e.g. a step skipped on inf or one that only counts)."""
    before = [p.to_local().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    return all(not torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()) if b.numel())


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=300))
    try:
        model, width = _model(args.params, args.tensors)
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model(torch.randn(4, width)).square().mean().backward()
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        pairs = {path: _make(path, model) for path in PATHS}
        for _, scaler in pairs.values():
            scaler.scale(torch.ones(()))  # makes the scale tensor
        updates = {path: _updates(model, *pairs[path]) for path in PATHS}
        samples = {path: [] for path in PATHS}
        gc.disable()
        for r in range(args.warmup + args.repeats):
            for path in PATHS:
                opt, scaler = pairs[path]
                dist.barrier()
                t0 = time.perf_counter()
                scaler.step(opt)
                scaler.update()
                t1 = time.perf_counter()
                dist.barrier()
                if r >= args.warmup:
                    samples[path].append(t1 - t0)
            if rank == 0:
                sys.stderr.write(f"\rround {r + 1}/{args.warmup + args.repeats}")
                sys.stderr.flush()
        gc.enable()
        if rank == 0:
            sys.stderr.write("\n")
        torch.save(dict(samples=samples, updates=updates, local_numel=local_numel,
                        n_tensors=sum(1 for _ in model.parameters())), os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _report(args, ranks, stem: str, started) -> str:
    from .meta import machine, run_info
    from .stats import SPREAD_DEFINITION, summarize

    r0 = ranks[0]
    rows = {}
    for path in PATHS:
        s = summarize(r0["samples"][path])
        s["gbps_min_bytes"] = BYTES_PER_PARAM * r0["local_numel"] / (s["median_ms"] / 1e3) / 1e9
        s["median_ms_per_rank"] = [summarize(r["samples"][path])["median_ms"] for r in ranks]
        s["updates_params"] = all(r["updates"][path] for r in ranks)
        rows[path] = s
    base = rows["fastaccum"]["median_ms"]
    for path in PATHS:
        rows[path]["median_over_fastaccum"] = rows[path]["median_ms"] / base
    result = dict(run=run_info(sys.argv[1:], args, started), machine=machine("cpu"), world=len(ranks),
                  local_params=r0["local_numel"], tensors=r0["n_tensors"], bytes_per_param=BYTES_PER_PARAM,
                  spread_definition=SPREAD_DEFINITION, paths=rows)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    m = result["machine"]
    lines = [
        f"# FSDP2 optimizer step, {len(ranks)} ranks (gloo, CPU)",
        "",
        f"{m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, one thread per rank; "
        f"{r0['n_tensors']} tensors, {r0['local_numel']:,} fp32 params per rank; "
        f"{args.repeats} timed rounds after {args.warmup} warm-up; rank 0's samples.",
        "",
        "| path | min ms | median ms | spread | x fastaccum | GB/s (24 B/param) | median ms per rank |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for path in PATHS:
        s = rows[path]
        noisy = " (noisy)" if s["noisy"] else ""
        per_rank = ", ".join(f"{v:.2f}" for v in s["median_ms_per_rank"])
        lines.append(f"| {path} | {s['min_ms']:.2f} | {s['median_ms']:.2f}{noisy} | {s['spread']:.2f} | "
                     f"{s['median_over_fastaccum']:.2f} | {s['gbps_min_bytes']:.2f} | {per_rank} |")
    lines += ["", f"spread = {SPREAD_DEFINITION}; x fastaccum = median / fastaccum's median."]
    text = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=8_000_000, help="total parameters (default 8M)")
    ap.add_argument("--tensors", type=int, default=32, help="parameter tensors (default 32)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1M params, 10 rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.repeats = 1_000_000, 10
    import tempfile

    import torch.multiprocessing as mp

    from .meta import unique_stem

    started = dt.datetime.now()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(2, port, args, tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    os.makedirs(args.out, exist_ok=True)
    stem = unique_stem(args.out, f"fsdp2-cpu-{started.date().isoformat()}")
    print(_report(args, ranks, stem, started))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Host time: the wall time of one updating optimizer step over many small
CPU tensors (10,000 fp32 parameters of 10 elements by default), where the
element work is negligible and what is measured is the Python / C++ / dispatch
overhead per step, path against path in one run.

Paths (momentum 0.9, weight_decay 1e-4, lr 1e-3; grads set once and kept):

* torch_default: ``torch.optim.SGD`` (foreach=None, which on a CPU is its
  per-tensor loop, not foreach) ``opt.step()``;
* torch_fused: ``torch.optim.SGD(fused=True)`` ``opt.step()``;
* fastaccum: ``AccumOptimizer(accumulation_steps=1)`` ``opt.step()``;
* fastaccum_scaler: ``torch_fastaccum.GradScaler("cpu")`` +
  ``AccumOptimizer(accumulation_steps=K)``: the boundary (updating)
  ``scaler.step(opt); scaler.update()`` only;
* fastaccum_scaler_count_first / fastaccum_scaler_count_last: the same pair,
  the K-1 counting micro-steps of each window, each timed on its own: the
  first one after a boundary (it finds the caches cold: the boundary and the
  grad restore below walked every tensor) and the last one (K-1th, the
  warmest); out["counting_position_median_us"] has every position's median;
* torch_amp_fused: ``torch.amp.GradScaler("cpu")`` +
  ``torch.optim.SGD(fused=True)``, ``scaler.step(opt); scaler.update()``.

Each timed round runs every path once (round-robin, so drift hits all
alike) after warm-up rounds; Python's garbage collector is off while timing
(as timeit does). The loss scale is 1 + 2^-10 (as in speed.py): every step
really unscales, and the grads, divided by it on every step, stay normal
floats. The fastaccum_scaler path writes grad / (K * scale) back into
``.grad`` at each boundary, so its grads are restored (untimed) before each
window. ``python -m benchmarks.host_time`` runs it alone."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from torch_fastaccum import AccumOptimizer, GradScaler

from .budget import MIN_REPEATS, repeats_that_fit
from .meta import loadavg
from .speed import HYPER, SCALE, fresh_params
from .stats import summarize

GRAD_STD = 1e-3  # small grads: nothing overflows, nothing is skipped
PATHS = ("torch_default", "torch_fused", "fastaccum", "fastaccum_scaler", "fastaccum_scaler_count_first",
         "fastaccum_scaler_count_last", "torch_amp_fused")
COUNTING = ("fastaccum_scaler_count_first", "fastaccum_scaler_count_last")  # timed with fastaccum_scaler
PATH_NAMES = {
    "torch_default": "torch SGD default (`foreach=None`: its per-tensor loop on a CPU)",
    "torch_fused": "torch SGD `fused=True`",
    "fastaccum": "AccumOptimizer K=1",
    "fastaccum_scaler": "AccumOptimizer K={k} + GradScaler, boundary",
    "fastaccum_scaler_count_first": "AccumOptimizer K={k} + GradScaler, 1st counting micro-step (#1)",
    "fastaccum_scaler_count_last": "AccumOptimizer K={k} + GradScaler, last counting micro-step (#{n})",
    "torch_amp_fused": "torch SGD `fused=True` + torch.amp.GradScaler",
}
TIMED = {
    "torch_default": "`opt.step()`",
    "torch_fused": "`opt.step()`",
    "fastaccum": "`opt.step()`",
    "fastaccum_scaler": "`scaler.step(opt); scaler.update()`",
    "fastaccum_scaler_count_first": "`scaler.step(opt); scaler.update()`",
    "fastaccum_scaler_count_last": "`scaler.step(opt); scaler.update()`",
    "torch_amp_fused": "`scaler.step(opt); scaler.update()`",
}
RUNS = {False: 30, True: 5}  # timed rounds: full, quick
WARMUP = {False: 5, True: 2}


def initial(n_tensors: int, numel: int, seed: int = 5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(values, grads): the starting parameters and their grads, drawn once;
    every path starts from its own copy of them."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n_tensors, numel, generator=g)
    grads = torch.randn(n_tensors, numel, generator=g) * GRAD_STD
    return list(values.unbind(0)), list(grads.unbind(0))


class _Path:
    """One path's parameters, optimizer, scaler and the step it times."""

    def __init__(self, key: str, init, k: int):
        self.key = key
        self.params = fresh_params(zip(*init))
        self.scaler = None
        self.k = 1
        if key == "torch_default":
            self.opt = torch.optim.SGD(self.params, **HYPER)
        elif key in ("torch_fused", "torch_amp_fused"):
            self.opt = torch.optim.SGD(self.params, fused=True, **HYPER)
        elif key == "fastaccum":
            self.opt = AccumOptimizer(self.params, **HYPER)
        elif key == "fastaccum_scaler":
            self.k = k
            self.opt = AccumOptimizer(self.params, accumulation_steps=k, **HYPER)
        else:
            raise ValueError(f"unknown path {key!r}")
        if key == "torch_amp_fused":
            self.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        elif key == "fastaccum_scaler":
            self.scaler = GradScaler("cpu", init_scale=SCALE)
            self.grads0 = init[1]  # never written: the params' grads are clones
        if self.scaler is not None:
            self.scaler.scale(torch.ones(()))  # initialises the scale tensor

    def step(self) -> None:
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()

    def restore_grads(self) -> None:
        """The boundary wrote grad / (K * scale) back: start the window from
        the original grads again (as a backward pass would refill them)."""
        torch._foreach_copy_([p.grad for p in self.params], self.grads0)

    def flat(self) -> torch.Tensor:
        return torch.stack([p.detach() for p in self.params])


def measure_host_time(n_tensors: int = 10_000, numel: int = 10, k: int = 4, runs: int | None = None,
                      warmup: int | None = None, quick: bool = False, threads: int | None = None,
                      deadline: float | None = None, clock=time.perf_counter) -> dict:
    """Per-step wall time of every path (see the module docstring) over
    `n_tensors` fp32 CPU parameters of `numel` elements.

    `runs` timed rounds (default 30, quick 5) after `warmup` rounds (default
    5, quick 2); `threads`: torch's intra-op threads for the run (restored
    after; None keeps the current setting). With a `deadline` (a `clock`
    value) it times MIN_REPEATS rounds, then only as many more as end before
    the deadline; out["cut_by_budget"] says whether it cut.

    Returns per path summarize()'s statistics (ms) plus us (median µs per
    step), min_us, p90_us, us_per_tensor (median) and params_changed (the
    fraction of parameters the run changed: 1.0, or the path timed no-ops;
    None for the counting micro-steps, which only count)."""
    if k < 3:
        raise ValueError(f"k must be at least 3 (the scaler path times its 1st and last counting micro-steps apart), "
                         f"got {k}")
    runs = RUNS[quick] if runs is None else runs
    warmup = WARMUP[quick] if warmup is None else warmup
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs}, {warmup}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    gc_was_enabled = gc.isenabled()
    t_start = clock()
    try:
        init = initial(n_tensors, numel)
        setups = {key: _Path(key, init, k) for key in PATHS if key not in COUNTING}
        del init
        start = {key: s.flat() for key, s in setups.items()}
        samples = {key: [] for key in PATHS}
        positions = [[] for _ in range(k - 1)]  # every counting micro-step, by its place in the window
        taken, min_runs = runs, min(runs, MIN_REPEATS)
        t_timed = None
        setup_s = clock() - t_start
        gc.collect()
        gc.disable()
        for r in range(warmup + runs):
            if r == warmup:
                t_timed = clock()
            if deadline is not None and r == warmup + min_runs:
                now = clock()
                taken = repeats_that_fit(runs, min_runs, (now - t_timed) / min_runs, now, deadline)
            if r >= warmup + taken:
                break
            for key, s in setups.items():
                if s.k > 1:
                    s.restore_grads()
                    t_count = []
                    for _ in range(s.k - 1):
                        t0 = time.perf_counter()
                        s.step()
                        t_count.append(time.perf_counter() - t0)
                    if not s.opt.is_accumulation_boundary:
                        raise RuntimeError(f"{key}: not at an accumulation boundary after {s.k - 1} steps")
                t0 = time.perf_counter()
                s.step()
                t = time.perf_counter() - t0
                if r >= warmup:
                    samples[key].append(t)
                    if s.k > 1:
                        samples["fastaccum_scaler_count_first"].append(t_count[0])
                        samples["fastaccum_scaler_count_last"].append(t_count[-1])
                        for i, t_i in enumerate(t_count):
                            positions[i].append(t_i)
    finally:
        if gc_was_enabled:
            gc.enable()
        used_threads = torch.get_num_threads()
        torch.set_num_threads(before)
    out = {"n_tensors": n_tensors, "numel": numel, "dtype": "float32", "device": "cpu", "accumulation_steps": k,
           "runs_planned": runs, "runs": taken, "warmup": warmup, "threads": used_threads,
           "hyper": dict(HYPER), "loss_scale": SCALE, "paths": {}}
    if deadline is not None:
        out["cut_by_budget"] = taken < runs
    for key in PATHS:
        st = summarize(samples[key])
        out["paths"][key] = {"us": st["median_ms"] * 1e3, "min_us": st["min_ms"] * 1e3,
                             "p90_us": st["p90_ms"] * 1e3, "us_per_tensor": st["median_ms"] * 1e3 / n_tensors,
                             "us_per_tensor_min": st["min_ms"] * 1e3 / n_tensors, **st}
    for key, s in setups.items():
        changed = (s.flat() != start[key]).any(dim=1).float().mean().item()
        out["paths"][key]["params_changed"] = changed
        if key == "fastaccum_scaler":  # counting micro-steps change nothing (by design, and tested)
            for c in COUNTING:
                out["paths"][c]["params_changed"] = None
        if s.scaler is not None:
            out["paths"][key]["final_scale"] = s.scaler.get_scale()
    out["counting_position_median_us"] = [statistics.median(ts) * 1e6 for ts in positions]
    p = out["paths"]
    out["ratios"] = {
        "torch_default_over_fastaccum": p["torch_default"]["us"] / p["fastaccum"]["us"],
        "torch_fused_over_fastaccum": p["torch_fused"]["us"] / p["fastaccum"]["us"],
        "torch_amp_fused_over_fastaccum_scaler": p["torch_amp_fused"]["us"] / p["fastaccum_scaler"]["us"],
    }
    out["noisy"] = any(v["noisy"] for v in p.values())
    out["setup_s"] = round(setup_s, 3)  # building the paths (the first also imports torch._dynamo)
    out["seconds"] = round(clock() - t_start, 3)
    del setups, start
    return out


def path_name(key: str, k: int) -> str:
    return PATH_NAMES.get(key, key).format(k=k, n=k - 1)


def _changed(frac) -> str:
    return "none (counts only)" if frac is None else f"{100 * frac:.0f}%"


def table(h: dict, noisy_mark: str = "⚠") -> list[str]:
    """The markdown table rows (header included) of a measure_host_time result."""
    k = h["accumulation_steps"]
    lines = [
        "| path | timed | samples | min µs | median µs | p90 µs | spread | median/min | µs/tensor (median) "
        "| µs/tensor (min) | params changed | noisy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, v in h["paths"].items():
        lines.append(
            f"| {path_name(key, k)} | {TIMED.get(key, '')} | {v['samples']} | {v['min_us']:,.0f} | "
            f"{v['us']:,.0f} | {v['p90_us']:,.0f} | {v['spread']:.2f} | {v['median_over_min']:.2f} | "
            f"{v['us_per_tensor']:.3f} | {v['us_per_tensor_min']:.3f} | {_changed(v.get('params_changed'))} | "
            + (f"{noisy_mark} noisy" if v["noisy"] else "") + " |"
        )
    return lines


def main(argv=None) -> int:
    import argparse
    import json
    import os

    import torch_fastaccum

    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{RUNS[True]} timed rounds instead of {RUNS[False]}")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--n-tensors", type=int, default=10_000)
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    load_start = loadavg()
    h = measure_host_time(n_tensors=args.n_tensors, runs=args.runs, quick=args.quick, threads=args.threads)
    h["torch_fastaccum_file"] = torch_fastaccum.__file__
    h["loadavg_start"], h["loadavg_end"] = load_start, loadavg()
    print(f"torch_fastaccum from {torch_fastaccum.__file__}, torch {torch.__version__}, "
          f"{h['threads']} threads, {h['seconds']:.1f} s, 1-minute load {h['loadavg_start']} -> "
          f"{h['loadavg_end']} on {os.cpu_count()} CPUs")
    print("\n".join(table(h)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(h, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

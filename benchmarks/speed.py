"""Speed: one optimizer step with a scaler (scaler.step(opt); scaler.update()),
torch SGD default (foreach) / fused=True + torch.amp.GradScaler against
AccumOptimizer + torch_fastaccum.GradScaler in both `.grad` modes (the default
writes the unscaled grad back, as torch leaves it; `grad_writeback=False`
keeps the scaled one), timed round-robin in one run."""

from __future__ import annotations

import os
import time

import torch

from torch_fastaccum import AccumOptimizer, GradScaler

from .budget import MIN_REPEATS, repeats_that_fit
from .stats import fraction_of_copy, summarize

PATHS = ("torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback")
# Bytes each path must move per element: grad read twice (check + update),
# param and momentum read and written; and the grad written back unscaled,
# which torch's paths and our default do and the opt-out does not (28/24 B
# per fp32 parameter).
ACCESSES = {"torch_default": 7, "torch_fused": 7, "fastaccum": 7, "fastaccum_no_writeback": 6,
            "fastaccum_by_value": 7}
# A loss scale that is not 1, so every step really unscales (at 1.0 the kernels
# skip the multiply and the write); this close to 1 the grads, unscaled again
# on every timed step, stay normal floats for thousands of steps.
SCALE = 1.0 + 2.0**-10
HYPER = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)


def _initial(sizes: list[int], dtype, device: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(param, grad) values of a case, drawn once from `seed`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(n, generator=g).to(device=device, dtype=dtype),
             torch.randn(n, generator=g).to(device=device, dtype=dtype)) for n in sizes]


def fresh_params(init) -> list[torch.nn.Parameter]:
    """Parameters with their grads, each its own copy of an (value, grad)
    pair of `init`: every path of a comparison starts from the same values."""
    params = []
    for value, grad in init:
        p = torch.nn.Parameter(value.clone())
        p.grad = grad.clone()
        params.append(p)
    return params


def torch_scaler_takes(dtype, device: str) -> bool:
    """Whether torch.amp.GradScaler can unscale grads of `dtype` on `device`
    (torch's CUDA unscale kernel has no bfloat16 case: NotImplementedError)."""
    g = [torch.ones(1, dtype=dtype, device=device)]
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(
            g, torch.zeros((), device=device), torch.ones((), device=device))
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _make(path: str, sizes: list[int], dtype, device: str, seed: int, init=None):
    """Optimizer and scaler of one path over fresh tensors. `init` (from
    _initial with the same sizes) saves drawing the values again: every path
    of a case starts from the same values, each from its own copy."""
    if init is None:
        init = _initial(sizes, dtype, device, seed)
    params = fresh_params(init)
    if path.startswith("fastaccum"):
        opt = AccumOptimizer(params, grad_writeback=path == "fastaccum", **HYPER)
        scaler = GradScaler(device, init_scale=SCALE)
    else:
        opt = torch.optim.SGD(params, fused=(path == "torch_fused"), **HYPER)
        # Where torch's scaler cannot take the dtype, torch's paths run SGD
        # alone: less work than ours (no unscale, no check), said in the table.
        scaler = torch.amp.GradScaler(device, init_scale=SCALE, enabled=torch_scaler_takes(dtype, device))
    scaler.scale(torch.ones((), device=device))  # initialises the scale tensor
    return opt, scaler


def _timer(device: str):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def time_rounds(runs, timer, repeats: int, warmup: int, t_start: float, deadline: float | None = None,
                reserve_s: float = 0.0, clock=time.perf_counter) -> tuple[dict, int, float | None]:
    """The round-robin timing loop of a case: every round runs each of `runs`
    once, in order, so drift hits all alike; `warmup` untimed rounds first.

    runs: (label, step, before, after) tuples; only step() is timed (by
    `timer`), before() and after() (either may be None) run untimed just
    before and after it, after() also when step() raises. With a `deadline`
    (a `clock` value) the loop runs the warm-up and MIN_REPEATS timed rounds,
    then only as many more of the `repeats` as end `reserve_s` before the
    deadline. Returns (samples: label -> seconds per timed round, rounds
    taken, min_part_s: the seconds from `t_start` to the end of the minimum,
    None when no deadline cut anything)."""
    samples = {run[0]: [] for run in runs}
    taken = repeats
    min_repeats = min(repeats, MIN_REPEATS)
    t_timed = min_part_s = None
    for r in range(warmup + repeats):
        if r == warmup:
            t_timed = clock()
        if deadline is not None and r == warmup + min_repeats:
            now = clock()
            min_part_s = now - t_start
            per_round = (now - t_timed) / min_repeats
            taken = repeats_that_fit(repeats, min_repeats, per_round, now + reserve_s, deadline)
        if r >= warmup + taken:
            break
        for label, step, before, after in runs:
            if before is not None:
                before()
            try:
                t = timer(step)
            finally:
                if after is not None:
                    after()
            if r >= warmup:
                samples[label].append(t)
    return samples, taken, min_part_s


def path_entry(samples_s, min_bytes: int) -> dict:
    """One path's row of a case: summarize()'s statistics, "ms" (the
    median), and GB/s of its `min_bytes` at the median and at the min."""
    st = summarize(samples_s)
    return {"ms": st["median_ms"], "gbps": min_bytes / st["median_ms"] / 1e6,
            "gbps_at_min": min_bytes / st["min_ms"] / 1e6, "min_bytes": min_bytes, **st}


def budget_entry(repeats: int, taken: int, min_part_s: float, counts_s: float, t_start: float, now: float) -> dict:
    """A case's "budget" entry (only with a deadline)."""
    return {
        "repeats_planned": repeats,
        "repeats_taken": taken,
        "cut_by_budget": taken < repeats,
        "min_part_s": round(min_part_s + counts_s, 3),
        "counts_s": round(counts_s, 3),
        "case_s": round(now - t_start, 3),
    }


def time_case(name: str, sizes: list[int], dtype, device: str, repeats: int, warmup: int = 3,
              deadline: float | None = None, reserve_s: float = 0.0, clock=time.perf_counter) -> dict:
    """Median step time of every path, measured interleaved so drift hits all alike.

    With a `deadline` (a `clock` value), the case runs its warm-up and
    MIN_REPEATS timed rounds, then only as many more of the `repeats` as end
    `reserve_s` before the deadline; out["budget"] says how many it took."""
    t_start = clock()
    init = _initial(sizes, dtype, device, seed=7)
    setups = {p: _make(p, sizes, dtype, device, seed=7, init=init) for p in PATHS}
    del init
    timer = _timer(device)

    def step_of(opt, scaler):
        def step():
            scaler.step(opt)
            scaler.update()
        return step

    # (label, step, before, after): on CUDA the fused path also runs with the
    # by-value launches a captured step makes (FASTACCUM_CUDA_LAUNCH, NOTE:
    # [launch modes]), against the default one-launch table passes.
    runs = [(p, step_of(*setups[p]), None, None) for p in PATHS]
    if device == "cuda":
        runs.append(("fastaccum_by_value", step_of(*setups["fastaccum"]),
                     lambda: os.environ.__setitem__("FASTACCUM_CUDA_LAUNCH", "by_value"),
                     lambda: os.environ.pop("FASTACCUM_CUDA_LAUNCH", None)))
    samples, taken, min_part_s = time_rounds(runs, timer, repeats, warmup, t_start, deadline, reserve_s, clock)
    numel = sum(sizes)
    elem = torch.empty((), dtype=dtype).element_size()
    torch_scaled = torch_scaler_takes(dtype, device)
    out = {"case": name, "torch_scaler_enabled": torch_scaled, "tensors": len(sizes), "numel": numel, "dtype": str(dtype).replace("torch.", ""),
           "min_bytes": 7 * elem * numel,
           # param, grad and momentum of one path; the case keeps all its paths alive
           "working_set_bytes": 3 * elem * numel, "warmup": warmup, "paths": {}}
    for p in samples:
        # see ACCESSES; torch without its scaler: param, momentum r+w, grad r
        accesses = 5 if p.startswith("torch") and not torch_scaled else ACCESSES[p]
        out["paths"][p] = path_entry(samples[p], accesses * elem * numel)
    out["noisy"] = any(v["noisy"] for v in out["paths"].values())
    t_counts = clock()
    if min_part_s is None:  # every planned round was part of the minimum
        min_part_s = t_counts - t_start
    if device == "cuda":
        try:
            for path, counts in count_syncs_and_launches(sizes, dtype, device).items():
                out["paths"][path].update(counts)
        except Exception as e:  # the timings stand without the counts
            out["count_error"] = f"{type(e).__name__}: {e}"
    if deadline is not None:
        out["budget"] = budget_entry(repeats, taken, min_part_s, clock() - t_counts, t_start, clock())
    ours = out["paths"]["fastaccum"]["ms"]
    out["speedup_vs_torch_default"] = out["paths"]["torch_default"]["ms"] / ours
    out["speedup_vs_torch_fused"] = out["paths"]["torch_fused"]["ms"] / ours
    out["writeback_cost"] = ours / out["paths"]["fastaccum_no_writeback"]["ms"]
    if "fastaccum_by_value" in out["paths"]:  # above 1: the table passes are faster
        out["table_speedup"] = out["paths"]["fastaccum_by_value"]["ms"] / ours
    del setups
    return out


def count_syncs_and_launches(sizes: list[int], dtype, device: str, paths=PATHS, make_step=None) -> dict:
    """Host syncs (torch.cuda sync debug mode, 'warn') and kernel launches
    (profiler) of one step per path. CUDA only.

    make_step(path) -> (step, before): a fresh path's step (by default
    scaler.step(opt); scaler.update()) and what runs uncounted before each
    step (None: nothing)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    if make_step is None:
        def make_step(path):
            opt, scaler = _make(path, sizes, dtype, device, seed=11)

            def step():
                scaler.step(opt)
                scaler.update()
            return step, None

    out = {}
    for path in paths:
        step, before = make_step(path)
        before = before or (lambda: None)
        for _ in range(2):  # warm-up: lazy state, caches
            before()
            step()
        before()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        before()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        cuda_events = [e.name.lower() for e in prof.events()
                       if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        launches = sum(1 for n in cuda_events if "memcpy" not in n and "memset" not in n)
        # Host-to-device copies: our launch tables when pointers changed.
        uploads = sum(1 for n in cuda_events if "memcpy" in n and "htod" in n.replace(" ", ""))
        out[path] = {"host_syncs": syncs, "kernel_launches": launches, "uploads": uploads}
        del step, before
    return out


def copy_numel(device: str, cache_bytes: int | None, quick: bool = False) -> int:
    """fp32 elements per buffer of the copy reference: each buffer as large as
    the last-level cache (so source and destination together are twice its
    size and the copy streams from DRAM), within 10M-128M elements on a CPU
    (a quick run: 10M-32M, which may leave the copy partly in a large L3: the
    result says so) and at least 25M on a GPU."""
    if device == "cuda":
        return max(25_000_000, (cache_bytes or 0) // 4)
    hi = 32_000_000 if quick else 128_000_000
    return min(hi, max(10_000_000, (cache_bytes or 0) // 4))


def measure_copy(device: str, numel: int, runs: int = 7, warmup: int = 2, cache_bytes: int | None = None) -> dict:
    """Copy bandwidth (read + write bytes / s) of `numel` fp32 elements: the
    best of `runs` timed copies after `warmup` ones (the fastest copy is the
    one least disturbed by anything else; the reference should be the
    device's real ceiling), with every run's figure kept."""
    a = torch.empty(numel, device=device).fill_(1.0)
    b = torch.empty_like(a).fill_(0.0)  # touched: page faults stay out of the timing
    timer = _timer(device)
    for _ in range(warmup):
        timer(lambda: b.copy_(a))
    ts = [timer(lambda: b.copy_(a)) for _ in range(runs)]
    nbytes = 2 * a.numel() * a.element_size()
    st = summarize(ts)
    del a, b
    return {
        "gbps": nbytes / min(ts) / 1e9,  # best run: the reference
        "median_gbps": nbytes / st["median_ms"] / 1e6,
        "runs_gbps": [nbytes / t / 1e9 for t in ts],
        "runs": runs,
        "numel": numel,
        "working_set_bytes": nbytes,
        "exceeds_cache": None if not cache_bytes else nbytes > cache_bytes,
        "noisy": st["noisy"],
        "median_over_min": st["median_over_min"],
    }


def annotate_copy_fraction(case: dict, copy_gbps: float | None) -> dict:
    """Adds each path's fraction of the copy bandwidth and its cache_resident
    flag (a fraction over 1: see stats.fraction_of_copy) to a time_case result."""
    for v in case["paths"].values():
        frac, cached = fraction_of_copy(v["gbps"], copy_gbps)
        v["fraction_of_copy"] = frac
        v["cache_resident"] = cached
    case["cache_resident"] = any(v["cache_resident"] for v in case["paths"].values())
    return case


def cases(device: str, quick: bool):
    """(name, sizes, dtype) of the benchmark cases for a device. A quick CPU
    run keeps every row of the full table, each in reduced form: the same
    number of tensors, a tenth of the elements where a row has more than 1M
    (so its tensors mostly stay in cache: the table flags that)."""
    def split(total, n):
        return [total // n] * n
    if device == "cuda":
        return [
            ("100M fp32 / 200 tensors", split(100_000_000, 200), torch.float32),
            ("ResNet-18-like 11.7M / 62 tensors", split(11_700_000, 62), torch.float32),
            ("10,000 x 1,000 fp32", split(10_000_000, 10_000), torch.float32),
            ("100M bf16 / 200 tensors", split(100_000_000, 200), torch.bfloat16),
        ]
    if quick:
        return [
            ("small 100K / 20 tensors", split(100_000, 20), torch.float32),
            ("medium 1M / 62 tensors", split(1_000_000, 62), torch.float32),
            ("1M fp32 / 160 tensors (10M row / 10)", split(1_000_000, 160), torch.float32),
            ("ResNet-18-like 1.17M / 62 tensors (11.7M row / 10)", split(1_170_000, 62), torch.float32),
            ("5M fp32 / 200 tensors (50M row / 10)", split(5_000_000, 200), torch.float32),
            ("1M bf16 / 160 tensors (10M row / 10)", split(1_000_000, 160), torch.bfloat16),
            ("1,000 x 1,000 fp32", split(1_000_000, 1_000), torch.float32),
        ]
    return [
        ("small 100K / 20 tensors", split(100_000, 20), torch.float32),
        ("medium 1M / 62 tensors", split(1_000_000, 62), torch.float32),
        ("10M fp32 / 160 tensors", split(10_000_000, 160), torch.float32),
        ("ResNet-18-like 11.7M / 62 tensors", split(11_700_000, 62), torch.float32),
        ("large 50M fp32 / 200 tensors", split(50_000_000, 200), torch.float32),
        ("10M bf16 / 160 tensors", split(10_000_000, 160), torch.bfloat16),
        ("1,000 x 1,000 fp32", split(1_000_000, 1_000), torch.float32),
    ]

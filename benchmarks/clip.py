"""Step with clipping: one full optimizer step with gradient-norm clipping
under a loss scaler, torch's clip pattern against the fused
``scaler.clip_grad_norm_``, timed round-robin in one run (the "step with
clipping" section of ``python -m benchmarks``; ``python -m benchmarks.clip``
runs it alone).

Paths, each timed as one whole step (momentum 0.9, weight_decay 1e-4, lr 1e-3):

* torch_default: ``torch.optim.SGD`` (its default: foreach on CUDA, the
  per-tensor loop on a CPU) + ``torch.amp.GradScaler``:
  ``scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(params, max_norm,
  foreach=True); scaler.step(opt); scaler.update()``;
* torch_fused: the same with ``torch.optim.SGD(fused=True)``;
* fastaccum: ``AccumOptimizer(accumulation_steps=1)`` (``.grad`` written back
  unscaled and clipped, as torch leaves it) + ``torch_fastaccum.GradScaler``:
  ``scaler.clip_grad_norm_(opt, max_norm); scaler.step(opt); scaler.update()``;
* fastaccum_no_writeback: the same with ``grad_writeback=False``.

Minimum bytes per element (the GB/s columns; B per fp32 parameter):

* ours: one read pass computes the norm and the inf/NaN check (grad read,
  4 B); the fused update reads the grad again and applies 1/scale and the
  clip coefficient (4 B), reads and writes param and momentum (16 B), and
  writes the unscaled clipped grad back (4 B): 28 B, 24 B with
  ``grad_writeback=False``. Clipping adds no pass: the same bytes as the
  step without it (benchmarks/speed.py).
* torch: ``unscale_`` (``_amp_foreach_non_finite_check_and_unscale_``: the
  check and the multiply in one pass, grad read + write, 8 B); the norm of
  ``clip_grad_norm_`` (``_foreach_norm``: grad read, 4 B); its clip
  (``_foreach_mul_`` by the clamped coefficient, which torch applies even
  when it is 1, to avoid a host sync: grad read + write, 8 B); the SGD step
  (param read + write, momentum read + write, grad read: 20 B; the foreach
  and per-tensor paths also write and re-read a weight-decayed copy of the
  grad, which is not counted: this is the least any implementation of these
  calls must move). 8 + 4 + 8 + 20 = 40 B, 10 accesses of the element size.
  Where torch's scaler cannot unscale the dtype (bf16 on CUDA, see
  speed.torch_scaler_takes) it runs disabled: no unscale, no check, so
  4 + 8 + 20 = 32 B in fp32 terms (8 accesses), less work than ours.

Soundness across repeats: every timed step must clip, and every step of a
path must see the same grads. Repeated steps would not: torch's ``unscale_``
and clip and our write-back leave ``.grad`` divided by the scale and
multiplied by the clip coefficient, so from the 2nd step on the norm would
sit at max_norm / scale and nothing would be clipped any more (ours with
``grad_writeback=False`` would keep clipping: the paths would then do
different work). speed.py's answer, a loss scale so close to 1 that the
shrinking grads stay normal floats, does not cover the clip. So before every
timed step, outside the timed region and for all paths alike, the path's
grads are restored from one saved copy of the initial (scaled) grads, as a
backward pass refills them; the restore leaves the end of the grads in the
cache as a backward pass would. The loss scale is still speed.SCALE
(1 + 2^-10), so every step unscales, and max_norm is CLIP_FRACTION of the
unscaled grads' norm, so every step really clips (the coefficient is
recorded per path, with the norm each path returned, from its last step).
"""

from __future__ import annotations

import math
import time

import torch

from .speed import (SCALE, _initial, _make, _timer, budget_entry, count_syncs_and_launches, path_entry,
                    time_rounds, torch_scaler_takes)
from .speed import cases as speed_cases

PATHS = ("torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback")
TORCH_PATHS = ("torch_default", "torch_fused")
# Element accesses per step (see the module docstring): bytes = accesses x
# element size; torch's scaler disabled (bf16 on CUDA): TORCH_UNSCALED.
ACCESSES = {"torch_default": 10, "torch_fused": 10, "fastaccum": 7, "fastaccum_no_writeback": 6}
TORCH_UNSCALED = 8
CLIP_FRACTION = 0.5  # max_norm over the unscaled grads' norm: below 1, so every step clips
SEED = 7


def cases(device: str, quick: bool):
    """(name, sizes, dtype) of the clip cases: on a CPU the target case, 10M
    fp32 parameters in 160 tensors (a quick run: 1M in 160, as speed.py's
    quick row of it); on CUDA speed.py's CUDA cases."""
    if device == "cuda":
        return speed_cases(device, quick)
    if quick:
        return [("1M fp32 / 160 tensors (10M row / 10)", [1_000_000 // 160] * 160, torch.float32)]
    return [("10M fp32 / 160 tensors", [10_000_000 // 160] * 160, torch.float32)]


def bytes_per_element(path: str, elem: int, torch_scaled: bool = True) -> int:
    """Minimum bytes a path moves per parameter (module docstring)."""
    accesses = TORCH_UNSCALED if path in TORCH_PATHS and not torch_scaled else ACCESSES[path]
    return accesses * elem


def grad_norm(grads, scale: float = SCALE) -> float:
    """The 2-norm of grads / scale, in float64."""
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads)) / scale


class _Path:
    """One path over its own copy of a case's values: the step it times and
    the grad restore that runs before each step, untimed."""

    def __init__(self, key: str, sizes, dtype, device: str, init, max_norm: float):
        self.key = key
        self.opt, self.scaler = _make(key, sizes, dtype, device, seed=SEED, init=init)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.grads0 = [g for _, g in init]  # never written: the params' grads are clones
        self.max_norm = max_norm
        self.norm = None  # what the last step's clip returned
        self.step = self._ours if key.startswith("fastaccum") else self._torch

    def _torch(self) -> None:
        self.scaler.unscale_(self.opt)
        self.norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()

    def _ours(self) -> None:
        self.norm = self.scaler.clip_grad_norm_(self.opt, self.max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()

    def restore_grads(self) -> None:
        """The scaled initial grads again (the last step left them unscaled
        and clipped): see the module docstring."""
        torch._foreach_copy_([p.grad for p in self.params], self.grads0)


def time_clip_case(name: str, sizes: list[int], dtype, device: str, repeats: int, warmup: int = 3,
                   deadline: float | None = None, reserve_s: float = 0.0, clock=time.perf_counter) -> dict:
    """Median step-with-clipping time of every path, measured interleaved
    (speed.time_rounds), each step after an untimed grad restore. Deadline
    and budget entry as speed.time_case."""
    t_start = clock()
    init = _initial(sizes, dtype, device, seed=SEED)
    norm0 = grad_norm([g for _, g in init])
    max_norm = CLIP_FRACTION * norm0
    setups = {p: _Path(p, sizes, dtype, device, init, max_norm) for p in PATHS}
    timer = _timer(device)
    runs = [(p, s.step, s.restore_grads, None) for p, s in setups.items()]
    samples, taken, min_part_s = time_rounds(runs, timer, repeats, warmup, t_start, deadline, reserve_s, clock)
    numel = sum(sizes)
    elem = torch.empty((), dtype=dtype).element_size()
    torch_scaled = torch_scaler_takes(dtype, device)
    out = {"case": name, "torch_scaler_enabled": torch_scaled, "tensors": len(sizes), "numel": numel,
           "dtype": str(dtype).replace("torch.", ""), "loss_scale": SCALE, "grad_norm": norm0,
           "max_norm": max_norm, "clip_fraction": CLIP_FRACTION,
           "bytes_per_element": {p: bytes_per_element(p, elem, torch_scaled) for p in PATHS},
           # param, grad and momentum of one path (the case keeps all its paths alive, and the saved grads)
           "working_set_bytes": 3 * elem * numel, "warmup": warmup, "paths": {}}
    for p in PATHS:
        out["paths"][p] = path_entry(samples[p], bytes_per_element(p, elem, torch_scaled) * numel)
        norm = float(setups[p].norm) if setups[p].norm is not None else float("nan")
        out["paths"][p]["norm"] = norm
        out["paths"][p]["clip_coef"] = min(1.0, max_norm / (norm + 1e-6))
    out["clipped"] = all(v["clip_coef"] < 1.0 for v in out["paths"].values())
    norms = [v["norm"] for v in out["paths"].values()]
    out["norm_max_rel_diff"] = (max(norms) - min(norms)) / norm0 if norm0 else 0.0
    out["noisy"] = any(v["noisy"] for v in out["paths"].values())
    del setups
    t_counts = clock()
    if min_part_s is None:  # every planned round was part of the minimum
        min_part_s = t_counts - t_start
    if device == "cuda":
        def make_step(path):
            s = _Path(path, sizes, dtype, device, init, max_norm)
            return s.step, s.restore_grads
        try:
            for path, counts in count_syncs_and_launches(sizes, dtype, device, PATHS, make_step).items():
                out["paths"][path].update(counts)
        except Exception as e:  # the timings stand without the counts
            out["count_error"] = f"{type(e).__name__}: {e}"
    del init
    if deadline is not None:
        out["budget"] = budget_entry(repeats, taken, min_part_s, clock() - t_counts, t_start, clock())
    p = out["paths"]
    best = min(TORCH_PATHS, key=lambda k: p[k]["ms"])
    ours = p["fastaccum"]["ms"]
    out["best_torch"] = best
    out["speedup_vs_best_torch"] = p[best]["ms"] / ours
    out["speedup_vs_torch_default"] = p["torch_default"]["ms"] / ours
    out["speedup_vs_torch_fused"] = p["torch_fused"]["ms"] / ours
    out["no_writeback_speedup_vs_best_torch"] = p[best]["ms"] / p["fastaccum_no_writeback"]["ms"]
    out["writeback_cost"] = ours / p["fastaccum_no_writeback"]["ms"]
    return out


def main(argv=None) -> int:
    """python -m benchmarks.clip: the section alone, with the copy bandwidth
    it quotes "% of copy" against."""
    import argparse
    import json
    import os

    import torch_fastaccum

    from .meta import loadavg, machine
    from .speed import annotate_copy_fraction, copy_numel, measure_copy

    ap = argparse.ArgumentParser(prog="python -m benchmarks.clip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the reduced cases, 7 repeats, 2 warm-up rounds")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20, quick 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = loadavg()
    mach = machine(args.device)
    copy = measure_copy(args.device, copy_numel(args.device, mach["last_level_cache_bytes"], args.quick),
                        runs=5 if args.quick else 7, cache_bytes=mach["last_level_cache_bytes"])
    repeats = args.repeats or (7 if args.quick else 20)
    warmup = 2 if args.quick else 3
    result = {"machine": mach, "copy": copy, "copy_gbps": copy["gbps"], "clip": []}
    for name, sizes, dtype in cases(args.device, args.quick):
        c = annotate_copy_fraction(time_clip_case(name, sizes, dtype, args.device, repeats, warmup=warmup),
                                   copy["gbps"])
        result["clip"].append(c)
    result["torch_fastaccum_file"] = torch_fastaccum.__file__
    result["loadavg_start"], result["loadavg_end"] = load_start, loadavg()
    from .__main__ import _clip

    print(f"torch_fastaccum from {torch_fastaccum.__file__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, copy {copy['gbps']:.1f} GB/s, 1-minute load "
          f"{result['loadavg_start']} -> {result['loadavg_end']} on {os.cpu_count()} CPUs")
    print("\n".join(_clip(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

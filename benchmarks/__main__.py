"""python -m benchmarks: parity verdict and speed table, side by side in one run.

Sections: the parity verdict; the optimizer step with a scaler (speed
table, benchmarks/speed.py); the step with gradient clipping, torch's
unscale_ + clip_grad_norm_ against scaler.clip_grad_norm_ (benchmarks/clip.py,
"clip" in the JSON; --skip-clip leaves it out); the per-step host time over
many small tensors (benchmarks/host_time.py); the end-to-end training loop.

Writes <out>/<device>-<date>.json (machine-readable), .md (the tables) and
.png (the plot), all three with one stem; a stem already used in <out> (an
earlier run the same day) gets -2, -3, ... instead of being overwritten. Both
files record the code (package version, git commit), the command line, the
machine and the time of the run; every timing keeps min, median and spread
and says when it is noisy (benchmarks/stats.py).
With --time-budget SECONDS the run plans its stages to end within that many
seconds (benchmarks/budget.py) and records every cut or skip in both files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import sys
import time

import torch

import torch_fastaccum  # noqa: F401  (registers torch.ops.fastaccum)

from . import clip
from .budget import E2E_SHARE, MIN_REPEATS, PARITY_SHARE, TimeBudget
from .e2e import time_e2e
from .host_time import measure_host_time
from .host_time import table as host_time_table
from .meta import loadavg, machine, run_info, unique_stem
from .parity import run_parity
from .plot import write_png
from .speed import annotate_copy_fraction, cases, copy_numel, measure_copy, time_case
from .stats import NOISY_RATIO, SPREAD_DEFINITION

def _progress(label: str):
    start = time.perf_counter()
    shown = [-1]

    def report(done: int, total: int):
        width = 30
        filled = width * done // total
        if filled == shown[0] and done != total:
            return
        shown[0] = filled
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{label} [{bar}] {done}/{total} {time.perf_counter() - start:5.1f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


PATH_KEYS = ("torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback")
PATH_NAMES = {
    "torch_default": "torch default",
    "torch_fused": "torch `fused=True`",
    "fastaccum": "fastaccum",
    "fastaccum_no_writeback": "fastaccum `grad_writeback=False`",
    "fastaccum_by_value": "fastaccum, by-value launches",
}
NOISY_MARK = "⚠"
THREADS_FROM = {
    "--threads": "set by `--threads`",
    "--quick": "the `--quick` default on a CPU; `--threads N` to change",
    "default": "torch's default",
}


def _mib(nbytes) -> str:
    return "?" if not nbytes else f"{nbytes / 2**20:,.0f} MiB"


def _git_text(run: dict) -> str:
    git = run.get("git") or {}
    if not git.get("commit"):
        return "not a git checkout"
    dirty = {True: " + uncommitted changes", False: ", clean", None: ""}[git.get("dirty")]
    return f"git `{git['commit'][:12]}`{dirty}"


def _load(avg) -> str:
    return "?" if avg is None else f"{avg:.2f}"


def _header(result: dict) -> list[str]:
    m, run = result["machine"], result["run"]
    name = m.get("gpu") or m["cpu"]
    device = f"`{m['device']}`: {m['gpu']} (CUDA {m.get('cuda')}), host CPU {m['cpu']}" if m.get("gpu") \
        else f"`{m['device']}`: {m['cpu']}"
    command = "python -m benchmarks" + ("" if not run["argv"] else " " + shlex.join(run["argv"]))
    return [
        f"# torch_fastaccum benchmark: {name}",
        "",
        "| run | |",
        "|---|---|",
        f"| date | {run['datetime']} |",
        f"| code | torch_fastaccum {run.get('package_version') or '?'}, {_git_text(run)} |",
        f"| command | `{command}` |",
        f"| torch | {m['torch']}, Python {m['python']} |",
        f"| device | {device} |",
        f"| threads | {m['threads']} torch thread{'s' if m['threads'] != 1 else ''} on "
        f"{m.get('cpu_count') or '?'} CPUs ({THREADS_FROM.get(result.get('settings', {}).get('threads_from'), '?')}"
        f"), parity on {result['parity'].get('threads', m['threads'])}; CPU kernels `{m['cpu_kernels']}` |",
        f"| last-level cache | {m.get('last_level_cache', 'L3')} {_mib(m.get('last_level_cache_bytes'))} |",
        f"| load average | {_load(run.get('loadavg_start'))} at the start, {_load(run.get('loadavg_end'))} at the "
        f"end (1-minute; above {m.get('cpu_count') or '?'}, other work was competing for the CPUs) |",
        f"| wall time | {run['wall_s']:.1f} s ("
        + "".join(f"{k} {v:.1f} s, " for k, v in run.get("stages_s", {}).items())
        + "from the first measurement to the files; Python start-up and imports not included) |",
        "",
    ]


def _parity(p: dict) -> list[str]:
    losses = p.get("ref_loss") or [float("nan")]
    return [
        "## Parity (reference: torch.optim.SGD + torch.amp.GradScaler, loss / K)",
        "",
        f"- verdict: **{'PASS' if p['pass'] else 'FAIL'}**",
        f"- {p['updates']} updates"
        + (f" (of {p['updates_planned']} planned: cut by the time budget)" if p.get("cut_by_budget") else "")
        + f", K={p['accumulation_steps']}, {p['micro_batches']} micro-batches, "
        f"overflow injected at micro-batches {p['overflow_micro_batches']}",
        f"- max |param diff| {p['max_param_abs_diff']:.3g} (max |param| {p['max_param_abs']:.3g}); "
        f"parameters bit for bit identical: {p.get('params_bitwise_identical')}",
        f"- skip decisions identical: {p['skips_identical']} ({p['skipped_windows']} windows skipped)",
        f"- scale history identical: {p['scale_history_identical']} (final scale {p['final_scale']:g})",
        f"- max loss-curve difference: {p['max_loss_curve_diff']:.3g}",
        f"- data: {p.get('data', 'synthetic')}; the reference loss went from {losses[0]:.3f} "
        f"(ln 10 = 2.303 is chance level) in the first window to {losses[-1]:.3f} in the last",
        "",
    ]


def _cell(ms: float, stats: dict) -> str:
    return f"{ms:.3f}" + (f" {NOISY_MARK}" if stats.get("noisy") else "")


def _pct(v: dict, cache: str) -> str:
    frac = v.get("fraction_of_copy")
    if frac is None:
        return "?"
    return f"{100 * frac:.0f}%" + (f" ({cache})" if v.get("cache_resident") else "")


def _timings_table(cases: list[dict]) -> list[str]:
    """Every path's min / median / p90 / spread of a list of timed cases."""
    lines = [
        "| case | path | repeats | min ms | median ms | p90 ms | spread | median/min | noisy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        for k, v in c["paths"].items():
            lines.append(
                f"| {c['case']} | {PATH_NAMES.get(k, k)} | {v['samples']} | {v['min_ms']:.3f} | "
                f"{v['median_ms']:.3f} | {v['p90_ms']:.3f} | {v['spread']:.2f} | {v['median_over_min']:.2f} | "
                + (f"{NOISY_MARK} noisy" if v["noisy"] else "") + " |"
            )
    return lines


def _counts_table(cases: list[dict], what: str = "step") -> list[str]:
    """Host syncs / kernel launches of each path (CUDA runs; nothing where no
    case has them)."""
    if not any("host_syncs" in c["paths"]["fastaccum"] for c in cases):
        return []
    lines = [
        "",
        f"Host syncs / kernel launches per {what} (sync debug mode, profiler):",
        "",
        "| case | torch default | torch fused | fastaccum | `grad_writeback=False` |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        cells = [f"{c['paths'][k].get('host_syncs', '?')} / {c['paths'][k].get('kernel_launches', '?')}"
                 + (f" (+{c['paths'][k]['uploads']} upload)" if c["paths"][k].get("uploads") else "")
                 for k in PATH_KEYS]
        lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    if any(c.get("count_error") for c in cases):
        lines += [""] + [f"- {c['case']}: no counts ({c['count_error']})" for c in cases if c.get("count_error")]
    return lines


def _speed(result: dict) -> list[str]:
    speed = result["speed"]
    copy = result.get("copy") or {}
    cache = result["machine"].get("last_level_cache", "L3")
    cache_bytes = result["machine"].get("last_level_cache_bytes")
    lines = ["## Optimizer step with a scaler (`scaler.step(opt); scaler.update()`)", ""]
    if not speed:
        why = "skipped (`--skip-speed`)" if result.get("run", {}).get("args", {}).get("skip_speed") \
            else "no case ran"
        return lines + [why, ""]
    if copy:
        big = copy.get("exceeds_cache")
        lines += [
            f"Copy bandwidth (the reference of \"% of copy\"): **{copy['gbps']:.1f} GB/s**, the best of "
            f"{copy['runs']} copies of {_mib(copy['working_set_bytes'] // 2)} (median of those "
            f"{copy['median_gbps']:.1f} GB/s; source and destination together "
            + (f"{_mib(copy['working_set_bytes'])}, " + ("more than" if big else "NOT more than")
               + f" the {cache} of {_mib(cache_bytes)}" if big is not None else f"{_mib(copy['working_set_bytes'])}")
            + ").",
            "",
        ]
    paths_all = [(c, k) for c in speed for k in c["paths"]]
    noisy = [(c, k) for c, k in paths_all if c["paths"][k].get("noisy")]
    cached = [(c, k) for c, k in paths_all if c["paths"][k].get("cache_resident")]
    lines += [
        f"**{len(noisy)} of {len(paths_all)} path timings are noisy** ({NOISY_MARK}: median/min > "
        f"{NOISY_RATIO}): " + ("their medians overstate the cost, rerun on a quiet machine before quoting them."
                               if noisy else "none."),
        "",
        "| case | torch default ms | torch fused ms | fastaccum ms (28 B) | vs default | vs fused "
        "| fastaccum GB/s | % of copy | `grad_writeback=False` ms (24 B) | its GB/s | its % of copy "
        "| write-back cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in speed:
        d, f, o, n = (c["paths"][k] for k in PATH_KEYS)
        lines.append(
            f"| {c['case']} | {_cell(d['ms'], d)} | {_cell(f['ms'], f)} | {_cell(o['ms'], o)} | "
            f"{c['speedup_vs_torch_default']:.2f}x | {c['speedup_vs_torch_fused']:.2f}x | "
            f"{o['gbps']:.1f} | {_pct(o, cache)} | {_cell(n['ms'], n)} | {n['gbps']:.1f} | {_pct(n, cache)} | "
            f"{c['writeback_cost']:.2f}x |"
        )
    for c in speed:
        if not c.get("torch_scaler_enabled", True):
            lines += ["", f"- {c['case']}: torch.amp.GradScaler cannot unscale {c['dtype']} grads on this "
                      "device, so torch's rows there are SGD alone (scaler disabled: no unscale, no inf "
                      "check, 20 B per element), less work than ours."]
    lines += [
        "",
        "Timings of every path (the medians above come from here):",
        "",
    ] + _timings_table(speed) + [
        "",
        "Legend:",
        "",
        "- ms: the **median** of the timed repeats (run round-robin over the paths after "
        f"{speed[0].get('warmup', 3)} warm-up rounds); **min**: the fastest repeat; "
        f"**spread** = {SPREAD_DEFINITION} (p90: 90th percentile), how far the slow tail reaches relative to "
        "the typical repeat.",
        f"- {NOISY_MARK} **noisy**: median/min > {NOISY_RATIO}, i.e. at least half the repeats took 30% more "
        "than the fastest: something else had the cores (see the load average above). The ratios computed "
        "from such a median are not to be trusted; rerun on a quiet machine, or with `--threads 1`, which "
        "keeps OpenMP threads from waiting at barriers for a busy core.",
        "- GB/s counts each path's minimum traffic per fp32 parameter at its median time: grad read twice, "
        "param and momentum read and written (24 B), plus the unscaled grad written back (28 B) where `.grad` "
        "ends as torch leaves it: torch's paths and fastaccum's default; `grad_writeback=False` leaves the "
        "scaled grad (24 B). Loss scale 1 + 2^-10, so every step unscales.",
        f"- **% of copy**: that GB/s over the best copy bandwidth above. **({cache})**: over 100%: the path "
        "moved its counted bytes faster than the best plain copy, so the figure is not a fraction of DRAM "
        f"bandwidth. Mostly the {cache} cache ({_mib(cache_bytes)} here) served part of the working set: "
        "the update pass re-reads the grads the check pass read, some still in cache, "
        "and small cases fit whole (each path keeps param, grad and momentum alive: "
        "`working_set_bytes` in the JSON). The copy's count also leaves out that, with ordinary stores, "
        "each destination line is read before it is written."
        + (f" {len(cached)} of {len(paths_all)} figures here are." if cached else "")
        + (f" Here the copy's own buffers fit in the {cache} (a quick run keeps them small), so the "
           "reference may itself be partly cache-served: figures under 100% can be cache-assisted too."
           if copy.get("exceeds_cache") is False else ""),
    ]
    lines += _counts_table(speed)
    lines += _variant_lines(
        speed, "table_speedup", "fastaccum_by_value", "table", "by value",
        "Launch mode (NOTE: [launch modes]; default: one launch per pass through a device table; "
        "by value: the launches of a captured step; above 1x the table passes are faster):")
    lines.append("")
    return lines


def _variant_lines(speed: list[dict], ratio: str, path: str, ours: str, theirs: str, title: str) -> list[str]:
    """Our default path against one variant of it (`path`), per case that has
    the `ratio`: ours and the variant's median, and the ratio."""
    cases = [c for c in speed if ratio in c]
    if not cases:
        return []
    return ["", title, ""] + [
        f"- {c['case']}: {ours} {c['paths']['fastaccum']['ms']:.3f} ms, "
        f"{theirs} {c['paths'][path]['ms']:.3f} ms ({c[ratio]:.3f}x)" for c in cases]


def _e2e(e: dict) -> list[str]:
    lines = [
        f"## End to end: the CNN training loop, K={e['accumulation_steps']}, micro-batch {e['micro_batch']}",
        "",
        f"{e['blocks']} timed blocks of {e['micro_batches_per_block']} micro-batches per loop, alternating.",
        "",
        "| loop | median ms per micro-batch | min ms | spread | median/min | noisy |",
        "|---|---:|---:|---:|---:|---|",
    ]
    names = {"torch_default": "torch SGD + GradScaler, loss / K", "fastaccum": "AccumOptimizer + GradScaler"}
    for key, label in names.items():
        st = e.get("loops", {}).get(key)
        if st:
            lines.append(f"| {label} | {st['median_ms']:.3f} | {st['min_ms']:.3f} | {st['spread']:.2f} | "
                         f"{st['median_over_min']:.2f} | " + (f"{NOISY_MARK} noisy" if st["noisy"] else "") + " |")
        else:
            lines.append(f"| {label} | {e[key + '_ms_per_micro_batch']:.3f} | | | | |")
    lines += [
        "",
        f"Speed-up {e['speedup']:.2f}x (medians; forward and backward dominate a model this small; the "
        "optimizer-step table above isolates the part this package changes)."
        + (f" {NOISY_MARK} noisy: do not quote this ratio." if e.get("noisy") else ""),
        "",
    ]
    t = e.get("launch_tables")
    if t:
        passes = t["uploads"] + t["hits"]
        lines += [
            f"Launch tables (our loop zeroes with `set_to_none=True`, so every window allocates new grads): "
            f"over {t['updates']} updates, {t['hits']} of {passes} passes found their table on the device "
            f"and {t['uploads']} uploaded it ({t['upload_bytes'] / max(t['uploads'], 1):.0f} B each).",
            "",
        ]
    return lines


def _clip(result: dict) -> list[str]:
    """The "step with clipping" section (benchmarks/clip.py)."""
    title = "## Step with clipping (`scaler.clip_grad_norm_` against `unscale_` + `clip_grad_norm_`)"
    cases_ = result.get("clip") or []
    skipped = result.get("clip_cases_skipped") or []
    if not cases_:
        why = result.get("clip_skipped") or ("every case skipped by the time budget" if skipped else "not run")
        return [title, "", f"Skipped: {why}."] + [f"- {c['case']}: {c['reason']}" for c in skipped] + [""]
    m = result.get("machine", {})
    cache, cache_bytes = m.get("last_level_cache", "L3"), m.get("last_level_cache_bytes")
    paths_all = [(c, k) for c in cases_ for k in c["paths"]]
    noisy = [(c, k) for c, k in paths_all if c["paths"][k].get("noisy")]
    cached = [(c, k) for c, k in paths_all if c["paths"][k].get("cache_resident")]
    b = clip.ACCESSES
    lines = [
        title,
        "",
        "One whole step per path, timed: torch: `scaler.unscale_(opt); "
        "torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True); scaler.step(opt); scaler.update()`; "
        "fastaccum: `scaler.clip_grad_norm_(opt, max_norm); scaler.step(opt); scaler.update()` (one read pass "
        "makes the norm with the inf/NaN check, the fused update applies the clip coefficient). "
        f"max_norm = {cases_[0]['clip_fraction']:g} x the norm of the unscaled grads, so every step clips; "
        f"loss scale {cases_[0]['loss_scale']:.6g} (1 + 2^-10), so every step unscales; each path's grads are "
        "restored from a saved copy before every step, outside the timing.",
        "",
        f"**{len(noisy)} of {len(paths_all)} path timings are noisy** ({NOISY_MARK}: median/min > "
        f"{NOISY_RATIO})" + (": do not quote their ratios." if noisy else ": none."),
        "",
        f"| case | torch default ms ({4 * b['torch_default']} B) | torch fused ms ({4 * b['torch_fused']} B) "
        f"| fastaccum ms ({4 * b['fastaccum']} B) | vs best torch | best torch GB/s | fastaccum GB/s | % of copy "
        f"| `grad_writeback=False` ms ({4 * b['fastaccum_no_writeback']} B) | its vs best torch | its GB/s "
        "| its % of copy | write-back cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases_:
        d, f, o, n = (c["paths"][k] for k in PATH_KEYS)
        best = c["paths"][c["best_torch"]]
        lines.append(
            f"| {c['case']} | {_cell(d['ms'], d)} | {_cell(f['ms'], f)} | {_cell(o['ms'], o)} | "
            f"**{c['speedup_vs_best_torch']:.2f}x** ({'fused' if c['best_torch'] == 'torch_fused' else 'default'}) | "
            f"{best['gbps']:.1f} | {o['gbps']:.1f} | {_pct(o, cache)} | {_cell(n['ms'], n)} | "
            f"{c['no_writeback_speedup_vs_best_torch']:.2f}x | {n['gbps']:.1f} | {_pct(n, cache)} | "
            f"{c['writeback_cost']:.2f}x |"
        )
    lines.append("")
    for c in cases_:
        coefs = sorted({round(v["clip_coef"], 4) for v in c["paths"].values()})
        lines.append(
            f"- {c['case']}: max_norm {c['max_norm']:.4g} (grads' unscaled norm {c['grad_norm']:.4g}); every "
            f"path's last step returned the norm within {c['norm_max_rel_diff']:.1e} (relative) of the others "
            f"and clipped by {', '.join(f'{x:g}' for x in coefs)}"
            + ("." if c["clipped"] else f" -- {NOISY_MARK} NOT every path clipped: the comparison is unsound."))
        if not c.get("torch_scaler_enabled", True):
            lines.append(
                f"- {c['case']}: torch.amp.GradScaler cannot unscale {c['dtype']} grads on this device, so "
                "torch's rows there run with the scaler disabled (no unscale, no inf check: "
                f"{clip.TORCH_UNSCALED} element accesses, {c['paths']['torch_default']['min_bytes'] // c['numel']} B "
                "per element), less work than ours.")
    for s in skipped:
        lines.append(f"- {s['case']}: {s['reason']}")
    lines += [
        "",
        "Timings of every path (the medians above come from here):",
        "",
    ] + _timings_table(cases_) + [
        "",
        "Legend: ms, min, median, p90, spread, noisy as in the speed table; **vs best torch**: the median of the "
        "faster torch path (named) over fastaccum's median, above 1 ours is faster. GB/s counts each path's "
        "minimum traffic per fp32 parameter at its median time (halve the bytes for bf16): fastaccum "
        f"{4 * b['fastaccum']} B (the norm/check pass reads the grad; the update reads it again, reads and writes "
        "param and momentum, writes the unscaled clipped grad back: the same bytes as the step without clipping); "
        f"`grad_writeback=False` {4 * b['fastaccum_no_writeback']} B (no write-back); torch "
        f"{4 * b['torch_default']} B (unscale_ reads and writes the grad, 8 B; the clip's norm reads it, 4 B, its "
        "multiply reads and writes it, 8 B, even at coefficient 1; the SGD step reads and writes param and "
        "momentum and reads the grad, 20 B; temporaries of torch's non-fused step not counted). "
        f"**% of copy** and **({cache})** as in the speed table ({_mib(cache_bytes)} of {cache} here)"
        + (f"; {len(cached)} of {len(paths_all)} figures here are cache-served." if cached else ".")
        + " The grad restore before each step leaves the end of the grads in the cache, as a backward pass "
        "would. **write-back cost**: fastaccum's median over `grad_writeback=False`'s.",
    ]
    lines += _counts_table(cases_, "step with clipping")
    lines.append("")
    return lines


def _host_time(result: dict) -> list[str]:
    h = result.get("host_time")
    if not h:
        why = result.get("host_time_skipped") or "not run"
        return ["## Per-step host time, many small tensors on the CPU", "", f"Skipped: {why}.", ""]
    r = h["ratios"]
    lines = [
        f"## Per-step host time: {h['n_tensors']:,} tensors of {h['numel']} fp32 elements on the CPU",
        "",
        f"The wall time of one updating step over {h['n_tensors']:,} parameters of {h['numel']} elements: "
        "the element work is negligible, what is left is the per-step host overhead (Python, dispatch, "
        f"C++). Momentum {h['hyper']['momentum']:g}, weight_decay {h['hyper']['weight_decay']:g}, "
        f"{h['threads']} thread{'s' if h['threads'] != 1 else ''}, {h['runs']} timed rounds"
        + (f" (of {h['runs_planned']} planned: cut by the time budget)" if h.get("cut_by_budget") else "")
        + f" after {h['warmup']} warm-up rounds, every path once per round.",
        "",
    ] + host_time_table(h, NOISY_MARK) + [
        "",
        f"Median ratios: torch default / AccumOptimizer K=1 **{r['torch_default_over_fastaccum']:.2f}x**, "
        f"torch `fused=True` / AccumOptimizer K=1 **{r['torch_fused_over_fastaccum']:.2f}x**, torch AMP "
        f"(`fused=True` + torch.amp.GradScaler) / AccumOptimizer K={h['accumulation_steps']} + GradScaler "
        f"boundary **{r['torch_amp_fused_over_fastaccum_scaler']:.2f}x** (above 1: ours takes less host time)."
        + (f" {NOISY_MARK} noisy timings: do not quote their ratios." if h.get("noisy") else ""),
        "",
        "Legend: grads are set once and kept (std 1e-3, loss scale 1 + 2^-10, nothing overflows: every "
        "timed step updates; **params changed**: the share of parameters the run changed, 100% unless a "
        f"path timed no-ops); the K={h['accumulation_steps']} path restores its grads (each boundary writes them "
        f"back unscaled) and runs its {h['accumulation_steps'] - 1} counting micro-steps outside the boundary's "
        "timing, each timed on its own: the 1st after a boundary finds the caches cold (the boundary and the "
        "restore walked every tensor), as it would after a backward pass; the last is the warmest (median of "
        "each position, µs: " + ", ".join(f"{t:,.0f}" for t in h.get("counting_position_median_us", []))
        + "). Python's "
        "garbage collector is off while timing. **µs/tensor**: µs per step / tensors; **samples**: timed "
        "steps. min, median, p90, spread, noisy: as in the tables above.",
        "",
    ]
    return lines


def _budget(result: dict) -> list[str]:
    b = result["budget"]
    lines = [
        f"## Time budget (`--time-budget {b['seconds']:g}`)",
        "",
        f"Used {b['used_s']:.1f} s of {b['seconds']:g} s (parity may take {b['parity_share']:.0%}, "
        f"{b['e2e_share']:.0%} is held back for the end-to-end loop, a speed case keeps at least "
        f"{b['min_repeats']} timed repeats). Stage times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in b["stages_s"].items()) + ".",
        "",
    ]
    timed = [("speed", c) for c in result["speed"]] + [("clip", c) for c in result.get("clip") or []]
    for kind, c in timed:
        cb = c.get("budget")
        if cb:
            lines.append(f"- {kind} {c['case']}: {cb['repeats_taken']} of {cb['repeats_planned']} timed repeats"
                         + (" (cut by the budget)" if cb["cut_by_budget"] else "") + f", {cb['case_s']:.1f} s")
    lines += [f"- {n}" for n in b["notes"]]
    if not b["notes"] and not any(c.get("budget", {}).get("cut_by_budget") for _, c in timed):
        lines.append("- nothing was cut or skipped")
    lines.append("")
    return lines


def markdown(result: dict) -> str:
    lines = _header(result) + _parity(result["parity"]) + _speed(result)
    if result.get("clip") or result.get("clip_skipped") or result.get("clip_cases_skipped"):
        lines += _clip(result)
    if result.get("host_time") or result.get("host_time_skipped"):
        lines += _host_time(result)
    if result.get("e2e"):
        lines += _e2e(result["e2e"])
    elif result.get("e2e_skipped"):
        lines += ["## End to end", "", f"Skipped: {result['e2e_skipped']}.", ""]
    if result.get("budget"):
        lines += _budget(result)
    return "\n".join(lines)


def _run_cases(kind: str, todo, time_fn, device: str, repeats: int, warmup: int, copy_gbps, budget, reserve: float,
               cases_after: int, skipped: list, note) -> list[dict]:
    """Times the cases of one section (speed, clip) with `time_fn` (speed.time_case's signature), each
    annotated with its fraction of the copy bandwidth. With a budget: each case gets an equal share of
    what is left less `reserve`, counting the `cases_after` cases of later sections; a case not expected
    to fit its minimum is skipped ({"case", "reason"} appended to `skipped`, and noted)."""
    done = []
    counts_s = 0.0  # time the last case spent counting syncs/launches (CUDA)
    bar = _progress(f"{kind:6s}")
    for i, (name, sizes, dtype) in enumerate(todo):
        if budget is None:
            done.append(annotate_copy_fraction(time_fn(name, sizes, dtype, device, repeats, warmup=warmup),
                                               copy_gbps))
        else:
            left = budget.left() - reserve
            need = budget.expected_min_cost(sum(sizes))
            if left <= 0 or need > left:
                why = (f"skipped: {max(0.0, left):.1f} s of the budget left for {kind} cases, "
                       f"its set-up, warm-up and {MIN_REPEATS} repeats expected to take {need:.1f} s")
                skipped.append({"case": name, "reason": why})
                note(f"{kind} {name}: {why}")
            else:
                share = budget.speed_share(len(todo) - i + cases_after, reserve)
                c = time_fn(name, sizes, dtype, device, repeats, warmup=warmup,
                            deadline=budget.now() + share, reserve_s=counts_s)
                counts_s = c["budget"]["counts_s"]
                budget.record_case_min_cost(sum(sizes), c["budget"]["min_part_s"])
                if c["budget"]["cut_by_budget"]:  # the case's "budget" entry records it
                    sys.stderr.write(f"time budget: {kind} {name}: {c['budget']['repeats_taken']} of "
                                     f"{repeats} timed repeats (its share: {share:.1f} s)\n")
                done.append(annotate_copy_fraction(c, copy_gbps))
        bar(i + 1, len(todo))
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Parity verdict and step-time table of torch_fastaccum against PyTorch, in one run.",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true",
                    help="small run for CI / a first look, every table row in reduced form: 30 parity "
                         "updates, the speed and clip cases at a tenth of their size above 1M elements, 7 repeats, "
                         "5 host-time rounds, a short end-to-end loop, one thread on a CPU (~10 s on 2 cores; "
                         "see README)")
    ap.add_argument("--updates", type=int, default=None, help="parity: optimizer updates (default 100, quick 30)")
    ap.add_argument("--accumulation-steps", type=int, default=4, help="parity: K micro-batches per update")
    ap.add_argument("--repeats", type=int, default=None, help="speed: timed repeats per path (default 20, quick 7)")
    ap.add_argument("--out", default="bench_out",
                    help="output folder for the .json, .md and .png (default bench_out/); an existing "
                         "<device>-<date> stem there gets -2, -3, ... rather than being overwritten")
    ap.add_argument("--skip-speed", action="store_true", help="parity only (no step-time table, no end-to-end)")
    ap.add_argument("--skip-clip", action="store_true",
                    help="no step-with-clipping section (benchmarks/clip.py: 10M fp32 / 160 tensors on a CPU, "
                         "1M / 160 in a quick run; the speed table's cases on CUDA)")
    ap.add_argument("--e2e-blocks", type=int, default=None,
                    help="end-to-end: timed blocks per loop, of 8 updates (quick: 2) (default 5, quick 2; 0 skips)")
    ap.add_argument("--host-time-tensors", type=int, default=10_000, metavar="N",
                    help="host-time section: N fp32 CPU tensors of 10 elements (default 10,000; 0 skips it); "
                         "30 timed rounds, 5 in a quick run")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the timings (default: torch's choice, but 1 for a "
                         "quick CPU run; recorded in the results); parity always runs on one")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="plan the run to end within SECONDS (from the start of the measurements): parity "
                         f"stops after {PARITY_SHARE * 100:.0f}%% of it, speed cases cut their repeats (never below "
                         f"{MIN_REPEATS}) or are skipped, the end-to-end loop times what still fits; every "
                         "cut is recorded in the .json and .md. Default: no budget")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error("--time-budget must be positive")
    if args.host_time_tensors < 0:
        ap.error("--host-time-tensors must be 0 (skip) or more")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    threads = args.threads
    if threads is None and args.quick and args.device == "cpu":
        # Measured on the project's 2-core machine while other jobs kept it
        # busy (load ~4): with 2 threads the quick run took 38-56 s, torch's
        # fused step waited up to 1.9 s at OpenMP barriers for 1,000 small
        # tensors and 23 of 28 timings were noisy; with 1 thread it took 9 s
        # and none was.
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)

    started = dt.datetime.now().astimezone()
    t_run = time.perf_counter()
    updates = args.updates or (30 if args.quick else 100)
    repeats = args.repeats or (7 if args.quick else 20)
    warmup = 2 if args.quick else 3
    block_updates = 2 if args.quick else 8
    k = args.accumulation_steps
    # Overflows in the very first window, mid-run, and two windows in a row.
    overflow = sorted({0, k * (updates // 3) + 1, k * (updates // 2), k * (updates // 2 + 1)})

    budget = TimeBudget(args.time_budget) if args.time_budget is not None else None

    def note(text):  # a cut or skip made by the budget: on stderr now, in the .json/.md later
        budget.note(text)
        sys.stderr.write(f"time budget: {text}\n")

    stages = {}  # seconds per stage, kept in every run (the budget keeps its own copy)

    def stage_done(name, t0):
        stages[name] = round(time.perf_counter() - t0, 2)
        if budget is not None:
            budget.record_stage(name, time.perf_counter() - t0)

    mach = machine(args.device)
    result = {"machine": mach, "run": run_info(argv, args, started)}
    t0 = time.perf_counter()
    result["parity"] = run_parity(updates, k, overflow, args.device, _progress("parity"),
                                  deadline=budget.deadline(PARITY_SHARE) if budget else None)
    stage_done("parity", t0)
    if result["parity"].get("cut_by_budget"):
        note(f"parity: stopped after {result['parity']['updates']} of {updates} updates "
             f"(its share is {PARITY_SHARE:.0%} of the budget); the verdict covers those")
    result["speed"] = []
    blocks = 0
    if args.skip_speed:
        result["host_time_skipped"] = "`--skip-speed`"
        result["clip_skipped"] = "`--skip-speed`"
    else:
        t0 = time.perf_counter()
        result["copy"] = measure_copy(
            args.device, copy_numel(args.device, mach["last_level_cache_bytes"], args.quick),
            runs=5 if args.quick else 7, cache_bytes=mach["last_level_cache_bytes"])
        result["copy_gbps"] = result["copy"]["gbps"]
        stage_done("copy_bandwidth", t0)
        todo = cases(args.device, args.quick)
        clip_todo = [] if args.skip_clip else clip.cases(args.device, args.quick)
        blocks = args.e2e_blocks if args.e2e_blocks is not None else (2 if args.quick else 5)
        reserve = budget.total * E2E_SHARE if budget is not None and blocks > 0 else 0.0
        t0 = time.perf_counter()
        speed_skipped = []
        result["speed"] = _run_cases("speed", todo, time_case, args.device, repeats, warmup, result["copy_gbps"],
                                     budget, reserve, len(clip_todo), speed_skipped, note)
        if speed_skipped:
            result["speed_skipped"] = speed_skipped
        stage_done("speed", t0)
        if args.skip_clip:
            result["clip_skipped"] = "`--skip-clip`"
        else:
            t0 = time.perf_counter()
            clip_skipped = []
            result["clip"] = _run_cases("clip", clip_todo, clip.time_clip_case, args.device, repeats, warmup,
                                        result["copy_gbps"], budget, reserve, 0, clip_skipped, note)
            if clip_skipped:
                result["clip_cases_skipped"] = clip_skipped
            stage_done("clip", t0)
        if args.host_time_tensors > 0:
            t0 = time.perf_counter()
            left = budget.left() - reserve if budget is not None else None
            if left is not None and left <= 0:
                result["host_time_skipped"] = "time budget spent before the host-time section"
                note(f"host time: {result['host_time_skipped']}")
            else:
                sys.stderr.write(f"host time: {args.host_time_tensors:,} small CPU tensors...\n")
                h = measure_host_time(n_tensors=args.host_time_tensors, quick=args.quick,
                                      deadline=budget.now() + left if budget is not None else None)
                result["host_time"] = h
                if h.get("cut_by_budget"):
                    note(f"host time: {h['runs']} of {h['runs_planned']} timed rounds")
            stage_done("host_time", t0)
        else:
            result["host_time_skipped"] = "`--host-time-tensors 0`"
        if blocks > 0:
            t0 = time.perf_counter()
            if budget is not None and budget.left() <= 0:
                result["e2e_skipped"] = "time budget spent before the end-to-end loop"
                note(f"end to end: {result['e2e_skipped']}")
            else:
                sys.stderr.write("end-to-end training loop timing...\n")
                e = time_e2e(args.device, k, blocks, block_updates=block_updates,
                             deadline=budget.deadline() if budget else None)
                if "skipped" in e:
                    result["e2e_skipped"] = e["skipped"]
                    note(f"end to end: skipped ({e['skipped']})")
                else:
                    result["e2e"] = e
                    if e.get("cut_by_budget"):
                        note(f"end to end: {e['blocks']} of {blocks} timed blocks")
            stage_done("e2e", t0)
    if budget is not None:
        result["budget"] = budget.as_dict()
    result["settings"] = {"updates": updates, "accumulation_steps": k, "overflow_micro_batches": overflow,
                          "repeats": repeats, "warmup": warmup, "e2e_blocks": blocks,
                          "clip": not (args.skip_clip or args.skip_speed),
                          "e2e_block_updates": block_updates, "quick": args.quick,
                          "threads": torch.get_num_threads(),
                          "threads_from": "--threads" if args.threads is not None
                          else "--quick" if threads is not None else "default"}
    result["noisy"] = any(c.get("noisy") for c in result["speed"] + result.get("clip", [])) \
        or bool(result.get("e2e", {}).get("noisy")) or bool(result.get("host_time", {}).get("noisy"))

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", mach.get("gpu") or args.device).strip("-").lower()
    stem = unique_stem(args.out, f"{slug}-{result['run']['date']}")
    try:
        why_not = write_png(result, stem + ".png")
    except Exception as e:  # the numbers stand without their plot
        why_not = f"plot failed: {type(e).__name__}: {e}"
    written = [stem + ".json", stem + ".md"] + ([] if why_not else [stem + ".png"])
    result["files"] = written
    result["plot_skipped"] = why_not
    result["run"]["wall_s"] = round(time.perf_counter() - t_run, 2)
    result["run"]["stages_s"] = stages
    result["run"]["loadavg_end"] = loadavg()
    md = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(md)
    if why_not:
        print(f"no PNG: {why_not}")
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0 if result["parity"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""python -m benchmarks: parity verdict and speed table, side by side in one run.

Writes <out>/<device>-<date>.json (machine-readable) and .md (the table).
With --time-budget SECONDS the run plans its stages to end within that many
seconds (benchmarks/budget.py) and records every cut or skip in both files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import time

import torch

import torch_fastaccum

from .budget import E2E_SHARE, MIN_REPEATS, PARITY_SHARE, TimeBudget
from .e2e import time_e2e
from .parity import run_parity
from .plot import write_png
from .speed import copy_bandwidth, cases, time_case


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


def machine(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_kernels": torch.ops.fastaccum._cpu_capability(),
        "date": dt.date.today().isoformat(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(result: dict) -> str:
    m = result["machine"]
    name = m.get("gpu") or m["cpu"]
    lines = [
        f"# torch_fastaccum benchmark: {name}",
        "",
        f"{m['date']}, torch {m['torch']}, device `{m['device']}`, {m['threads']} threads, "
        f"CPU kernels `{m['cpu_kernels']}`. Produced by `python -m benchmarks`.",
        "",
        "## Parity (reference: torch.optim.SGD + torch.amp.GradScaler, loss / K)",
        "",
    ]
    p = result["parity"]
    lines += [
        f"- verdict: **{'PASS' if p['pass'] else 'FAIL'}**",
        f"- {p['updates']} updates"
        + (f" (of {p['updates_planned']} planned: cut by the time budget)" if p.get("cut_by_budget") else "")
        + f", K={p['accumulation_steps']}, {p['micro_batches']} micro-batches, "
        f"overflow injected at micro-batches {p['overflow_micro_batches']}",
        f"- max |param diff| {p['max_param_abs_diff']:.3g} (max |param| {p['max_param_abs']:.3g})",
        f"- skip decisions identical: {p['skips_identical']} ({p['skipped_windows']} windows skipped)",
        f"- scale history identical: {p['scale_history_identical']} (final scale {p['final_scale']:g})",
        f"- max loss-curve difference: {p['max_loss_curve_diff']:.3g}",
        "",
        "## Optimizer step with a scaler (`scaler.step(opt); scaler.update()`), median",
        "",
        f"Copy bandwidth measured in this run: {result['copy_gbps']:.1f} GB/s. GB/s below counts each "
        "path's minimum traffic per fp32 parameter: grad read twice, param and momentum read and written "
        "(24 B), plus the unscaled grad written back (28 B) where `.grad` ends as torch leaves it: torch's "
        "paths and fastaccum's default; `grad_writeback=False` leaves the scaled grad (24 B). "
        "Loss scale 1 + 2^-10, so every step unscales.",
        "",
        "| case | torch default ms | torch fused ms | fastaccum ms (28 B) | vs default | vs fused "
        "| fastaccum GB/s | % of copy | `grad_writeback=False` ms (24 B) | its GB/s | write-back cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["speed"]:
        d, f, o, n = (c["paths"][k] for k in ("torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback"))
        lines.append(
            f"| {c['case']} | {d['ms']:.3f} | {f['ms']:.3f} | {o['ms']:.3f} | "
            f"{c['speedup_vs_torch_default']:.2f}x | {c['speedup_vs_torch_fused']:.2f}x | "
            f"{o['gbps']:.1f} | {100 * o['gbps'] / result['copy_gbps']:.0f}% | "
            f"{n['ms']:.3f} | {n['gbps']:.1f} | {c['writeback_cost']:.2f}x |"
        )
    if any("host_syncs" in c["paths"]["fastaccum"] for c in result["speed"]):
        lines += [
            "",
            "Host syncs / kernel launches per step (sync debug mode, profiler):",
            "",
            "| case | torch default | torch fused | fastaccum | `grad_writeback=False` |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in result["speed"]:
            cells = [f"{c['paths'][k].get('host_syncs', '?')} / {c['paths'][k].get('kernel_launches', '?')}"
                     for k in ("torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback")]
            lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    orders = [c for c in result["speed"] if "reverse_order_speedup" in c]
    if orders:
        lines += ["", "Update pass order (reverse = read first what the check pass read last):", ""]
        for c in orders:
            lines.append(f"- {c['case']}: forward {c['paths']['fastaccum_forward_order']['ms']:.3f} ms, "
                         f"reverse {c['paths']['fastaccum']['ms']:.3f} ms ({c['reverse_order_speedup']:.3f}x)")
    e = result.get("e2e")
    if e:
        lines += [
            "",
            f"## End to end: the CNN training loop, K={e['accumulation_steps']}, micro-batch {e['micro_batch']}",
            "",
            "| loop | ms per micro-batch |",
            "|---|---:|",
            f"| torch SGD + GradScaler, loss / K | {e['torch_default_ms_per_micro_batch']:.3f} |",
            f"| AccumOptimizer + GradScaler | {e['fastaccum_ms_per_micro_batch']:.3f} |",
            "",
            f"Speed-up {e['speedup']:.2f}x (forward and backward dominate a model this small; the "
            "optimizer-step table above isolates the part this package changes).",
        ]
    b = result.get("budget")
    if b:
        lines += [
            "",
            f"## Time budget (`--time-budget {b['seconds']:g}`)",
            "",
            f"Used {b['used_s']:.1f} s of {b['seconds']:g} s (parity may take {b['parity_share']:.0%}, "
            f"{b['e2e_share']:.0%} is held back for the end-to-end loop, a speed case keeps at least "
            f"{b['min_repeats']} timed repeats). Stage times: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in b["stages_s"].items()) + ".",
            "",
        ]
        for c in result["speed"]:
            cb = c.get("budget")
            if cb:
                lines.append(f"- speed {c['case']}: {cb['repeats_taken']} of {cb['repeats_planned']} timed repeats"
                             + (" (cut by the budget)" if cb["cut_by_budget"] else "") + f", {cb['case_s']:.1f} s")
        lines += [f"- {n}" for n in b["notes"]]
        if not b["notes"] and not any(c.get("budget", {}).get("cut_by_budget") for c in result["speed"]):
            lines.append("- nothing was cut or skipped")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Parity verdict and step-time table of torch_fastaccum against PyTorch, in one run.",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="small run for CI / a first look (< 1 min on 2 cores)")
    ap.add_argument("--updates", type=int, default=None, help="parity: optimizer updates (default 100, quick 30)")
    ap.add_argument("--accumulation-steps", type=int, default=4, help="parity: K micro-batches per update")
    ap.add_argument("--repeats", type=int, default=None, help="speed: timed repeats per path (default 20, quick 7)")
    ap.add_argument("--out", default="bench_out", help="output folder for the .json and .md (default bench_out/)")
    ap.add_argument("--skip-speed", action="store_true", help="parity only (no step-time table, no end-to-end)")
    ap.add_argument("--e2e-blocks", type=int, default=None,
                    help="end-to-end: timed blocks of 8 updates per loop (default 5, quick 2; 0 skips)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="plan the run to end within SECONDS (from the start of the measurements): parity "
                         f"stops after {PARITY_SHARE * 100:.0f}%% of it, speed cases cut their repeats (never below "
                         f"{MIN_REPEATS}) or are skipped, the end-to-end loop times what still fits; every "
                         "cut is recorded in the .json and .md. Default: no budget")
    args = ap.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error("--time-budget must be positive")

    updates = args.updates or (30 if args.quick else 100)
    repeats = args.repeats or (7 if args.quick else 20)
    k = args.accumulation_steps
    # Overflows in the very first window, mid-run, and two windows in a row.
    overflow = sorted({0, k * (updates // 3) + 1, k * (updates // 2), k * (updates // 2 + 1)})

    budget = TimeBudget(args.time_budget) if args.time_budget is not None else None

    def note(text):  # a cut or skip made by the budget: on stderr now, in the .json/.md later
        budget.note(text)
        sys.stderr.write(f"time budget: {text}\n")

    def stage_done(name, t0):
        if budget is not None:
            budget.record_stage(name, time.perf_counter() - t0)

    result = {"machine": machine(args.device)}
    t0 = time.perf_counter()
    result["parity"] = run_parity(updates, k, overflow, args.device, _progress("parity"),
                                  deadline=budget.deadline(PARITY_SHARE) if budget else None)
    stage_done("parity", t0)
    if result["parity"].get("cut_by_budget"):
        note(f"parity: stopped after {result['parity']['updates']} of {updates} updates "
             f"(its share is {PARITY_SHARE:.0%} of the budget); the verdict covers those")
    t0 = time.perf_counter()
    result["copy_gbps"] = copy_bandwidth(args.device, 25_000_000 if args.device == "cuda" else 10_000_000)
    stage_done("copy_bandwidth", t0)
    result["speed"] = []
    if not args.skip_speed:
        todo = cases(args.device, args.quick)
        blocks = args.e2e_blocks if args.e2e_blocks is not None else (2 if args.quick else 5)
        reserve = budget.total * E2E_SHARE if budget is not None and blocks > 0 else 0.0
        counts_s = 0.0  # time the last case spent counting syncs/launches (CUDA)
        bar = _progress("speed ")
        t0 = time.perf_counter()
        for i, (name, sizes, dtype) in enumerate(todo):
            if budget is None:
                result["speed"].append(time_case(name, sizes, dtype, args.device, repeats))
            else:
                left = budget.left() - reserve
                need = budget.expected_min_cost(sum(sizes))
                if left <= 0 or need > left:
                    why = (f"skipped: {max(0.0, left):.1f} s of the budget left for speed cases, "
                           f"its set-up, warm-up and {MIN_REPEATS} repeats expected to take {need:.1f} s")
                    result.setdefault("speed_skipped", []).append({"case": name, "reason": why})
                    note(f"speed {name}: {why}")
                else:
                    share = budget.speed_share(len(todo) - i, reserve)
                    c = time_case(name, sizes, dtype, args.device, repeats,
                                  deadline=budget.now() + share, reserve_s=counts_s)
                    counts_s = c["budget"]["counts_s"]
                    budget.record_case_min_cost(sum(sizes), c["budget"]["min_part_s"])
                    if c["budget"]["cut_by_budget"]:  # the case's "budget" entry records it
                        sys.stderr.write(f"time budget: speed {name}: {c['budget']['repeats_taken']} of "
                                         f"{repeats} timed repeats (its share: {share:.1f} s)\n")
                    result["speed"].append(c)
            bar(i + 1, len(todo))
        stage_done("speed", t0)
        if blocks > 0:
            t0 = time.perf_counter()
            if budget is not None and budget.left() <= 0:
                result["e2e_skipped"] = "time budget spent before the end-to-end loop"
                note(f"end to end: {result['e2e_skipped']}")
            else:
                sys.stderr.write("end-to-end training loop timing...\n")
                e = time_e2e(args.device, k, blocks, block_updates=8,
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

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["machine"].get("gpu") or args.device).strip("-").lower()
    stem = os.path.join(args.out, f"{slug}-{result['machine']['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    why_not = write_png(result, stem + ".png")
    print(f"wrote {stem}.json, {stem}.md" + (f" ({why_not})" if why_not else f" and {stem}.png"))
    return 0 if result["parity"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

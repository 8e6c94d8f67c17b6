"""python -m benchmarks: parity verdict and speed table, side by side in one run.

Writes <out>/<device>-<date>.json (machine-readable) and .md (the table).
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
        f"- {p['updates']} updates, K={p['accumulation_steps']}, {p['micro_batches']} micro-batches, "
        f"overflow injected at micro-batches {p['overflow_micro_batches']}",
        f"- max |param diff| {p['max_param_abs_diff']:.3g} (max |param| {p['max_param_abs']:.3g})",
        f"- skip decisions identical: {p['skips_identical']} ({p['skipped_windows']} windows skipped)",
        f"- scale history identical: {p['scale_history_identical']} (final scale {p['final_scale']:g})",
        f"- max loss-curve difference: {p['max_loss_curve_diff']:.3g}",
        "",
        "## Optimizer step with a scaler (`scaler.step(opt); scaler.update()`), median",
        "",
        f"Copy bandwidth measured in this run: {result['copy_gbps']:.1f} GB/s. GB/s below counts the "
        "minimum traffic (24 B per fp32 parameter: grad read twice, param and momentum read and written).",
        "",
        "| case | torch default ms | torch fused ms | fastaccum ms | vs default | vs fused | fastaccum GB/s | % of copy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["speed"]:
        d, f, o = (c["paths"][k] for k in ("torch_default", "torch_fused", "fastaccum"))
        lines.append(
            f"| {c['case']} | {d['ms']:.3f} | {f['ms']:.3f} | {o['ms']:.3f} | "
            f"{c['speedup_vs_torch_default']:.2f}x | {c['speedup_vs_torch_fused']:.2f}x | "
            f"{o['gbps']:.1f} | {100 * o['gbps'] / result['copy_gbps']:.0f}% |"
        )
    if any("host_syncs" in c["paths"]["fastaccum"] for c in result["speed"]):
        lines += [
            "",
            "Host syncs / kernel launches per step (sync debug mode, profiler):",
            "",
            "| case | torch default | torch fused | fastaccum |",
            "|---|---:|---:|---:|",
        ]
        for c in result["speed"]:
            cells = [f"{c['paths'][k].get('host_syncs', '?')} / {c['paths'][k].get('kernel_launches', '?')}"
                     for k in ("torch_default", "torch_fused", "fastaccum")]
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
    args = ap.parse_args(argv)

    updates = args.updates or (30 if args.quick else 100)
    repeats = args.repeats or (7 if args.quick else 20)
    k = args.accumulation_steps
    # Overflows in the very first window, mid-run, and two windows in a row.
    overflow = sorted({0, k * (updates // 3) + 1, k * (updates // 2), k * (updates // 2 + 1)})

    result = {"machine": machine(args.device)}
    result["parity"] = run_parity(updates, k, overflow, args.device, _progress("parity"))
    result["copy_gbps"] = copy_bandwidth(args.device, 25_000_000 if args.device == "cuda" else 10_000_000)
    result["speed"] = []
    if not args.skip_speed:
        todo = cases(args.device, args.quick)
        bar = _progress("speed ")
        for i, (name, sizes, dtype) in enumerate(todo):
            result["speed"].append(time_case(name, sizes, dtype, args.device, repeats))
            bar(i + 1, len(todo))
        blocks = args.e2e_blocks if args.e2e_blocks is not None else (2 if args.quick else 5)
        if blocks > 0:
            sys.stderr.write("end-to-end training loop timing...\n")
            result["e2e"] = time_e2e(args.device, k, blocks, block_updates=8)

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

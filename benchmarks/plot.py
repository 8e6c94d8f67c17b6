"""The PNG of a benchmark run.

Top row: the parity run, its two loss curves (which coincide when the
parity holds, so the second panel shows their difference and the largest
parameter difference after every update: a line at zero, not two curves
drawn over each other). Bottom row: the optimizer-step times relative to
torch's default path, and the end-to-end loop, every bar labelled with its
value; noisy timings (benchmarks/stats.py) are hatched."""

from __future__ import annotations

import textwrap

PATHS = ("torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback")
LABELS = ("torch SGD (foreach)", "torch SGD fused=True", "fastaccum", "fastaccum grad_writeback=False")


def _loss_panel(ax, p: dict) -> None:
    ref, ours = p["ref_loss"], p["our_loss"]
    ax.plot(ref, label="torch SGD + GradScaler (loss / K)", lw=2.5, alpha=0.6)
    ax.plot(ours, label="AccumOptimizer + GradScaler", lw=1, ls="--", color="k")
    for w in p.get("skipped_window_indices", []):
        ax.axvline(w, color="red", alpha=0.2)
    ax.axhline(2.302585, color="grey", lw=0.8, ls=":")
    ax.text(0, 2.302585, " ln 10: chance", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel(f"update (K={p['accumulation_steps']} micro-batches each; red: skipped window)")
    ax.set_ylabel("training loss (window mean)")
    verdict = "PASS" if p["pass"] else "FAIL"
    first, last = (ref[0], ref[-1]) if ref else (float("nan"), float("nan"))
    ax.set_title(f"parity {verdict}: loss {first:.2f} -> {last:.2f} on learnable synthetic data\n"
                 "(the two curves coincide: see the difference panel)", fontsize=9)
    ax.legend(fontsize=8)


def _diff_panel(ax, p: dict) -> None:
    loss_diff = [abs(a - b) for a, b in zip(p["ref_loss"], p["our_loss"])]
    param_diff = p.get("param_diff_per_update") or []
    ax.plot(loss_diff, label="|loss_ref - loss_ours| (window mean)", marker=".", lw=1)
    if param_diff:
        ax.plot(param_diff, label="max |param_ref - param_ours| after the update", marker="x", lw=1, ms=4)
    for w in p.get("skipped_window_indices", []):
        ax.axvline(w, color="red", alpha=0.2)
    worst = max(loss_diff + list(param_diff) or [0.0])
    if worst == 0.0:
        ax.set_ylim(-1, 1)
        ax.text(0.5, 0.6, "0 at every update:\nparameters and losses bit for bit identical",
                transform=ax.transAxes, ha="center", fontsize=9)
    else:
        ax.set_yscale("symlog", linthresh=max(worst * 1e-3, 1e-12))
    bitwise = p.get("params_bitwise_identical")
    ax.set_title(f"difference per update: max |param diff| {p['max_param_abs_diff']:.2g}"
                 + ("" if bitwise is None else f", bitwise identical: {bitwise}")
                 + f"\nskips identical: {p['skips_identical']}, scale history identical: "
                 f"{p['scale_history_identical']}", fontsize=9)
    ax.set_xlabel("update")
    ax.set_ylabel("absolute difference")
    ax.legend(fontsize=8, loc="upper right")


def _label(ax, bars, texts, fontsize=7) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=fontsize, rotation=90)


def _speed_panel(ax, result: dict) -> None:
    from matplotlib.ticker import FuncFormatter

    speed = result["speed"]
    names = [c["case"] for c in speed]
    width = 0.2
    top, bottom = 1.0, 1.0
    for j, (key, label) in enumerate(zip(PATHS, LABELS)):
        base = [c["paths"]["torch_default"]["ms"] for c in speed]
        ys = [c["paths"][key]["ms"] / b for c, b in zip(speed, base)]
        mins = [c["paths"][key].get("min_ms", c["paths"][key]["ms"]) / b for c, b in zip(speed, base)]
        xs = [i + (j - 1.5) * width for i in range(len(names))]
        bars = ax.bar(xs, ys, width, label=label)
        for bar, c in zip(bars, speed):
            if c["paths"][key].get("noisy"):
                bar.set_hatch("///")
                bar.set_edgecolor("k")
        # the path's fastest repeat, over the same torch-default median
        ax.scatter(xs, mins, marker="_", s=120, color="k", lw=1.5, zorder=3,
                   label="min (fastest repeat)" if j == 0 else None)
        _label(ax, bars, [f"{y:.2f}x" for y in ys])
        top = max([top] + ys)
        bottom = min([bottom] + ys + mins)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([textwrap.fill(n, 18) for n in names], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom / 1.5, top * 8)  # room for the labels and the legend
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("step time / torch default median\n(log scale, lower is better)")
    m = result["machine"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    ax.set_title(f"optimizer step + scaler, {m.get('gpu') or m['cpu']}, {threads}: median / torch "
                 "default median; hatched: noisy (median/min > 1.3)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=3)


def _e2e_panel(ax, e: dict | None) -> None:
    if not e:
        ax.axis("off")
        ax.text(0.5, 0.5, "end-to-end loop not run", ha="center", transform=ax.transAxes)
        return
    keys = ("torch_default", "fastaccum")
    labels = ("torch SGD\n+ GradScaler", "AccumOptimizer\n+ GradScaler")
    loops = e.get("loops", {})
    ys = [e[k + "_ms_per_micro_batch"] for k in keys]
    lo = [y - loops.get(k, {}).get("min_ms", y) for k, y in zip(keys, ys)]
    hi = [loops.get(k, {}).get("p90_ms", y) - y for k, y in zip(keys, ys)]
    bars = ax.bar(range(2), ys, 0.6, color=["C0", "C2"], yerr=[lo, hi], capsize=3)
    for bar, k in zip(bars, keys):
        if loops.get(k, {}).get("noisy"):
            bar.set_hatch("///")
            bar.set_edgecolor("k")
    for bar, y in zip(bars, ys):
        ax.annotate(f"{y:.2f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(top=max(y + h for y, h in zip(ys, hi)) * 1.2)
    ax.set_xticks(range(2))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ms per micro-batch (median)")
    ax.set_title(f"end to end (K={e['accumulation_steps']}, micro-batch {e['micro_batch']}):\n"
                 f"speed-up {e['speedup']:.2f}x" + (", noisy (hatched)" if e.get("noisy") else "")
                 + "; whiskers min..p90", fontsize=9)


def write_png(result: dict, path: str) -> str | None:
    """Writes the figure; returns None (and says why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG"
    fig = plt.figure(figsize=(14, 9))
    grid = fig.add_gridspec(2, 4)
    p = result["parity"]
    _loss_panel(fig.add_subplot(grid[0, :2]), p)
    _diff_panel(fig.add_subplot(grid[0, 2:]), p)
    if result["speed"]:
        _speed_panel(fig.add_subplot(grid[1, :3]), result)
        _e2e_panel(fig.add_subplot(grid[1, 3]), result.get("e2e"))
    else:
        ax = fig.add_subplot(grid[1, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no speed cases in this run", ha="center", transform=ax.transAxes)
    run = result.get("run", {})
    git = run.get("git") or {}
    code = f"git {git['commit'][:10]}" + (" + uncommitted changes" if git.get("dirty") else "") \
        if git.get("commit") else "not a git checkout"
    fig.suptitle(f"torch_fastaccum {run.get('package_version', '?')} ({code}), {run.get('datetime', '')}, "
                 f"{result['machine']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

"""The PNG of a benchmark run: loss curves of both loops, step-time bars."""

from __future__ import annotations


def write_png(result: dict, path: str) -> str | None:
    """Writes the figure; returns None (and says why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG"
    speed = result["speed"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    p = result["parity"]
    ax = axes[0]
    ax.plot(p["ref_loss"], label="torch SGD + GradScaler (loss / K)", lw=2.5, alpha=0.6)
    ax.plot(p["our_loss"], label="AccumOptimizer + GradScaler", lw=1, ls="--")
    for w in p.get("skipped_window_indices", []):
        ax.axvline(w, color="red", alpha=0.2)
    ax.set_xlabel(f"update (K={p['accumulation_steps']} micro-batches each; red: skipped)")
    ax.set_ylabel("training loss (window mean)")
    ax.set_title(f"parity: max |param diff| {p['max_param_abs_diff']:.2g}")
    ax.legend()
    ax = axes[1]
    if speed:
        names = [c["case"] for c in speed]
        paths = ["torch_default", "torch_fused", "fastaccum", "fastaccum_no_writeback"]
        labels = ["torch SGD (foreach)", "torch SGD fused=True", "fastaccum", "fastaccum grad_writeback=False"]
        width = 0.2
        for j, (key, label) in enumerate(zip(paths, labels)):
            ys = [c["paths"][key]["ms"] / c["paths"]["torch_default"]["ms"] for c in speed]
            ax.bar([i + (j - 1.5) * width for i in range(len(names))], ys, width, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("step time / torch default, log scale (lower is better)")
        ax.set_title(f"optimizer step + scaler, {result['machine'].get('gpu') or result['machine']['cpu']}",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

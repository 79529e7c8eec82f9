"""matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def subplots(*args, **kwargs):
    """``plt.subplots`` on the Agg backend (no display needed): returns ``(fig, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: str | Path, **tight_layout) -> Path:
    """Lay out, write and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**tight_layout)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto_plot(result: dict, path: str | Path, *, stage: str = "after_prefill") -> Path | None:
    """Scatter of stored-bytes ratio (x, ``stage`` = "after_prefill" | "after_decode") vs Δppl % (y), one
    labelled point per method of an evaluation result. Returns the path, or None if no method has a ppl."""
    points = [
        (row["memory"][stage]["ratio"], row["ppl"]["dppl_pct"], row["spec"])
        for row in result["methods"]
        if "ppl" in row and "memory" in row
    ]
    if not points:
        return None
    fig, ax = subplots(figsize=(6.4, 4.4), dpi=120)
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    for x, y, label in points:
        ax.scatter([x], [y], s=28, zorder=2)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    cfg = result["config"]
    when = "after prefill" if stage == "after_prefill" else "after decoding"
    ax.set_xlabel(f"stored-bytes ratio vs fp16 ({when}, higher = smaller cache)")
    ax.set_ylabel("Δ perplexity vs full cache (%)")
    title = f"{result['model']['name']}: P={cfg['prompt_len']}, C={cfg['cont_len']}, {cfg['windows']} windows"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return save(fig, path)

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
    """Stored-bytes ratio (x, ``stage`` = "after_prefill" | "after_decode") vs Δppl % (y) of an evaluation result:
    one labelled point per method, the frontier drawn (:func:`frontier_plot`). Returns the path, or None if no method
    has a ppl."""
    points = [
        (row["memory"][stage]["ratio"], row["ppl"]["dppl_pct"], row["spec"])
        for row in result["methods"]
        if "ppl" in row and "memory" in row
    ]
    if not points:
        return None
    cfg = result["config"]
    when = "after prefill" if stage == "after_prefill" else "after decoding"
    title = f"{result['model']['name']}: P={cfg['prompt_len']}, C={cfg['cont_len']}, {cfg['windows']} windows"
    return frontier_plot(points, path, title=title, xlabel=f"stored-bytes ratio vs fp16 ({when}, log scale)")


def _axis_scales(ax, xs, ys, extra_y=()) -> None:
    """x: log2 (ratios 1x..16x+); y: linear, or symlog when a few points lie far above the rest."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    lo, hi = min(xs), max(xs)
    ax.set_xlim(min(lo, 1.0) / 1.15, hi * 1.35)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    top, bottom = max(list(ys) + list(extra_y)), min(ys)
    if top > 40 and top > 8 * max(sorted(ys)[len(ys) // 2], 1.0):
        ax.set_yscale("symlog", linthresh=5.0, linscale=1.0)
        ax.set_ylim(min(bottom, 0.0) - 1.0, top * 2.0)
    else:
        span = max(top - min(bottom, 0.0), 1.0)
        ax.set_ylim(min(bottom, 0.0) - 0.08 * span, top + 0.15 * span)


def _place_labels(fig, ax, xs, ys, labels, shown, fontsize=7) -> None:
    """Annotate each point where its label overlaps no other label and no marker (greedy, tried offsets in order;
    the least-overlapping offset when none is free); a thin leader line when the label sits away from its point."""
    renderer = fig.canvas.get_renderer()
    offsets = [(6, 3), (6, -9), (-6, 3), (-6, -9), (6, 12), (6, -18), (-6, 12), (-6, -18), (14, 22), (14, -28),
               (-14, 22), (-14, -28), (24, 34), (24, -40), (-24, 34), (-24, -40), (0, 46), (0, -52)]
    pts = ax.transData.transform(list(zip(xs, ys)))
    markers = [(x - 4, y - 4, x + 4, y + 4) for x, y in pts]
    placed: list[tuple[float, float, float, float]] = []

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(shown, key=lambda i: (-ys[i], xs[i]))
    axbox = ax.get_window_extent(renderer)
    for i in order:
        best = None
        for dx, dy in offsets:
            ann = ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha="left" if dx >= 0 else "right", va="bottom")
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            cost = sum(overlap(box, b) for b in placed) + sum(overlap(box, m) for j, m in enumerate(markers) if j != i)
            outside = (max(axbox.x0 - box[0], 0) + max(box[2] - axbox.x1, 0) + max(axbox.y0 - box[1], 0)
                       + max(box[3] - axbox.y1, 0)) * 50
            cost += outside
            ann.remove()
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        far = abs(dx) > 6 or abs(dy) > 12
        ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                    ha="left" if dx >= 0 else "right", va="bottom",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55", shrinkA=0, shrinkB=2) if far else None)
        placed.append(box)


def frontier_plot(points, path: str | Path, *, title: str = "", xlabel: str | None = None,
                  max_loss: float | None = None, min_ratio: float | None = None, best: str | None = None,
                  label: str = "all") -> Path:
    """``points``: ``(ratio, dppl_pct, label)``. Log-2 x axis, y linear (symlog when outliers would squash the rest),
    the Pareto frontier (higher ratio, lower loss) as the staircase of the least loss at each ratio, its points filled, the others hollow, labels
    placed so they do not overlap (``label="frontier"``: only the frontier's and the best's); optional dashed limits
    ``max_loss`` / ``min_ratio`` and a starred ``best``."""
    from .tune import pareto_front

    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    labels = [str(p[2]) for p in points]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = subplots(figsize=(8.0, 5.6), dpi=120)
    _axis_scales(ax, xs, ys, () if max_loss is None else (max_loss * 1.1,))
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    if max_loss is not None:
        ax.axhline(max_loss, color="tab:green", lw=0.9, ls="--", zorder=1, label=f"max loss {max_loss:g} %")
    if min_ratio is not None:
        ax.axvline(min_ratio, color="tab:purple", lw=0.9, ls="--", zorder=1, label=f"min ratio {min_ratio:g}x")
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    if len(front) > 1:
        ax.step(fx, fy, where="pre", color="tab:red", lw=1.2, alpha=0.8, zorder=2, label="Pareto frontier")
    on = set(front)
    ax.scatter([xs[i] for i in range(len(xs)) if i not in on], [ys[i] for i in range(len(xs)) if i not in on],
               s=26, facecolors="white", edgecolors="tab:blue", zorder=3, label="measured")
    ax.scatter(fx, fy, s=30, color="tab:red", zorder=4, label="on the frontier")
    if best is not None and best in labels:
        i = labels.index(best)
        ax.scatter([xs[i]], [ys[i]], s=160, marker="*", color="gold", edgecolors="k", lw=0.6, zorder=5, label="best")
    ax.set_xlabel(xlabel or "stored-bytes ratio vs fp16 (after prefill, log scale)")
    ax.set_ylabel("Δ perplexity vs full cache (%)" + (" (symlog)" if ax.get_yscale() == "symlog" else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=6, frameon=False)
    fig.tight_layout()
    shown = range(len(xs)) if label == "all" else sorted(set(front) | ({labels.index(best)} if best in labels else set()))
    _place_labels(fig, ax, xs, ys, labels, shown)
    return save(fig, path)

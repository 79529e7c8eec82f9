"""attention spikes over token distance (LogQuant's observation): does spike density fall like 1/distance?

``kvcompress profile spikes --model smollm2-135m --data FILE --tokens 2048 --queries 64 --samples 2 --out DIR``

Prefills ``samples`` windows of ``tokens`` tokens of real text, recomputes the softmax attention of the last
``queries`` positions of every layer and query head (post-RoPE queries and keys, exactly what the model attends
with), and calls the ``top_k`` keys of each (layer, head, query) its *spikes*. Distances ``d = query - key`` are
binned by octaves (0, 1, 2-3, 4-7, ...); the first token (the attention sink) is counted apart. Per bin: share of
spikes, spike *density* (spikes per key at that distance, per query and head) and attention mass. A log law
(Chen et al., 2025) means density ~ 1/d: slope -1 on log-log axes; the fitted slope is reported per layer and
overall (and apart for distances below / from ``FAR`` = 128, to show where the law bends). It also reports
which share of the spikes and of the attention mass LogQuant's full-precision set (window ``W``) covers, against
sets of the same size: the most recent tokens (KIVI's residual) and the first token + the most recent. Writes
``spikes.json``, ``spikes.md`` and ``spikes.png`` under ``--out``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import KeepAll, add_common_arguments
from ..attention import grouped_probs
from ..cache import CompressedCache, ModelGeometry
from ..config import check_positive_int
from ..compat import cache_kwargs
from ..methods.logquant import log_schedule
from ..observe import Observer
from ..registry import KVCompressError

DEFAULT_OUT = "results/profile-spikes"
#: full-precision sets compared, each holding as many tokens as LogQuant's: its own, the most recent tokens
#: (KIVI's residual), the first token + the most recent ones (StreamingLLM's sink + window)
KEPT_SETS = ("logquant", "window", "sink_window")
FAR = 128  # distances from here on are fitted apart ("far" slope)


@torch.inference_mode()
def attention_of_last(model, input_ids: torch.Tensor, queries: int) -> list[torch.Tensor]:
    """Prefill ``input_ids (1, n)``; per layer the probabilities of the last ``queries`` positions,
    ``(heads, queries, n)`` fp32 (causal; sliding-window layers are not masked to their window)."""
    cache = CompressedCache(model, KeepAll(model, KeepAll.Config()))
    observer = Observer(model, cache, keep=True)  # read after the forward, removed below
    try:
        model(input_ids=input_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        probs = []
        for i, layer in enumerate(cache.layers):
            q = observer.query_states(i, last=queries)
            p = grouped_probs(q, layer.k, observer.scaling(i), causal=True)  # (1, kv, g, Q, n)
            probs.append(p.flatten(1, 2)[0])
        return probs
    finally:
        observer.remove()


def octave_bins(max_distance: int) -> list[tuple[int, int]]:
    """``[(0, 1), (1, 2), (2, 4), (4, 8), ...]`` half-open distance ranges covering ``0..max_distance``."""
    bins, lo = [(0, 1)], 1
    while lo <= max_distance:
        bins.append((lo, 2 * lo))
        lo *= 2
    return bins


def _fit_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log(y) on log(x) over the points with y > 0 (NaN when fewer than 2)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else float("nan")


class _Tally:
    """Spike counts, exposure (keys available) and mass per distance bin, plus coverage by a kept-token set."""

    def __init__(self, n_bins: int):
        self.spikes = torch.zeros(n_bins + 1, dtype=torch.float64)  # last slot: the first token (sink)
        self.mass = torch.zeros(n_bins + 1, dtype=torch.float64)
        self.exposure = torch.zeros(n_bins + 1, dtype=torch.float64)  # keys at that distance x (heads, queries)
        self.covered = {name: [0.0, 0.0] for name in KEPT_SETS}  # [spikes, mass]

    def add(self, probs, top, bin_of, kept_sets):
        """``probs (heads, Q, n)``, ``top (heads, Q, k)`` spike indices, ``bin_of (Q, n)`` bin per key (-1 =
        not visible), ``kept_sets``: name -> bool ``(Q, n)`` full-precision keys."""
        h = probs.shape[0]
        nb = self.spikes.shape[0]
        visible = bin_of >= 0
        self.exposure += torch.bincount(bin_of[visible], minlength=nb).double() * h
        self.mass += torch.bincount(bin_of[visible], weights=probs.sum(0)[visible].double(), minlength=nb)
        spike_bins = torch.gather(bin_of.expand(h, -1, -1), 2, top)
        self.spikes += torch.bincount(spike_bins.flatten(), minlength=nb).double()
        for name, kept in kept_sets.items():
            self.covered[name][0] += float(torch.gather(kept.expand(h, -1, -1), 2, top).sum())
            self.covered[name][1] += float((probs * kept).sum())


def profile_spikes(model, windows: torch.Tensor, queries: int = 64, top_k: int = 8, window: int = 42) -> dict:
    """``windows: (samples, tokens)`` ids -> a dict of per-bin and per-layer figures (lists, JSON-ready)."""
    n = int(windows.shape[1])
    check_positive_int(top_k, "--top-k", "profile spikes")
    check_positive_int(window, "--window", "profile spikes")
    if not 1 <= queries < n:
        raise KVCompressError(f"profile spikes: --queries must be in [1, {n - 1}] for {n}-token windows, got {queries}")
    if top_k > n - queries:
        raise KVCompressError(f"profile spikes: --top-k={top_k} exceeds the {n - queries + 1} keys the first query sees")
    g = ModelGeometry.from_model(model)
    bins = octave_bins(n - 1)
    pos_q = torch.arange(n - queries, n)
    dist = pos_q.view(-1, 1) - torch.arange(n).view(1, -1)  # (Q, n)
    edges = torch.tensor([lo for lo, _ in bins[1:]])
    bin_of = torch.bucketize(dist.clamp(min=0), edges, right=True)
    bin_of[:, 0] = len(bins)  # the first token: its own slot
    bin_of[dist < 0] = -1
    kept = {name: torch.zeros(queries, n, dtype=torch.bool) for name in KEPT_SETS}
    for i, t in enumerate(pos_q.tolist()):  # query t sees the cache of t tokens + itself
        fp = log_schedule([t], window)[0] + [t]
        kept["logquant"][i, fp] = True
        kept["window"][i, t + 1 - len(fp) : t + 1] = True
        kept["sink_window"][i, t + 2 - len(fp) : t + 1] = True
        kept["sink_window"][i, 0] = True
    kept_lq = kept["logquant"]
    layers = [_Tally(len(bins)) for _ in range(g.num_layers)]
    for row in windows:
        for l, probs in enumerate(attention_of_last(model, row.view(1, -1), queries)):
            top = probs.topk(top_k, dim=-1).indices
            layers[l].add(probs, top, bin_of, kept)

    total = _Tally(len(bins))
    for t in layers:
        total.spikes += t.spikes
        total.mass += t.mass
        total.exposure += t.exposure
        for k in total.covered:
            total.covered[k] = [a + b for a, b in zip(total.covered[k], t.covered[k])]
    centers = [math.sqrt(lo * (hi - 1)) if lo else 0.0 for lo, hi in bins]

    def density(t: _Tally) -> list[float]:
        return (t.spikes / t.exposure.clamp(min=1)).tolist()

    def summary(t: _Tally) -> dict:
        d = density(t)
        n_spikes, n_mass = float(t.spikes.sum()), float(t.mass.sum())
        near = [i for i in range(1, len(bins)) if bins[i][0] < FAR]
        far = [i for i in range(1, len(bins)) if bins[i][0] >= FAR]
        return {
            "slope": _fit_slope(centers[1:], d[1 : len(bins)]),  # distance >= 1, sink excluded
            "slope_near": _fit_slope([centers[i] for i in near], [d[i] for i in near]),
            "slope_far": _fit_slope([centers[i] for i in far], [d[i] for i in far]),
            "sink_spike_share": float(t.spikes[-1]) / n_spikes,
        } | {f"{name}_spike_coverage": t.covered[name][0] / n_spikes for name in KEPT_SETS} | {
            f"{name}_mass_coverage": t.covered[name][1] / n_mass for name in KEPT_SETS
        }

    vis = bin_of >= 0  # LogQuant's full-precision share of the keys per distance bin, over the queries
    fp_exposure = torch.bincount(bin_of[vis], minlength=len(bins) + 1).double()
    fp_kept = torch.bincount(bin_of[vis], weights=kept_lq[vis].double(), minlength=len(bins) + 1)
    d_all = density(total)
    rows = []
    for i, (lo, hi) in enumerate(bins + [(0, 0)]):
        rows.append(
            {
                "bin": "first token" if i == len(bins) else (f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"),
                "lo": lo,
                "hi": hi,
                "spike_share": float(total.spikes[i] / total.spikes.sum()),
                "spike_density": d_all[i],
                "mass_share": float(total.mass[i] / total.mass.sum()),
                "logquant_fp_share": float(fp_kept[i] / fp_exposure[i]) if fp_exposure[i] else 0.0,
            }
        )
    return {
        "model": g.model_id,
        "tokens": n,
        "queries": queries,
        "samples": int(windows.shape[0]),
        "top_k": top_k,
        "window": window,
        "bins": rows,
        "overall": summary(total),
        "layers": [summary(t) | {"layer": l} for l, t in enumerate(layers)],
        "fit_centers": centers,
    }


def markdown(result: dict) -> str:
    o = result["overall"]
    lines = [
        f"Attention spikes of {result['model']}: the top-{result['top_k']} keys of each (layer, head, query) for the "
        f"last {result['queries']} queries of {result['samples']} x {result['tokens']}-token windows.",
        "",
        "| distance | spikes | spike density (per key) | attention mass | LogQuant fp share (W="
        f"{result['window']}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["bins"]:
        lines.append(
            f"| {r['bin']} | {100 * r['spike_share']:.1f} % | {r['spike_density']:.4f} | {100 * r['mass_share']:.1f} % "
            f"| {100 * r['logquant_fp_share']:.0f} % |"
        )
    lines += [
        "",
        f"Fitted log-log slope of spike density vs distance (distance >= 1, first token excluded): "
        f"**{o['slope']:.2f}** (a 1/d log law is -1); {o['slope_near']:.2f} for distances 1-{FAR - 1}, "
        f"{o['slope_far']:.2f} from {FAR} on. First token: {100 * o['sink_spike_share']:.1f} % of spikes.",
        "",
        "Covered by a full-precision set of LogQuant's size (spikes / attention mass): LogQuant's own "
        f"{100 * o['logquant_spike_coverage']:.1f} % / {100 * o['logquant_mass_coverage']:.1f} %, the most recent "
        f"tokens {100 * o['window_spike_coverage']:.1f} % / {100 * o['window_mass_coverage']:.1f} %, the first token + "
        f"the most recent {100 * o['sink_window_spike_coverage']:.1f} % / {100 * o['sink_window_mass_coverage']:.1f} %.",
        "",
        "| layer | slope | first-token spikes | spikes covered: LogQuant / recent / first+recent "
        "| mass covered: LogQuant / recent / first+recent |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in result["layers"]:
        spikes = " / ".join(f"{100 * s[f'{k}_spike_coverage']:.1f}" for k in KEPT_SETS)
        mass = " / ".join(f"{100 * s[f'{k}_mass_coverage']:.1f}" for k in KEPT_SETS)
        lines.append(f"| {s['layer']} | {s['slope']:.2f} | {100 * s['sink_spike_share']:.1f} % | {spikes} % | {mass} % |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """Spike density vs distance (log-log, with a 1/d guide and LogQuant's fp share) and the per-layer slopes."""
    from ..plots import save, subplots

    rows = [r for r in result["bins"] if r["lo"] >= 1]
    x = result["fit_centers"][1 : 1 + len(rows)]
    fig, axes = subplots(1, 2, figsize=(12, 4.5), dpi=110)
    ax = axes[0]
    dens = [r["spike_density"] for r in rows]
    ax.loglog(x, dens, "o-", label="spike density (per key)")
    ax.loglog(x, [r["logquant_fp_share"] for r in rows], "s--", ms=4, label=f"LogQuant fp share (W={result['window']})")
    ref = next((d for d in dens if d > 0), 1.0)
    ax.loglog(x, [ref * x[0] / v for v in x], ":", color="0.5", label="1/d (log law)")
    ax.set_xlabel("distance to the query (tokens, octave bins)")
    ax.set_ylabel("share of keys")
    ax.set_title(f"overall slope {result['overall']['slope']:.2f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot([s["layer"] for s in result["layers"]], [s["slope"] for s in result["layers"]], "o-", ms=3)
    ax.axhline(-1, color="0.5", ls=":", label="-1 (log law)")
    ax.set_xlabel("layer")
    ax.set_ylabel("log-log slope")
    ax.set_title("per-layer slope of spike density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['model']}: top-{result['top_k']} spikes, last {result['queries']} queries of "
        f"{result['samples']} x {result['tokens']} tokens",
        fontsize=10,
    )
    return save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# CLI hook (`kvcompress profile spikes`)
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    add_common_arguments(p, tokens=2048, samples=2, out=DEFAULT_OUT)
    p.add_argument("--queries", type=int, default=64, help="last positions of each window used as queries (default 64)")
    p.add_argument("--top-k", type=int, default=8, help="keys per (layer, head, query) counted as spikes (default 8)")
    p.add_argument("--window", type=int, default=42, help="LogQuant W for the coverage columns (default 42)")


def run(args) -> int:
    from ..data import load_text, token_windows
    from ..models import load_model

    for name in ("tokens", "queries", "samples", "top_k", "window"):
        check_positive_int(getattr(args, name), f"--{name.replace('_', '-')}", "profile spikes")
    if args.queries >= args.tokens:
        raise KVCompressError(f"profile spikes: --queries={args.queries} must be smaller than --tokens={args.tokens}")
    text = load_text(args.data)
    model, tok = load_model(args.model)
    windows = token_windows(tok, text, args.tokens, args.samples, seed=args.seed)
    result = profile_spikes(model, windows, args.queries, args.top_k, args.window)
    result["data"] = str(args.data)
    md = markdown(result)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spikes.json").write_text(json.dumps(result, indent=1))
    (out / "spikes.md").write_text(md)
    png = plot(result, out / "spikes.png")
    print(f"wrote {out / 'spikes.json'}, {out / 'spikes.md'}, {png}")
    return 0

"""adjacent-layer similarity of K and V after prefill (where MiniCache merging is safe): table + heatmap

``kvcompress profile layers --model smollm2-135m --data FILE --tokens 1024 --samples 2 --out DIR``

Prefills ``samples`` windows of ``tokens`` tokens of real text through a cache that keeps every token of every
layer, then, per adjacent layer pair (l, l+1), reports the mean per-token cosine similarity of K and of V (mean
over windows, batch rows, KV heads and tokens; keys post-RoPE, as cached -- two layers of the same type share the
rotation, so it cancels) and the share of (head, token) entries MiniCache would keep exactly at ``gamma``
(retention rule of :mod:`kvcompress.methods.minicache`, normalized over the whole prompt). Writes
``layers.json``, ``layers.md`` and ``layers.png`` (heatmaps of the similarity of every two layers, K and V, and
the adjacent-pair curves) under ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import KeepAll, add_common_arguments
from ..compat import cache_kwargs
from ..cache import CompressedCache, ModelGeometry
from ..config import check_positive_int, check_ratio
from ..methods.minicache import retention_mask, unit

DEFAULT_OUT = "results/profile-layers"


@torch.inference_mode()
def capture_kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill ``input_ids (b, n)``; per layer the post-RoPE ``(keys, values)``, each ``(b, kv_heads, n, d)`` fp32."""
    cache = CompressedCache(model, KeepAll(model, KeepAll.Config()))
    model(input_ids=input_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return [(layer.k.float(), layer.v.float()) for layer in cache.layers]


def similarity_matrix(states: list[torch.Tensor]) -> torch.Tensor:
    """``states``: per layer ``(b, h, n, d)`` -> ``(L, L)`` mean per-(b, h, token) cosine similarity."""
    u = torch.stack([unit(x)[1].reshape(-1, x.shape[-1]) for x in states])  # (L, M, d)
    return torch.einsum("imd,jmd->ij", u, u) / u.shape[1]


def profile_layers(model, windows: torch.Tensor, gamma: float = 0.05) -> dict:
    """``windows: (samples, tokens)`` ids -> ``{"cos_k": (L, L), "cos_v": (L, L), "pairs": [...]}`` (lists)."""
    check_ratio(gamma, "gamma", "profile layers", low_open=False, high_open=False)
    g = ModelGeometry.from_model(model)
    cos_k = torch.zeros(g.num_layers, g.num_layers, dtype=torch.float64)
    cos_v = torch.zeros_like(cos_k)
    kept = torch.zeros(max(g.num_layers - 1, 0), dtype=torch.float64)
    for row in windows:
        kv = capture_kv(model, row.view(1, -1))
        cos_k += similarity_matrix([k for k, _ in kv]).double()
        cos_v += similarity_matrix([v for _, v in kv]).double()
        for l in range(g.num_layers - 1):
            (ka, va), (kb, vb) = kv[l], kv[l + 1]
            kept[l] += retention_mask(ka, va, kb, vb, gamma)[0].double().mean()
    n = len(windows)
    cos_k, cos_v, kept = cos_k / n, cos_v / n, kept / n
    pairs = [
        {
            "pair": [l, l + 1],
            "types": [g.layer_types[l], g.layer_types[l + 1]],
            "cos_k": float(cos_k[l, l + 1]),
            "cos_v": float(cos_v[l, l + 1]),
            "retained": float(kept[l]),
        }
        for l in range(g.num_layers - 1)
    ]
    return {
        "model": g.model_id,
        "num_layers": g.num_layers,
        "layer_types": list(g.layer_types),
        "samples": n,
        "tokens": int(windows.shape[1]),
        "gamma": gamma,
        "cos_k": cos_k.tolist(),
        "cos_v": cos_v.tolist(),
        "pairs": pairs,
    }


def markdown(result: dict) -> str:
    short = {"full_attention": "full", "sliding_attention": "sliding"}
    lines = [
        f"Adjacent-layer similarity of {result['model']} ({result['samples']} x {result['tokens']} tokens; "
        f"retained = share of (head, token) entries kept exactly at gamma={result['gamma']})",
        "",
        "| pair | types | cos K | cos V | retained |",
        "|---|---|---:|---:|---:|",
    ]
    for p in result["pairs"]:
        types = "/".join(short.get(t, t) for t in p["types"])
        lines.append(f"| {p['pair'][0]}-{p['pair'][1]} | {types} | {p['cos_k']:.3f} | {p['cos_v']:.3f} | "
                     f"{100 * p['retained']:.1f} % |")
    return "\n".join(lines) + "\n"


def heatmap(result: dict, path: str | Path) -> Path:
    """Two ``(L, L)`` heatmaps (K, V) and the adjacent-pair curves, with the default start layer L/2 marked."""
    from ..plots import save, subplots
    from matplotlib.ticker import MaxNLocator

    L = result["num_layers"]
    fig, axes = subplots(1, 3, figsize=(15, 4.6), dpi=110)
    for ax, key, title in ((axes[0], "cos_k", "keys"), (axes[1], "cos_v", "values")):
        m = torch.tensor(result[key]).numpy()
        im = ax.imshow(m, vmin=min(0.0, float(m.min())), vmax=1.0, cmap="viridis", origin="upper")
        ax.set_title(f"{title}: mean cosine similarity")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    x = [p["pair"][1] for p in result["pairs"]]
    ax.plot(x, [p["cos_k"] for p in result["pairs"]], "o-", ms=3, label="K")
    ax.plot(x, [p["cos_v"] for p in result["pairs"]], "s-", ms=3, label="V")
    ax.axvline(L // 2, color="0.6", ls="--", lw=0.8, label="default start S = L/2")
    ax.set_xlabel("l (pair l-1, l)")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title("adjacent layers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {result['samples']} x {result['tokens']} tokens", fontsize=10)
    return save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# CLI hook (`kvcompress profile layers`)
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    add_common_arguments(p, tokens=1024, samples=2, out=DEFAULT_OUT)
    p.add_argument("--gamma", type=float, default=0.05, help="MiniCache retention threshold for the retained column")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..data import load_text, token_windows
    from ..models import load_model

    check_positive_int(args.tokens, "--tokens", "profile layers")
    check_positive_int(args.samples, "--samples", "profile layers")
    check_ratio(args.gamma, "--gamma", "profile layers", low_open=False, high_open=False)
    text = load_text(args.data)
    model, tok = load_model(args.model)
    windows = token_windows(tok, text, args.tokens, args.samples, seed=args.seed)
    result = profile_layers(model, windows, args.gamma)
    result["data"] = str(args.data)

    table = Table(title=f"adjacent-layer similarity: {result['model']}")
    for col in ("pair", "types", "cos K", "cos V", f"retained @ gamma={args.gamma}"):
        table.add_column(col, justify="right")
    for p in result["pairs"]:
        table.add_row(f"{p['pair'][0]}-{p['pair'][1]}", "/".join(t.split("_")[0] for t in p["types"]),
                      f"{p['cos_k']:.3f}", f"{p['cos_v']:.3f}", f"{100 * p['retained']:.1f} %")
    Console(width=120).print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps(result, indent=1))
    (out / "layers.md").write_text(markdown(result))
    png = heatmap(result, out / "layers.png")
    print(f"wrote {out / 'layers.json'}, {out / 'layers.md'}, {png}")
    return 0

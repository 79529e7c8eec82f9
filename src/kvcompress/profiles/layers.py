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

import hashlib
import json
import os
from pathlib import Path

import torch

from . import KeepAll, add_common_arguments
from ..compat import cache_kwargs
from ..cache import CompressedCache, ModelGeometry
from ..config import check_positive_int, check_ratio
from ..registry import KVCompressError
from ..methods.minicache import retention_mask, unit

DEFAULT_OUT = "results/profile-layers"
SIMILARITY_TOKENS = 512  # tokens of the built-in calibration text behind MiniCache's default pair choice
SIMILARITY_FORMAT = "kvcompress-layer-similarity/1"


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


# --------------------------------------------------------------------------------------------------------------------
# Adjacent-pair similarity at make_cache time (MiniCache's default pair choice), cached per model
# --------------------------------------------------------------------------------------------------------------------


def _fingerprint(model) -> str:
    """sha256 over the model id, its geometry and the bytes of the first and last attention layers' k/v projection
    weights: the same model gives the same key, another model (or other weights under the same name) another one."""
    from ..observe import attention_modules

    g = ModelGeometry.from_model(model)
    h = hashlib.sha256(f"{g.model_id}|{g.num_layers}|{g.num_kv_heads}|{g.head_dim}|{list(g.layer_types)}".encode())
    attn = attention_modules(model)
    for i in (min(attn), max(attn)):
        for proj in (attn[i].k_proj, attn[i].v_proj):
            h.update(proj.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _tokenizer_for(model):
    """The model's tokenizer when one is on disk next to its weights (or it is an embedded/hub model), else None."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        from ..models import resolve

        return AutoTokenizer.from_pretrained(str(resolve(name, progress=False)))
    except Exception:  # noqa: BLE001 - no tokenizer to be found: fall back to text sampled from the model
        return None


def calibration_ids(model, tokens: int = SIMILARITY_TOKENS) -> tuple[torch.Tensor, str]:
    """``(1, tokens)`` ids of the built-in calibration text and where they came from.

    The text is the standard library's own prose (``pydoc_data.topics``, the Python reference's topic pages: always
    installed, English prose with some code), tokenized by the model's tokenizer. A model with no tokenizer on disk
    (e.g. one built from a config) gets ``tokens`` tokens sampled from itself instead (seed 0, temperature 1)."""
    tok = _tokenizer_for(model)
    if tok is not None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        ids = tok(text[: 40 * tokens], return_tensors="pt").input_ids[:, :tokens]
        if ids.shape[1] == tokens:
            return ids, "pydoc_data.topics"
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (1, 1), generator=gen)
    cache = CompressedCache(model, KeepAll(model, KeepAll.Config()))
    with torch.inference_mode():
        step = ids
        for _ in range(tokens - 1):
            logits = model(input_ids=step, **cache_kwargs(model, cache), use_cache=True).logits[:, -1].float()
            step = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            ids = torch.cat([ids, step], dim=1)
    return ids, "sampled from the model (no tokenizer found)"


def adjacent_similarity(model, tokens: int = SIMILARITY_TOKENS, use_cache: bool = True) -> dict:
    """Mean per-token cosine similarity of K and of V of every adjacent layer pair on the built-in calibration text
    (:func:`calibration_ids`): ``{"pairs": [{"pair": [l, l+1], "cos_k", "cos_v"}], "tokens", "source", ...}``.

    Cost: one prefill of ``tokens`` tokens (plus, for a model without a tokenizer, sampling them). The result is kept
    as JSON in ``$KVCOMPRESS_CACHE/layer-similarity/<fingerprint>.json`` (fingerprint over the model id, geometry and
    some weights) and reused while the fingerprint and ``tokens`` match."""
    from ..models import cache_dir

    check_positive_int(tokens, "tokens", "layer similarity")
    if tokens < 2:
        raise KVCompressError("layer similarity: needs at least 2 calibration tokens")
    key = _fingerprint(model)
    path = cache_dir() / "layer-similarity" / f"{key[:32]}.json"
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("format") == SIMILARITY_FORMAT and cached.get("fingerprint") == key \
                    and cached.get("tokens") == tokens:
                return cached
        except (OSError, ValueError):
            pass  # unreadable: recompute and overwrite
    ids, source = calibration_ids(model, tokens)
    result = profile_layers(model, ids)
    out = {
        "format": SIMILARITY_FORMAT,
        "fingerprint": key,
        "model": result["model"],
        "num_layers": result["num_layers"],
        "tokens": tokens,
        "source": source,
        "token_ids_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
        "pairs": [{k: p[k] for k in ("pair", "types", "cos_k", "cos_v")} for p in result["pairs"]],
    }
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache directory only costs the recomputation next time
    return out


def load_similarity(path, num_layers: int) -> dict:
    """Read a ``layers.json`` written by ``kvcompress profile layers`` (or the cached similarity) for a model of
    ``num_layers`` layers; one clear KVCompressError for anything else."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
        pairs = [{"pair": [int(x["pair"][0]), int(x["pair"][1])], "cos_k": float(x["cos_k"]),
                  "cos_v": float(x["cos_v"])} for x in data["pairs"]]
        layers = int(data["num_layers"])
    except OSError as exc:
        raise KVCompressError(f"layer similarity: cannot read {str(p)!r} ({exc})") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise KVCompressError(f"layer similarity: {str(p)!r} is not a layers.json written by "
                              f"`kvcompress profile layers` ({exc!r})") from None
    if layers != num_layers:
        raise KVCompressError(f"layer similarity: {str(p)!r} profiles a {layers}-layer model, this one has "
                              f"{num_layers} layers")
    return {**data, "pairs": pairs, "source": str(p)}


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

"""Calibrate FastKV's tsp_layer: the earliest layer whose TSP run keeps the final hidden states close to the full model's.

``kvcompress calibrate fastkv --model smollm2-135m --data ../shared/data/wikitext-2-raw/wiki.test.raw --tsp-rate 0.2``

Rule (the paper's: the earliest layer whose final hidden state stays closest to the full model's, made
concrete): for every candidate layer ``l`` (full-attention layers ``0 … L−2``, or ``--layers``) and every
calibration window, run the model once with the full cache and once with ``fastkv(tsp_layer=l, tsp_rate,
budget=1.0)`` (the KV budget does not change the prefill's hidden states). ``similarity(l)`` = the mean, over
windows and over the propagated (TSP) tokens, of the cosine similarity between the two final hidden states
(after the model's last norm) at the same positions. The chosen layer is the earliest ``l`` with
``similarity(l) >= threshold``; if none reaches it, the most similar layer. The last token's cosine and
the KL of its next-token distribution are recorded too. Output: a small JSON file with the choice, the rule and
every per-layer score.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..compat import cache_kwargs
from ..config import check_ratio
from ..registry import KVCompressError

FORMAT = "kvcompress-fastkv-calibration/1"


@torch.no_grad()
def full_hidden(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Final hidden states (after the last norm) of the full model, ``(length, hidden)`` per window."""
    from .. import make_cache

    out = []
    for row in windows:
        with make_cache("full", model) as full:
            out.append(model.get_decoder()(row.view(1, -1), **cache_kwargs(model.get_decoder(), full)).last_hidden_state[0])
    return out


def layer_similarity(model, windows: torch.Tensor, refs: list[torch.Tensor], tsp_layer: int, tsp_rate: float) -> dict:
    """Scores of one candidate layer over ``windows (n, length)`` token ids (batch of one at a time) against the
    full model's final hidden states ``refs``."""
    from .. import make_cache

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cos_all, cos_last, kl_last = [], [], []
    fraction = None
    for row, ref in zip(windows, refs):
        ids = row.view(1, -1)
        with torch.no_grad():
            with make_cache("fastkv", model, tsp_layer=tsp_layer, tsp_rate=tsp_rate, budget=1.0) as cache:
                out = decoder(ids, **cache_kwargs(decoder, cache)).last_hidden_state[0]  # (|TSP|, hidden)
                index = cache.method.tsp_index
                fraction = cache.method.prefill_fraction(ids.shape[1])
        ref = ref if index is None else ref[index[0]]
        cos = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1)
        cos_all.append(cos.mean())
        cos_last.append(cos[-1])
        with torch.no_grad():
            p, q = head(ref[-1:]).log_softmax(-1), head(out[-1:]).log_softmax(-1)
        kl_last.append((p.exp() * (p - q)).sum())
    return {
        "layer": tsp_layer,
        "similarity": float(torch.stack(cos_all).mean()),
        "last_token_cosine": float(torch.stack(cos_last).mean()),
        "last_token_kl": float(torch.stack(kl_last).mean()),
        "prefill_fraction": float(fraction),
    }


def choose_layer(scores: list[dict], threshold: float) -> int:
    """The earliest layer with ``similarity >= threshold``, else the most similar one."""
    ordered = sorted(scores, key=lambda s: s["layer"])
    for s in ordered:
        if s["similarity"] >= threshold:
            return s["layer"]
    return max(ordered, key=lambda s: (s["similarity"], -s["layer"]))["layer"]


def calibrate(model, windows: torch.Tensor, tsp_rate: float = 0.2, threshold: float = 0.95,
              layers: list[int] | None = None, progress: bool = False) -> dict:
    """Score every candidate TSP layer on ``windows (n, length)`` and pick one (see the module docstring)."""
    from ..cache import ModelGeometry

    check_ratio(tsp_rate, "tsp_rate", "fastkv calibrate", low_open=True, high_open=False)
    if not 0 < threshold <= 1:
        raise KVCompressError(f"fastkv calibrate: threshold={threshold} must be in (0, 1]")
    g = ModelGeometry.from_model(model)
    allowed = [i for i in range(g.num_layers - 1) if not g.is_sliding(i)]
    layers = allowed if layers is None else sorted(set(layers))
    bad = [i for i in layers if i not in allowed]
    if bad or not layers:
        raise KVCompressError(f"fastkv calibrate: candidate layers {bad or layers} are not full-attention layers "
                              f"in [0, {g.num_layers - 2}] (allowed: {allowed})")
    scores, t0 = [], time.perf_counter()
    refs = full_hidden(model, windows)
    for layer in layers:
        scores.append(layer_similarity(model, windows, refs, layer, tsp_rate))
        if progress:
            s = scores[-1]
            print(f"  tsp_layer={layer:3d}  similarity={s['similarity']:.4f}  last-token cos={s['last_token_cosine']:.4f}"
                  f"  KL={s['last_token_kl']:.4f}  prefill={s['prefill_fraction']:.2f}", flush=True)
    return {
        "format": FORMAT,
        "model_id": g.model_id,
        "num_layers": g.num_layers,
        "tsp_rate": float(tsp_rate),
        "threshold": threshold,
        "rule": "earliest layer with mean cosine(final hidden, TSP vs full) >= threshold, else the most similar",
        "windows": int(windows.shape[0]),
        "prompt_len": int(windows.shape[1]),
        "tsp_layer": choose_layer(scores, threshold),
        "layers": scores,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, local path or hub id")
    parser.add_argument("--data", default="pydoc",
                        help="calibration text: 'pydoc', a text file, a directory of .txt (not the evaluation text)")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--samples", type=int, default=2, help="calibration windows")
    parser.add_argument("--tsp-rate", type=float, default=0.2, help="share of the prompt propagated (as at run time)")
    parser.add_argument("--threshold", type=float, default=0.95, help="similarity the chosen layer must reach")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="candidate layers (default: all allowed)")
    parser.add_argument("--seed", type=int, default=0, help="which windows of the text are drawn")
    parser.add_argument("--out", default=None, help="output JSON (default fastkv-<model>.json)")


def run(args) -> int:
    from .. import load_model
    from ..data import load_text, token_windows

    if args.prompt_len < 16 or args.samples < 1:
        raise KVCompressError("fastkv calibrate: need --prompt-len >= 16 and --samples >= 1")
    check_ratio(args.tsp_rate, "--tsp-rate", "fastkv calibrate", low_open=True, high_open=False)
    text = load_text(args.data)
    model, tok = load_model(args.model)
    windows = token_windows(tok, text, args.prompt_len, args.samples, seed=args.seed)
    result = calibrate(model, windows, args.tsp_rate, args.threshold, args.layers, progress=True)
    result["data"] = str(args.data)
    out = Path(args.out or f"fastkv-{Path(args.model).name}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"chose tsp_layer={result['tsp_layer']} ({result['rule']}, threshold {args.threshold}); wrote {out}\n"
          f"use: make_cache('fastkv', model, tsp_layer={result['tsp_layer']}, tsp_rate={args.tsp_rate})")
    return 0

"""Calibrate KVQuant on text: Fisher-weighted nuq codebooks and per-channel key outlier thresholds.

``kvcompress calibrate kvquant --model smollm2-135m --data ../shared/data/paul-graham-essays --bits 3``
(or ``make_cache("kvquant", model, calibration="auto")``: :func:`auto_calibration`, once per model, cached)

1. Fisher information from real gradients: for each calibration sequence (one at a time, so memory stays
   bounded) a forward + backward of the mean next-token NLL with the weights frozen; forward hooks keep the
   key activations (``k_proj`` output, or ``k_norm`` output where the model normalizes keys: the pre-RoPE
   keys the cache sees) and ``v_proj`` outputs with ``retain_grad``; Fisher = squared gradient, per element.
   The first ``exclude_first`` tokens of each sequence (the attention sink) are left out of everything.
2. Per layer, for keys (pre-RoPE, and post-RoPE for ``pre_rope=False``) per-channel outlier thresholds at
   ``outliers/2`` and ``1 - outliers/2`` over the calibration tokens (min/max for 0); for values per-token
   thresholds (as at run time). Values are normalized to [-1, 1] like the cache does (keys per channel with
   the thresholds; values per token -- ``value_token``, one range over all KV heads, the paper -- and per token
   and head -- ``value``, for ``token_range="head"``) and outliers are left out of the fit.
3. Per layer and for K / V: ``2**bits`` levels by Fisher-weighted 1-D k-means (``kvcompress.quant.fit_codebook``),
   and the Q-Norm variant (levels mapped affinely so the dequantized data keeps the mean/std of the data).

The file is safetensors (never a pickle); its header metadata ``"kvquant"`` holds JSON: model id, layer/head
shapes, bits and outlier fractions covered, data hash, token counts, time. A ``.json`` copy of the metadata is
written next to it for reading; loading uses only the safetensors header.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant import fit_codebook, normalize_minmax, outlier_thresholds, quantize_codebook
from ..registry import KVCompressError

FORMAT = "kvcompress-kvquant-calibration/1"
VARIANTS = ("key_pre", "key_post", "value", "value_token")  # value: ranges per token and head; value_token: per token
ALLOWED_BITS = (2, 3, 4)


def tensor_name(bits: int, outliers: float, which: str, what: str) -> str:
    return f"b{bits}/o{outliers:g}/{which}/{what}"


# --------------------------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """``meta`` (JSON-able dict) and ``tensors``: per (bits, outliers, variant) ``codebook``/``qnorm``
    ``(layers, 2**bits)`` fp32 and, for keys, ``lower``/``upper`` ``(layers, kv_heads, head_dim)`` fp32."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    def _outliers_key(self, outliers: float) -> float | None:
        for o in self.meta["outliers"]:
            if abs(float(o) - float(outliers)) < 1e-9:
                return float(o)
        return None

    def check(self, geometry, bits: int, outliers: float) -> None:
        """Raise KVCompressError unless this file fits the model and covers (bits, outliers)."""
        m = self.meta
        if m["model_id"] != geometry.model_id:
            raise KVCompressError(
                f"kvquant: the calibration file is for model {m['model_id']!r}, not {geometry.model_id!r}; "
                "calibrate this model with `kvcompress calibrate kvquant`"
            )
        want = {"num_layers": geometry.num_layers, "num_kv_heads": geometry.num_kv_heads, "head_dim": geometry.head_dim}
        bad = [f"{k}={m[k]} (model: {v})" for k, v in want.items() if m[k] != v]
        if bad:
            raise KVCompressError(f"kvquant: the calibration file has other shapes than the model: {', '.join(bad)}")
        if bits not in m["bits"]:
            raise KVCompressError(f"kvquant: the calibration file covers bits {m['bits']}, not {bits}; "
                                  f"recalibrate with --bits {bits}")
        o = self._outliers_key(outliers)
        if o is None:
            raise KVCompressError(f"kvquant: the calibration file covers outlier fractions {m['outliers']}, not "
                                  f"{outliers}; recalibrate with --outliers {outliers}")
        L, h, d, k = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, 1 << bits
        for which in VARIANTS:
            shapes = {"codebook": (L, k), "qnorm": (L, k)}
            if which.startswith("key"):
                shapes |= {"lower": (L, h, d), "upper": (L, h, d)}
            for what, shape in shapes.items():
                t = self.tensors.get(tensor_name(bits, o, which, what))
                if t is None or tuple(t.shape) != shape:
                    raise KVCompressError(f"kvquant: the calibration file lacks {tensor_name(bits, o, which, what)} "
                                          f"of shape {shape} (corrupt or written by another version)")

    def layer_entry(self, bits: int, outliers: float, which: str, layer: int) -> dict[str, torch.Tensor]:
        o = self._outliers_key(outliers)
        whats = ("codebook", "qnorm") + (("lower", "upper") if which.startswith("key") else ())
        return {w: self.tensors[tensor_name(bits, o, which, w)][layer] for w in whats}

    def save(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata={"kvquant": json.dumps(self.meta)})
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(self.meta, indent=2) + "\n")


def load_calibration(path) -> Calibration:
    """Read a calibration file (safetensors only); one clear KVCompressError for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KVCompressError(f"kvquant: calibration file {str(path)!r} does not exist "
                              "(write one with `kvcompress calibrate kvquant`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise KVCompressError(f"kvquant: {str(path)!r} is not a safetensors calibration file ({exc}); "
                              "pickles are never loaded") from exc
    try:
        meta = json.loads(header["kvquant"])
        assert meta["format"] == FORMAT
    except (KeyError, ValueError, TypeError, AssertionError):
        raise KVCompressError(f"kvquant: {str(path)!r} is a safetensors file but not a kvquant calibration "
                              f"({FORMAT})") from None
    return Calibration(meta, tensors)


# --------------------------------------------------------------------------------------------------------------------
# Collect activations and Fisher information
# --------------------------------------------------------------------------------------------------------------------


def collect(model, input_ids: torch.Tensor, exclude_first: int = 1, progress: bool = False) -> list[dict]:
    """Forward + backward per sequence of ``input_ids (n, L)``. Returns per layer ``{k, gk, v, fv}``: rows
    ``(tokens, kv_heads*head_dim)``: pre-RoPE keys (fp16), their gradient (fp32), values (fp16), the values'
    Fisher (fp32), plus ``cos``/``sin`` ``(tokens, head_dim)`` of each kept token."""
    from tqdm.auto import tqdm

    from ..observe import attention_modules

    attn = attention_modules(model)
    acts: dict[tuple[int, str], torch.Tensor] = {}
    ropes: dict[int, tuple] = {}

    def keep(key):
        def hook(module, args, output):
            output.retain_grad()
            acts[key] = output

        return hook

    def keep_rope(i):
        def hook(module, args, kwargs):
            ropes[i] = kwargs.get("position_embeddings")

        return hook

    handles = []
    for i, m in attn.items():
        key_module = m.k_norm if getattr(m, "k_norm", None) is not None else m.k_proj
        handles.append(key_module.register_forward_hook(keep((i, "k"))))
        handles.append(m.v_proj.register_forward_hook(keep((i, "v"))))
        handles.append(m.register_forward_pre_hook(keep_rope(i), with_kwargs=True))
    out = [{"k": [], "gk": [], "v": [], "fv": [], "cos": [], "sin": []} for _ in sorted(attn)]
    grads = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        for row in tqdm(input_ids, desc="kvquant: Fisher (forward + backward)", disable=not progress):
            # gradients even when the caller runs under torch.inference_mode()/no_grad() (a first make_cache with
            # calibration="auto" usually does); the ids cloned there, as an inference tensor cannot be saved for backward
            with torch.inference_mode(False), torch.enable_grad():
                ids = row.unsqueeze(0).clone()
                emb = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
                loss.backward()
            s = slice(exclude_first, None)
            for i in sorted(attn):
                k, v = acts[(i, "k")], acts[(i, "v")]
                n = ids.shape[1]
                out[i]["k"].append(k.detach().reshape(n, -1)[s].half())
                out[i]["gk"].append(k.grad.reshape(n, -1)[s].float())
                out[i]["v"].append(v.detach().reshape(n, -1)[s].half())
                out[i]["fv"].append(v.grad.reshape(n, -1)[s].float().square())
                cos, sin = ropes[i] if ropes.get(i) is not None else (None, None)
                if cos is not None:
                    out[i]["cos"].append(cos[0, s].detach().float())
                    out[i]["sin"].append(sin[0, s].detach().float())
            acts.clear()
            ropes.clear()
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return [{k: torch.cat(v) if v else None for k, v in layer.items()} for layer in out]


# --------------------------------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------------------------------


def _rotate(rows: torch.Tensor, cos, sin, heads: int) -> torch.Tensor:
    """Apply RoPE to rows ``(T, h*d)`` with per-row ``cos/sin (T, d)``."""
    from ..rope import apply_rope

    T, w = rows.shape
    x = rows.float().reshape(T, heads, w // heads).transpose(0, 1).unsqueeze(0)  # (1, h, T, d)
    return apply_rope(x, cos.unsqueeze(0), sin.unsqueeze(0))[0].transpose(0, 1).reshape(T, w)


def normalized_inliers(x: torch.Tensor, outliers: float, per_channel: bool, heads: int):
    """Normalize rows ``x (T, h*d)`` as the cache does; returns ``(xn, inlier mask, lower, upper)``
    (``lower/upper``: per-channel thresholds ``(h*d,)``, or None for per-token).

    The recipe: the outliers (``outliers / 2`` of the values above an upper and as many below a lower threshold --
    per channel over the tokens for keys, per token row for values) are removed *before* normalizing; the rest is
    mapped to [-1, 1] by offset ``(upper + lower) / 2`` and half-range ``(upper - lower) / 2``. Per token with
    ``heads == 1`` (``token_range="token"``) that range is the row's thresholds; with ``heads > 1``
    (``token_range="head"``) each head's min/max after clamping. ``mask`` is False for the outliers."""
    if per_channel:
        if outliers > 0:
            lo, hi = outlier_thresholds(x, outliers, axis=0)
        else:
            lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
        offset, scale = ((hi + lo) / 2).half().float(), ((hi - lo) / 2).half().float()
        lo2, hi2 = offset - scale, offset + scale
        mask = (x >= lo2) & (x <= hi2)
        xn = ((x - offset) / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-1, 1)
        return xn, mask, lo[0], hi[0]
    if outliers > 0:
        lo, hi = outlier_thresholds(x, outliers, axis=-1)
        mask = (x >= lo) & (x <= hi)
        x = torch.minimum(torch.maximum(x, lo), hi)
    else:
        mask = torch.ones_like(x, dtype=torch.bool)
    T, w = x.shape
    xn = normalize_minmax(x.reshape(T, heads, w // heads), axis=-1)[0].reshape(T, w)
    return xn, mask, None, None


def fit_levels(xn: torch.Tensor, weights: torch.Tensor, bits: int, bins: int = 4096):
    """Fisher-weighted k-means levels of ``xn`` (values in [-1, 1]) and their Q-Norm version:
    ``(codebook, qnorm)`` each ``(2**bits,)``.

    Every value *given* is used -- the caller passes the inliers only (``xn[mask]`` of :func:`normalized_inliers`:
    the values the sparse part will hold exactly are left out of the fit, as in the paper). They are binned into
    ``bins`` equal bins over [-1, 1] (bin = weighted mean of its values, weight = summed Fisher), and the weighted
    1-D k-means (``fit_codebook``) runs on the bins -- the same objective up to the within-bin spread (bin width
    2/bins), at a fraction of the cost.
    """
    x = xn.double().clamp(-1, 1)
    w = weights.double()
    w = w / w.mean().clamp_min(1e-300) + 1e-6  # scale-free; no zero weights
    idx = ((x + 1) * ((bins - 1) / 2)).round().long()
    wsum = torch.bincount(idx, weights=w, minlength=bins)
    wx = torch.bincount(idx, weights=w * x, minlength=bins)
    keep = wsum > 0
    cb = fit_codebook((wx[keep] / wsum[keep]).float(), bits, weights=wsum[keep].float(), max_samples=bins)
    q = cb[quantize_codebook(xn, cb).long()]
    mx, sx, mq, sq = xn.mean(), xn.std(), q.mean(), q.std()
    qnorm = (cb - mq) * (sx / sq if sq > 0 else 1.0) + mx
    return cb, qnorm


def _fit_all(layers: list[dict], g, bits: list[int], outliers: list[float], bins: int, progress: bool) -> dict:
    """Thresholds and codebooks for every layer, outlier fraction, variant and bits: name -> list over layers."""
    from tqdm.auto import tqdm

    tensors: dict[str, list] = {}
    for li, layer in enumerate(tqdm(layers, desc="kvquant: codebooks", disable=not progress)):
        variants = {"key_pre": (layer["k"].float(), layer["gk"].square()), "value": (layer["v"].float(), layer["fv"]),
                    "value_token": (layer["v"].float(), layer["fv"])}
        if layer["cos"] is not None:
            variants["key_post"] = (_rotate(layer["k"], layer["cos"], layer["sin"], g.num_kv_heads),
                                    _rotate(layer["gk"], layer["cos"], layer["sin"], g.num_kv_heads).square())
        else:  # no RoPE: post-RoPE keys are the keys
            variants["key_post"] = variants["key_pre"]
        for o in outliers:
            for which, (x, fisher) in variants.items():
                heads = 1 if which == "value_token" else g.num_kv_heads  # value_token: one range per token
                xn, mask, lo, hi = normalized_inliers(x, o, which.startswith("key"), heads)
                if lo is not None:
                    for what, t in (("lower", lo), ("upper", hi)):
                        tensors.setdefault(tensor_name(bits[0], o, which, what), []).append(
                            t.reshape(g.num_kv_heads, g.head_dim))
                for b in bits:
                    cb, qn = fit_levels(xn[mask], fisher[mask], b, bins)
                    tensors.setdefault(tensor_name(b, o, which, "codebook"), []).append(cb)
                    tensors.setdefault(tensor_name(b, o, which, "qnorm"), []).append(qn)
    return tensors


def calibrate(model, input_ids: torch.Tensor, bits=(3,), outliers=(0.0, 0.01), exclude_first: int = 1,
              bins: int = 4096, data_info: dict | None = None, progress: bool = False) -> Calibration:
    """Calibrate on ``input_ids (n_seqs, seq_len)``; see the module docstring."""
    from ..cache import ModelGeometry

    for b in bits:
        if isinstance(b, bool) or b not in ALLOWED_BITS:
            raise KVCompressError(f"kvquant calibrate: bits={b!r} is not one of {list(ALLOWED_BITS)}")
    for o in outliers:
        if isinstance(o, bool) or not isinstance(o, (int, float)) or not 0.0 <= o < 0.2:
            raise KVCompressError(f"kvquant calibrate: outliers={o!r} must be a fraction in [0, 0.2)")
    bits, outliers = sorted(set(int(b) for b in bits)), sorted(set(float(o) for o in outliers))
    if input_ids.dim() != 2 or input_ids.shape[1] <= exclude_first + 1:
        raise KVCompressError("kvquant calibrate: need sequences (n, seq_len) longer than exclude_first + 1 tokens")
    g = ModelGeometry.from_model(model)
    t0 = time.perf_counter()
    layers = collect(model, input_ids, exclude_first, progress)
    t_fisher = time.perf_counter() - t0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is far faster than two contending ones
    try:
        tensors = _fit_all(layers, g, bits, outliers, bins, progress)
    finally:
        torch.set_num_threads(threads)
    stacked = {k: torch.stack(v).float() for k, v in tensors.items()}
    for b in bits[1:]:  # thresholds do not depend on bits: the same tensors under every bits prefix
        for o in outliers:
            for which in ("key_pre", "key_post"):
                for what in ("lower", "upper"):
                    stacked[tensor_name(b, o, which, what)] = stacked[tensor_name(bits[0], o, which, what)].clone()
    meta = {
        "format": FORMAT,
        "model_id": g.model_id,
        "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "layer_types": list(g.layer_types),
        "bits": bits,
        "outliers": outliers,
        "variants": list(VARIANTS),
        "num_seqs": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "exclude_first": exclude_first,
        "tokens_used": int(input_ids.shape[0] * (input_ids.shape[1] - exclude_first)),
        "token_ids_sha256": hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest(),
        "fisher": "squared gradient of the mean next-token NLL w.r.t. the key (k_proj / k_norm) and v_proj outputs",
        "kmeans_bins": bins,
        "seconds_fisher": round(t_fisher, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        **(data_info or {}),
    }
    return Calibration(meta, stacked)


# --------------------------------------------------------------------------------------------------------------------
# calibration="auto": calibrate once per model on built-in text, cached
# --------------------------------------------------------------------------------------------------------------------

# 4 x 1k tokens: ~65 s on one idle 2-core machine, so that `make eval` on a clean machine stays under 10 minutes (the
# paper uses 16 x 2k of WikiText-2 train; 16 x 1k took ~4 min here). A larger calibration:
# `kvcompress calibrate kvquant --data pydoc --num-seqs 16 --seq-len 1024 --bits 2 3 4` and calibration=PATH.
AUTO_SEQS, AUTO_SEQ_LEN = 4, 1024
AUTO_BITS, AUTO_OUTLIERS = (2, 3, 4), (0.0, 0.01)


def auto_calibration_path(model) -> Path:
    """Where ``calibration="auto"`` keeps this model's file: ``$KVCOMPRESS_CACHE/kvquant/<fingerprint>-auto-<seqs>x<len>.safetensors``
    (fingerprint over the model id, geometry and some weights: see :func:`kvcompress.profiles.layers._fingerprint`;
    the calibration size is part of the name, so a file made with other sizes is not taken for this one)."""
    from ..models import cache_dir
    from ..profiles.layers import _fingerprint

    return cache_dir() / "kvquant" / f"{_fingerprint(model)[:32]}-auto-{AUTO_SEQS}x{AUTO_SEQ_LEN}.safetensors"


def auto_calibration(model, progress: bool = True) -> Path:
    """The path of this model's cached automatic calibration, written on first use: Fisher + thresholds + codebooks
    for bits 2/3/4 and outliers 0/1 % from ``AUTO_SEQS`` x ``AUTO_SEQ_LEN`` tokens of the standard library's pydoc
    topics (always installed, never an evaluation text), tokenized by the model's own tokenizer."""
    import sys

    from ..profiles.layers import _tokenizer_for

    path = auto_calibration_path(model)
    if path.is_file():
        try:
            load_calibration(path)
            return path
        except KVCompressError:
            pass  # unreadable: calibrate again
    tok = _tokenizer_for(model)
    if tok is None:
        raise KVCompressError("kvquant: calibration='auto' needs the model's tokenizer on disk (load the model with "
                              "kvcompress.load_model or from a directory); or write a file with "
                              "`kvcompress calibrate kvquant` and pass calibration=PATH")
    text = read_text(["pydoc"])
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    if ids.numel() < AUTO_SEQS * AUTO_SEQ_LEN:
        raise KVCompressError(f"kvquant: the built-in calibration text has only {ids.numel()} tokens for this "
                              "tokenizer; pass calibration=PATH")
    starts = torch.linspace(0, ids.numel() - AUTO_SEQ_LEN, AUTO_SEQS).long()
    seqs = torch.stack([ids[s : s + AUTO_SEQ_LEN] for s in starts])
    if progress:
        print(f"kvquant: calibrating this model once on {AUTO_SEQS} x {AUTO_SEQ_LEN} tokens of pydoc topics "
              f"(cached in {path})", file=sys.stderr, flush=True)
    info = {"data": ["pydoc"], "data_sha256": hashlib.sha256(text.encode()).hexdigest(), "data_tokens": int(ids.numel()),
            "auto": True}
    cal = calibrate(model, seqs, AUTO_BITS, AUTO_OUTLIERS, 1, data_info=info)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cal.save(tmp)
    tmp.replace(path)
    tmp.with_suffix(tmp.suffix + ".json").replace(path.with_suffix(path.suffix + ".json"))
    return path


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def read_text(sources: list[str]) -> str:
    """Text from files, directories (their ``*.txt``, sorted) or ``pydoc`` (the stdlib's topic docs)."""
    parts = []
    for src in sources:
        if src == "pydoc":
            from pydoc_data.topics import topics

            parts.extend(topics[k] for k in sorted(topics))
            continue
        p = Path(src).expanduser()
        if p.is_dir():
            files = sorted(p.glob("*.txt"))
            if not files:
                raise KVCompressError(f"kvquant calibrate: no *.txt files in {src}")
            parts.extend(f.read_text(encoding="utf-8", errors="replace") for f in files)
        elif p.is_file():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
        else:
            raise KVCompressError(f"kvquant calibrate: data {src!r} does not exist (a file, a directory or 'pydoc')")
    return "\n\n".join(parts)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, local path or hub id")
    parser.add_argument("--data", nargs="+", required=True,
                        help="calibration text: files, directories of *.txt, or 'pydoc'; NOT the evaluation text")
    parser.add_argument("--bits", nargs="+", type=int, default=[3], help="code widths to fit (2, 3, 4)")
    parser.add_argument("--outliers", nargs="+", type=float, default=[0.0, 0.01],
                        help="outlier fractions to fit thresholds/codebooks for, each in [0, 0.2)")
    parser.add_argument("--num-seqs", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--exclude-first", type=int, default=1, help="first tokens of each sequence left out (sink)")
    parser.add_argument("--bins", type=int, default=4096, help="histogram bins over [-1, 1] for the weighted k-means")
    parser.add_argument("--out", default=None, help="output .safetensors (default kvquant-<model>-b<bits>.safetensors)")


def run(args) -> int:
    from .. import load_model

    for b in args.bits:
        if b not in ALLOWED_BITS:
            raise KVCompressError(f"kvquant calibrate: --bits {b} is not one of {list(ALLOWED_BITS)}")
    for o in args.outliers:
        if not (0.0 <= o < 0.2) or math.isnan(o):
            raise KVCompressError(f"kvquant calibrate: --outliers {o} must be a fraction in [0, 0.2)")
    if args.bins < 64:
        raise KVCompressError("kvquant calibrate: --bins must be >= 64")
    if args.num_seqs < 1 or args.seq_len < args.exclude_first + 2 or args.exclude_first < 0:
        raise KVCompressError("kvquant calibrate: need --num-seqs >= 1 and --seq-len >= --exclude-first + 2")
    text = read_text(args.data)
    model, tok = load_model(args.model)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    need = args.num_seqs * args.seq_len
    if ids.numel() < need:
        raise KVCompressError(f"kvquant calibrate: the data has {ids.numel()} tokens, fewer than "
                              f"--num-seqs x --seq-len = {need}")
    starts = torch.linspace(0, ids.numel() - args.seq_len, args.num_seqs).long()
    seqs = torch.stack([ids[s : s + args.seq_len] for s in starts])
    info = {"data": [str(d) for d in args.data], "data_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "data_tokens": int(ids.numel())}
    cal = calibrate(model, seqs, args.bits, args.outliers, args.exclude_first, args.bins, info,
                    progress=True)
    out = Path(args.out or f"kvquant-{Path(args.model).name}-b{'-'.join(map(str, sorted(set(args.bits))))}.safetensors")
    cal.save(out)
    print(f"wrote {out} ({cal.meta['tokens_used']} tokens; Fisher {cal.meta['seconds_fisher']} s, "
          f"total {cal.meta['seconds_total']} s; bits {cal.meta['bits']}, outliers {cal.meta['outliers']})")
    return 0

"""``minicache``: merge the KV caches of adjacent layers in the depth dimension (Liu et al., NeurIPS 2024,
arXiv 2405.14366).

* **Which pairs** (``select``). ``"similarity"`` (the default when ``start_layer`` is not given): the pairs are
  chosen from their measured similarity -- the mean per-token cosine of K and of V of every adjacent pair on a
  short built-in calibration text (:func:`kvcompress.profiles.layers.adjacent_similarity`: 512 tokens of the
  standard library's pydoc topics, one prefill, cached per model as JSON under ``$KVCOMPRESS_CACHE``; or a
  ``layers.json`` of ``kvcompress profile layers`` given as ``profile=PATH``). A pair qualifies when both its K and
  its V similarity reach ``min_similarity`` (0.9) and it lies from ``start_layer - 1`` on (default L/2, as in the
  paper: shallow layers stay exact); qualifying pairs are taken most similar first, without overlap. Where none
  qualifies, ``make_cache`` raises a KVCompressError naming the best pair's similarity and how to force a merge.
  ``"depth"`` (the paper's rule, the default when ``start_layer`` is given): layers ``(l-1, l)`` for
  ``l = S, S+2, ...`` (``S = start_layer``, default ``L // 2``), i.e. ``(S-1, S), (S+1, S+2), ...``; with S = 15 on
  SmolLM2 (30 layers) that is 8 pairs, layers 14..29, whatever their similarity. Either way a pair needs both
  layers of the same attention type: on Gemma-3 (5 sliding : 1 global) no two global layers are adjacent, so the
  merged pairs are sliding-window pairs, and a layer whose neighbour has the other type is skipped.
* **Merge** (per token, per KV head, K and V separately): ``x = |x| * x_hat``; one shared direction
  ``e = SLERP(x_hat_{l-1}, x_hat_l; t)`` (t = 0: layer l-1's direction, t = 1: layer l's); both magnitudes kept.
  Layer j is read back as ``|x_j| * e``. ``merge="average"`` is the ablation: the plain weighted average
  ``m = (1-t) x_{l-1} + t x_l`` read back by both layers (stored in the same layout, so bytes are equal).
* **Retention**: angular distance ``d = arccos(x_hat_{l-1} . x_hat_l) / pi``, min-max normalized per batch row and
  KV head, K and V separately, over the tokens merged so far (at prefill: the prompt, as in the paper; decoded
  tokens extend a running min/max, 4 fp32 numbers per row, so a decoded token is judged against the prompt's
  range and not forced into a tiny population). An entry (batch, head, token) whose K *or* V normalized distance
  is ``>= 1 - gamma`` (the top ``gamma`` share of the distance range) keeps the exact K and V of both layers;
  gamma = 0 retains nothing, gamma = 1 everything (an exact no-op at 2-byte precision).
* **Held per pair**: one direction store (K and V directions, ``(b, h, n, d)``), per layer fp16 magnitudes
  ``(2 [K, V], b, h, n)``, per layer a store of the retained exact K/V ``(1, 1, r, d)`` and one int32 index per
  retained entry (``position * b * h + row``), and the running distance range. The direction store, the indices and
  the range count on layer l, the magnitudes and retained vectors on the layer they belong to. All of it grows
  without copying its past: the stores append (fp16: :class:`kvcompress.storage.TokenRuns`), the magnitudes and the
  indices are ``TokenRuns`` (a token is copied O(log n) times over its life, not once per step), the padding flags
  a buffer with counted spare capacity.
* **Attention** (full-attention pairs): each layer attends by itself over its past as attention parts: the merged
  positions, then the exact buffer, then the new tokens. The merged positions are never rebuilt: their scores are
  ``|k_j| (q . e_k)`` and their values ``|v_j| e_v``, so the direction store is attended with the magnitudes as
  per-token multipliers (KIVI codes: the fused kernel, :func:`kvcompress.kernels.kivi_attention` with ``mult``;
  fp16 directions: the same kernel's float path, a chunk at a time, :func:`kvcompress.kernels.float_partials`), the
  retained entries masked out there and attended exactly straight from their list
  (:func:`kvcompress.kernels.scattered_partials`; :meth:`Segment.fused`). Over KIVI storage a one-token step without
  padding skips the parts: one kernel call with the step's token as the last tail token, one for the retained
  entries (:meth:`MergedLayer._attend_one_fused`); unmerged layers take KIVI's one-call step; one
  value-quantization queue per cache serves every KIVI store. Where probabilities are asked for, or with the
  kernels switched off, the merged positions are rebuilt a chunk at a time instead (``|x_j| * e`` with the retained entries put back, only the
  chunk's range: :meth:`Segment.reader`). Either way the transient is a chunk, not the past. ``e`` is the direction
  as stored (a quantizing store's dequantized one, not renormalized).
* **When**: a forward that brings several tokens (prefill) merges them at once, after layer l stored them (layer
  l-1 already attended to its exact K/V in that forward; later steps see the merged version). Decoded tokens stay
  exact (2-byte) in a per-layer buffer until it holds ``block`` tokens, then merge (block = 1, the default:
  every step, right after the step's attention).
* **Storage** (composition): ``storage="fp16"`` or any registered quantizing store (``"kivi"`` with ``bits``,
  ``group_size``, ``residual``) holds the directions, the retained tokens and the unmerged full-attention layers
  (so ``storage="kivi", bits=4`` is MiniCache + KIVI-4 on every layer). Magnitudes stay fp16 (as in the paper).
  Unpaired sliding-window layers keep the plain fp16 window (``Method.sliding_layer``).
* **Sliding pairs** (Gemma-3): a merge keeps only positions inside the window, stored in segments of
  ``seg = min(SLIDING_SEGMENT, window // 8)`` positions; a segment is dropped once all its positions left the
  window, so a sliding pair holds at most ``window - 1 + seg`` merged positions (+ the exact buffer); attention
  sees the last ``sliding_window - 1`` past tokens, like every sliding layer. (A quantizing store keeps its own
  fp16 residual per segment, so with storage="kivi" segments shorter than that residual stay at 2 bytes -- as
  KIVI itself leaves sliding windows unquantized.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cache import KVLayer, Method, StorageLayer
from ..config import check_positive_int, check_ratio
from ..registry import KVCompressError, register
from ..storage import FP16Store, TokenStorage, TokenRuns, make_storage
from .kivi import KiviStore, share_value_queue, value_queue
from .minicache_math import angular_distance, merge_states, retained, retention_mask, slerp, unit
from .. import kernels
from ..attention import KVPart, attend_parts, with_validity
from ..attention.parts import _merge_partials, normalized_output

__all__ = ["MiniCache", "MiniCacheConfig", "LayerPair", "MergedLayer", "ExactLayer", "Segment", "StorageLayer",
           "angular_distance", "layer_pairs", "similar_pairs", "merge_states", "retained", "retained_fractions", "retention_mask", "slerp", "unit"]

MERGES = ("slerp", "average")
SELECTS = ("similarity", "depth")
SLIDING_SEGMENT = 64  # at most this many positions (and window // 8) per segment of a sliding-window pair


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiniCacheConfig:
    start_layer: int | None = None  # S: first merged pair is (S-1, S), then (S+1, S+2)...; None = num_layers // 2
    select: str | None = None  # similarity (measured pairs) | depth (paper: every pair from S); None: depth if S given
    min_similarity: float = 0.9  # select=similarity: a pair merges when its mean cos of K and of V both reach this
    profile: str | None = None  # select=similarity: layers.json of `kvcompress profile layers` (default: built-in text)
    t: float = 0.6  # SLERP interpolation in [0, 1]: 0 = direction of layer l-1, 1 = of layer l (paper: 0.6)
    gamma: float = 0.05  # retention threshold in [0, 1]: top gamma share of the normalized distance range (paper: 0.05)
    merge: str = "slerp"  # slerp (paper) | average (ablation: plain weighted average of the two states)
    block: int = 1  # decoded tokens stay exact in a buffer and merge in blocks of this many (1 = every step)
    storage: str = "fp16"  # TokenStorage for directions, retained tokens and unmerged layers: fp16 | kivi | ...
    bits: int | None = None  # passed to a quantizing storage (kivi: 2, 4, 8)
    group_size: int | None = None  # passed to a quantizing storage
    residual: int | None = None  # passed to a quantizing storage

    def __post_init__(self):
        s = self.start_layer
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise KVCompressError(f"minicache: start_layer must be an integer (or None for L/2), got {s!r}")
        if self.select is not None and self.select not in SELECTS:
            raise KVCompressError(f"minicache: select={self.select!r} is not one of {list(SELECTS)}")
        m = self.min_similarity
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not -1.0 <= float(m) <= 1.0:
            raise KVCompressError(f"minicache: min_similarity={m!r} must be a cosine similarity in [-1, 1]")
        if self.profile is not None and not isinstance(self.profile, str):
            raise KVCompressError(f"minicache: profile must be the path of a layers.json, got {self.profile!r}")
        if self.profile is not None and self.selection == "depth":
            raise KVCompressError("minicache: profile= is used by select='similarity' only")
        check_ratio(self.t, "t", "minicache", low_open=False, high_open=False)
        check_ratio(self.gamma, "gamma", "minicache", low_open=False, high_open=False)
        if self.merge not in MERGES:
            raise KVCompressError(f"minicache: merge={self.merge!r} is not one of {list(MERGES)}")
        check_positive_int(self.block, "block", "minicache")
        if not isinstance(self.storage, str):
            raise KVCompressError(f"minicache: storage must be a storage name, got {self.storage!r}")

    @property
    def selection(self) -> str:
        if self.select is not None:
            return self.select
        return "similarity" if self.start_layer is None else "depth"

    def storage_options(self) -> dict:
        return {k: getattr(self, k) for k in ("bits", "group_size", "residual") if getattr(self, k) is not None}


def similar_pairs(similarity: list[dict], layer_types: tuple[str, ...], start_layer: int,
                  min_similarity: float) -> tuple[list[tuple[int, int]], dict | None]:
    """Pairs ``(l, l+1)`` with ``l >= start_layer - 1``, both layers of one type and ``min(cos_k, cos_v) >=
    min_similarity``, most similar first, without overlap (returned sorted). Also the best candidate pair's entry
    (``None`` if there is no candidate)."""
    cands = [p for p in similarity
             if p["pair"][0] >= start_layer - 1 and layer_types[p["pair"][0]] == layer_types[p["pair"][1]]]
    cands.sort(key=lambda p: -min(p["cos_k"], p["cos_v"]))
    chosen, used = [], set()
    for p in cands:
        a, b = p["pair"]
        if min(p["cos_k"], p["cos_v"]) >= min_similarity and a not in used and b not in used:
            chosen.append((a, b))
            used.update((a, b))
    return sorted(chosen), (cands[0] if cands else None)


def layer_pairs(layer_types: tuple[str, ...], start_layer: int) -> list[tuple[int, int]]:
    """Merged pairs ``(l-1, l)`` from ``l = start_layer`` on, both layers of the same attention type."""
    pairs, i = [], start_layer - 1
    while i + 1 < len(layer_types):
        if layer_types[i] == layer_types[i + 1]:
            pairs.append((i, i + 1))
            i += 2
        else:
            i += 1
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# Merged storage of a layer pair
# --------------------------------------------------------------------------------------------------------------------


def _runs_slice(runs: TokenRuns, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """Entries ``[start, stop)`` along the token axes of ``runs``: views when they lie in one run, else the pieces
    joined (a transient of ``stop - start`` entries)."""
    pieces, offset = [], 0
    for run in runs.runs:
        n = runs.run_length(run)
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append(tuple(t.narrow(runs._dim(i), lo - offset, hi - lo) for i, t in enumerate(run)))
        offset += n
    if len(pieces) == 1:
        return pieces[0]
    return tuple(torch.cat(ts, dim=runs._dim(i)) for i, ts in enumerate(zip(*pieces)))


def _read_parts(parts: list, start: int, stop: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[start, stop)`` of a store given as its :class:`kvcompress.attention.KVPart` s (in token order):
    ``(keys, values)`` each ``(b, h, stop - start, d)`` in ``dtype``. Each part is read over its overlap widened to its
    ``chunk_tokens`` edges (a quantized part reads from group edges only), then cut."""
    ks, vs, offset = [], [], 0
    for part in parts:
        lo, hi = max(start, offset) - offset, min(stop, offset + part.length) - offset
        if lo < hi:
            c = max(part.chunk_tokens, 1)
            a, b = lo // c * c, min(-(-hi // c) * c, part.length)
            k, v = part.read(a, b, dtype)
            ks.append(k[:, :, lo - a : hi - a])
            vs.append(v[:, :, lo - a : hi - a])
        offset += part.length
    if len(ks) == 1:
        return ks[0], vs[0]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def _range_reader(store: TokenStorage):
    """``read(start, stop, dtype) -> (keys, values)``, each ``(b, h, stop - start, d)``: any range of ``store``'s
    tokens (fp16: a slice of its runs; other stores: through their attention parts, taken once, now)."""
    if isinstance(store, FP16Store):
        return lambda start, stop, dtype: tuple(t.to(dtype) for t in _runs_slice(store.kv, start, stop))
    parts = store.parts()
    return lambda start, stop, dtype: _read_parts(parts, start, stop, dtype)


class Segment:
    """Merged positions ``[start, start + length)`` of one layer pair (see the module docstring for the layout).

    Everything grows without copying its past: the direction and retained stores append (the fp16 store keeps
    :class:`kvcompress.storage.TokenRuns`), the magnitudes and the retained indices are ``TokenRuns`` too (a token
    is copied O(log n) times over its life, never once per step). :meth:`read` rebuilds any range of positions."""

    def __init__(self, new_storage, start: int, dtype: torch.dtype):
        self.dirs: TokenStorage = new_storage()  # keys = K directions, values = V directions: (b, h, n, d)
        self.mags = [TokenRuns(dims=(3,)), TokenRuns(dims=(3,))]  # per layer: runs of (2 [K, V], b, h, n_i), 2-byte
        self.kept: list[TokenStorage] = [new_storage(), new_storage()]  # per layer: retained exact K/V, (1, 1, r, d)
        #: runs of (r_i,) int32: position_in_segment * (b * h) + (batch * h + head), ascending over all runs
        self.kept_idx = TokenRuns(dims=(0,))
        self.start, self.length, self.dtype = start, 0, dtype
        self.rows = 0  # b * h, set by the first add

    def add(self, ka, va, kb, vb, cfg: MiniCacheConfig, keep: torch.Tensor | None = None, merged=None) -> None:
        """Merge ``(b, h, n, d)`` states of layer l-1 (ka, va) and layer l (kb, vb) and append them. ``keep``:
        bool ``(b, h, n)`` entries to retain (default: the retention rule over these n tokens); ``merged``: what
        :func:`merge_states` returns for K and for V, when the caller has it already."""
        b, h, n, d = ka.shape
        self.rows = b * h
        if merged is None:
            merged = merge_states(ka, kb, cfg.t, cfg.merge), merge_states(va, vb, cfg.t, cfg.merge)
        (dk, mk, _), (dv, mv, _) = merged
        self.dirs.append(dk, dv)
        for side in (0, 1):
            self.mags[side].append(torch.stack([mk[side], mv[side]]).to(self.dtype))
        if keep is None:
            keep = retention_mask(ka, va, kb, vb, cfg.gamma)[0]
        idx = keep.permute(2, 0, 1).reshape(-1).nonzero().squeeze(1)  # position-major flat (n * b * h)
        if idx.numel():
            for side, (k, v) in enumerate(((ka, va), (kb, vb))):
                kf = k.permute(2, 0, 1, 3).reshape(-1, d)[idx]
                vf = v.permute(2, 0, 1, 3).reshape(-1, d)[idx]
                self.kept[side].append(kf[None, None], vf[None, None])
            self.kept_idx.append((idx + self.length * b * h).to(torch.int32))
        self.length += n

    def reader(self, side: int):
        """``read(start, stop, dtype)`` of layer ``side`` (0 = l-1, 1 = l), for an attention part: positions
        ``[start, stop)`` read back as ``|x| * e`` (``e`` the direction as stored: a quantizing store's dequantized
        one, not renormalized, so that a kernel can take the magnitudes as per-token multipliers) with the retained
        entries put back, ``(b, h, stop - start, d)`` each; only that range is rebuilt (a transient of the chunk)."""
        dirs, kept = _range_reader(self.dirs), _range_reader(self.kept[side])

        def read(start: int, stop: int, dtype: torch.dtype):
            out = []
            mags = _runs_slice(self.mags[side], start, stop)[0]  # (2, b, h, n)
            for j, e in enumerate(dirs(start, stop, torch.float32)):
                out.append(mags[j].float().unsqueeze(-1) * e)
            lo, hi = self._kept_range(start * self.rows, stop * self.rows)
            if hi > lo:
                idx = _runs_slice(self.kept_idx, lo, hi)[0].long() - start * self.rows
                for j, r in enumerate(kept(lo, hi, torch.float32)):
                    x = out[j].permute(2, 0, 1, 3).contiguous()  # (n, b, h, d)
                    x.view(-1, x.shape[-1]).index_copy_(0, idx, r[0, 0])
                    out[j] = x.permute(1, 2, 0, 3)
            return out[0].to(dtype), out[1].to(dtype)

        return read

    def retained(self, side: int):
        """The retained entries as layer ``side`` holds them: ``(flat indices (r,) int32, keys, values (r, d) fp32)``
        (indices as in ``kept_idx``; the vectors a transient read of the store), or None when none is retained."""
        kept_idx = self.kept_idx.joined()
        if kept_idx is None:
            return None
        keys, values = self.kept[side].read(torch.float32)  # (1, 1, r, d)
        return kept_idx[0], keys[0, 0], values[0, 0]

    def fused(self, side: int):
        """The ``KVPart.fused`` contract over this segment as layer ``side`` reads it (same values as
        :meth:`reader`), without rebuilding ``|x| * e``: each part of the direction store is attended with the
        magnitudes as per-token key / value multipliers (a quantizing store's kernel where it has one,
        :func:`kvcompress.kernels.kivi_attention`; else its chunks in torch), with the retained entries masked out
        (:func:`kvcompress.kernels.scattered_mask`); those are attended exactly, straight from their list
        (:func:`kvcompress.kernels.scattered_partials`), and the partials merged. Everything is
        taken now (a later append makes new tensors), so the function stays consistent with this segment as of now."""
        n = self.length
        dir_parts = self.dirs.parts()
        mags = self.mags[side].joined()[0]  # (2, b, h, n) 2-byte
        retained = self.retained(side)

        def fused(qg, valid):
            b, h = qg.shape[0], qg.shape[1]
            mult = mags.permute(1, 2, 0, 3).float()  # (b, h, 2, n)
            visible = valid
            if retained is not None:  # the retained entries are attended exactly below, not as |x| * e
                visible = kernels.scattered_mask(retained[0], b, h, n, valid)
            partials, offset = [], 0
            for part in dir_parts:
                cut = slice(offset, offset + part.length)
                va = None if visible is None else visible[:, :, cut]
                if part.fused is not None and part.kind == "kivi-fused":
                    partials.append(part.fused(qg, va, mult=mult[:, :, :, cut]))
                else:
                    partials.append(kernels.float_partials(qg, part.read, part.length, max(part.chunk_tokens, 1),
                                                           va, mult[:, :, :, cut]))
                offset += part.length
            if retained is not None:
                seen = None  # padding is never retained, but the contract masks whatever ``valid`` says
                if valid is not None:
                    seen = valid.to(torch.bool).expand(b, h, n).permute(2, 0, 1).reshape(-1)[retained[0].long()]
                partials.append(kernels.scattered_partials(qg, *retained, seen))
            return _merge_partials(partials)

        return fused

    def _kept_range(self, first: int, end: int) -> tuple[int, int]:
        """Ordinals ``[lo, hi)`` of the retained entries whose flat index lies in ``[first, end)`` (the indices
        ascend over all runs, so these are the counts of indices below ``first`` and below ``end``)."""
        lo = hi = 0
        for (run,) in self.kept_idx.runs:
            below = torch.searchsorted(run, torch.tensor([first, end], dtype=run.dtype, device=run.device)).tolist()
            lo, hi = lo + below[0], hi + below[1]
        return lo, hi

    def restore(self, side: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``side`` (0 = l-1, 1 = l) read back whole: ``(b, h, n, d)`` each (a transient copy)."""
        return self.reader(side)(0, self.length, dtype)

    def retained_entries(self) -> int:
        return len(self.kept_idx)

    def held(self, side: int) -> list[torch.Tensor | None]:
        own = [*self.mags[side].tensors(), *self.kept[side].held_tensors()]
        return own + ([*self.dirs.held_tensors(), *self.kept_idx.tensors()] if side == 1 else [])


def _lazy_reader(seg: Segment, side: int):
    """``seg.reader(side)``, made at the first read: a decode step through the kernel (:meth:`Segment.fused`) never
    reads, and making the reader costs ~a dozen calls per layer and step. Used within the step it is made for."""
    made = []

    def read(start: int, stop: int, dtype: torch.dtype):
        if not made:
            made.append(seg.reader(side))
        return made[0](start, stop, dtype)

    return read


class LayerPair:
    """The state shared by the two layer objects of a merged pair: merged segments + an exact buffer per layer of
    the tokens not merged yet. Layer l-1's update runs first in a forward, then layer l's, which merges."""

    def __init__(self, method: "MiniCache", first: int, second: int, new_storage=None):
        g = method.geometry
        self.cfg, self.layers = method.config, (first, second)
        self.new_storage = new_storage or method.new_storage  # the direction stores (and the retained ones)
        self.kv_heads = g.num_kv_heads
        self.dtype = g.storage_dtype
        self.window = g.sliding_window - 1 if g.is_sliding(first) else None  # past tokens a sliding layer keeps
        self.seg_len = max(1, min(SLIDING_SEGMENT, (g.sliding_window or 0) // 8))  # sliding pairs' segment size
        self.segments: list[Segment] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # (b, h, p, d) per layer
        self.pending_valid: torch.Tensor | None = None  # (b, p) bool: padding among the pending tokens; None = none
        self.span: torch.Tensor | None = None  # running distance range (2 [min, max], 2 [K, V], b, h) fp32
        self.start = 0  # first position not merged (and not dropped) yet

    def parts(self, side: int) -> list:
        """The past of layer ``side`` of a full-attention pair as attention parts, in token order: each merged
        segment attended from its stored directions with the magnitudes as multipliers (:meth:`Segment.fused`; read
        back a chunk at a time by :meth:`Segment.reader` where that is not used: probabilities asked for, or
        ``kernels.fused(False)``, the path before), then the exact buffer of tokens not merged yet (``(b, h, p, d)``,
        2-byte)."""
        on = kernels.enabled()
        parts = [KVPart(seg.length, _lazy_reader(seg, side), kind="minicache-merged",
                        fused=seg.fused(side) if on else None, kv_heads=self.kv_heads)
                 for seg in self.segments if seg.length]
        if self.pending[side] is not None:
            parts.append(KVPart.dense(*self.pending[side], kind="minicache-exact"))
        return parts

    def past(self, side: int, dtype: torch.dtype):
        """K/V of layer ``side`` for the past tokens attention sees, read back whole (sliding pairs, whose window
        transformers attends): ``(b, h, n, d)`` each, or None."""
        parts = [seg.restore(side, dtype) for seg in self.segments]
        if self.pending[side] is not None:
            parts.append(tuple(x.to(dtype) for x in self.pending[side]))
        if not parts:
            return None
        k, v = torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
        if self.window is not None:  # the last window - 1 positions, like every sliding layer
            drop = max(k.shape[2] - self.window, 0)
            k, v = k[:, :, drop:], v[:, :, drop:]
        return k, v

    def push(self, side: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Buffer a layer's new ``(b, h, q, d)`` K/V (``valid (b, q)``: False = padding, None = all real); when layer
        l pushes, merge if this forward brought several tokens (prefill) or the buffer reached ``block`` tokens."""
        k, v = keys.to(self.dtype), values.to(self.dtype)
        pending = 0 if self.pending[side] is None else self.pending[side][0].shape[2]
        if self.pending[side] is not None:
            k, v = torch.cat([self.pending[side][0], k], dim=2), torch.cat([self.pending[side][1], v], dim=2)
        self.pending[side] = (k, v)
        if side == 1 and (valid is not None or self.pending_valid is not None):
            b, q = keys.shape[0], keys.shape[2]
            old = self.pending_valid if self.pending_valid is not None else keys.new_ones(b, pending, dtype=torch.bool)
            new = valid.to(torch.bool) if valid is not None else keys.new_ones(b, q, dtype=torch.bool)
            self.pending_valid = torch.cat([old, new], dim=1)
        if side == 1 and (keys.shape[2] > 1 or k.shape[2] >= self.cfg.block):
            self._merge()

    def _merge(self) -> None:
        (ka, va), (kb, vb) = self.pending
        if ka.shape[2] != kb.shape[2]:
            raise KVCompressError(f"minicache: layers {self.layers} received different token counts in one forward")
        end = self.start + ka.shape[2]
        if self.window is None:
            cfg = self.cfg
            merged = merge_states(ka, kb, cfg.t, cfg.merge), merge_states(va, vb, cfg.t, cfg.merge)
            keep, self.span = retention_mask(ka, va, kb, vb, cfg.gamma, self.span, self.pending_valid,
                                             dist=torch.stack([merged[0][2], merged[1][2]]))
            if not self.segments:
                self.segments.append(Segment(self.new_storage, 0, self.dtype))
            self.segments[0].add(ka, va, kb, vb, cfg, keep, merged)
        else:  # keep positions inside the window only, in segments of seg_len; drop segments that left it
            pos = max(self.start, end - self.window)
            ka, va, kb, vb = (x[:, :, pos - self.start :] for x in (ka, va, kb, vb))
            keep, self.span = retention_mask(ka, va, kb, vb, self.cfg.gamma, self.span)
            self.segments = [s for s in self.segments if s.start + s.length > end - self.window]
            c = 0
            while c < ka.shape[2]:
                seg = self.segments[-1] if self.segments else None
                if seg is None or seg.length >= self.seg_len or seg.start + seg.length != pos + c:
                    seg = Segment(self.new_storage, pos + c, self.dtype)
                    self.segments.append(seg)
                part = slice(c, c + self.seg_len - seg.length)
                seg.add(*(x[:, :, part] for x in (ka, va, kb, vb)), self.cfg, keep=keep[:, :, part])
                c = min(ka.shape[2], part.stop)
        self.pending, self.pending_valid, self.start = [None, None], None, end

    def held(self, side: int) -> list[torch.Tensor | None]:
        out = [t for seg in self.segments for t in seg.held(side)] + ([self.span, self.pending_valid] if side == 1 else [])
        return out + (list(self.pending[side]) if self.pending[side] is not None else [])

    def retained_fraction(self) -> float:
        """Share of merged (batch, head, token) entries kept exactly."""
        total = sum(s.length for s in self.segments)
        if not total:
            return 0.0
        rows = self.segments[0].rows
        return sum(s.retained_entries() for s in self.segments) / (total * rows)


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------


class _Validity:
    """Padding flags of a layer's stored tokens, ``(batch, 1, length)`` bool (False = padding), grown in place: a
    buffer with spare capacity (``16 + length // 32`` slots when it grows, held and counted), so a step does not
    copy the past flags. Holds nothing while every token is real."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None  # (batch, 1, capacity) bool
        self.length = 0

    def append(self, new_valid: torch.Tensor | None, stored: int, keys: torch.Tensor) -> None:
        """Flags of the step's ``keys (b, _, q, d)`` after ``stored`` tokens: ``new_valid (b, q)`` bool or None."""
        if new_valid is None and self.buffer is None:
            return
        b, q, dev = keys.shape[0], keys.shape[2], keys.device
        need = stored + q
        if self.buffer is None or need > self.buffer.shape[2]:
            grown = torch.ones(b, 1, need + 16 + need // 32, dtype=torch.bool, device=dev)
            if self.buffer is not None:
                grown[:, :, :stored] = self.buffer[:, :, :stored]
            self.buffer = grown
        self.buffer[:, :, stored:need] = True if new_valid is None else new_valid[:, None, :]
        self.length = need

    def view(self) -> torch.Tensor | None:
        """``(batch, 1, length)`` bool, a view; None while every token is real."""
        return None if self.buffer is None else self.buffer[:, :, : self.length]


class MergedLayer(KVLayer):
    """One layer of a merged pair (``side`` 0 = layer l-1, 1 = layer l); its state lives in the shared pair.
    Full-attention pairs attend by themselves over the read-back past and the new tokens, masking padding (which
    never enters the retention range nor is retained); sliding pairs hand transformers the dense window."""

    def __init__(self, geometry, layer_idx: int, pair: LayerPair, side: int):
        super().__init__(geometry, layer_idx)
        self.pair, self.side = pair, side
        self.window = pair.window
        self.is_sliding = pair.window is not None
        self.attends = not self.is_sliding
        self.valid = _Validity()  # (batch, 1, seen) bool once padding was seen; none held while all are real

    def attend_step(self, query, keys, values, new_valid, scaling):
        """Attend over the past (merged segments rebuilt a chunk at a time, then the exact buffer) and the new
        ``(b, h, q, d)`` tokens, then hand them to the pair (``new_valid (b, q)`` or None)."""
        step = None if new_valid is not None or self.valid.view() is not None else \
            self._attend_one_fused(query, keys, values, scaling)
        if step is None:
            sd = self.pair.dtype
            parts = with_validity(self.pair.parts(self.side), self.valid.view())
            nv = None if new_valid is None else new_valid[:, None, :]
            parts.append(KVPart.dense(keys.to(sd), values.to(sd), nv, causal=True))
            result = attend_parts(query, parts, scaling)
            step = result.output, result.transient_bytes
        self.valid.append(new_valid, self.tokens_seen, keys)
        self.pair.push(self.side, keys, values, new_valid)
        return step

    def _attend_one_fused(self, query, keys, values, scaling):
        """A one-token step (no padding) of a full-attention pair over KIVI storage: one kernel call over the merged
        directions' codes and residual with the magnitudes as multipliers, the step's own token last in the tail (its
        multipliers 1), the retained positions masked (:func:`kvcompress.kernels.scattered_mask`); one more for the
        retained entries (:func:`kvcompress.kernels.scattered_partials`); the two merged. What :meth:`Segment.fused`
        and the new token's dense part give (within float rounding), without building attention parts. Returns
        ``(output (b, 1, heads, d), transient bytes)``, or None where it does not apply (the general path runs)."""
        pair, side = self.pair, self.side
        if (keys.shape[2] != 1 or pair.window is not None or len(pair.segments) != 1 or pair.pending[side] is not None
                or kernels.backend(keys.device) != "numba"):
            return None
        seg = pair.segments[0]
        store = seg.dirs
        if not isinstance(store, KiviStore) or not store.fused() or len(store) != seg.length:
            return None
        b, heads, _, d = query.shape
        h, n, sd = keys.shape[1], seg.length, pair.dtype
        qg = query.float().reshape(b, h, heads // h, d) * scaling
        mult = torch.ones(b, h, 2, n + 1, device=query.device)
        mult[:, :, :, :n] = seg.mags[side].joined()[0].permute(1, 2, 0, 3)
        retained = seg.retained(side)
        visible = None if retained is None else kernels.scattered_mask(retained[0], b, h, n + 1)
        k_tail = torch.cat([store.k_res, keys.to(sd)], dim=2)
        v_tail = torch.cat([store.v_res, values.to(sd)], dim=2)
        kq, vq = store.kq, store.vq
        partials = [kernels.kivi_attention(qg, n + 1, kq.packed, kq.scale, kq.zero, kq.bits, kq.group, vq.packed,
                                           vq.scale, vq.zero, vq.bits, vq.group, visible, k_tail=k_tail,
                                           v_tail=v_tail, mult=mult)]
        if retained is not None:
            partials.append(kernels.scattered_partials(qg, *retained))
        acc, _, l = _merge_partials(partials)
        return normalized_output(acc, l, query), (k_tail.numel() + v_tail.numel()) * 4

    def attention_path(self) -> str:
        """How a full-attention pair's merged past is read (:mod:`kvcompress.memory`): as its direction store's codes
        are (``"fused-numba"``/``"fused-triton"``: the kernel with the magnitudes as multipliers, ``"chunked"``:
        dequantized a chunk at a time), ``"dense"`` for 2-byte directions (and before anything merged); ``"chunked"``
        with the kernels switched off (``|x| * e`` rebuilt a chunk at a time). Sliding pairs hand transformers the
        dense window (``"dense"``, decided before asking the layer)."""
        if not kernels.enabled():
            return "chunked"
        segments = [seg for seg in self.pair.segments if seg.length]
        path = getattr(segments[0].dirs, "attention_path", None) if segments else None
        return path() if callable(path) else "dense"

    def dense_step(self, key_states, value_states):
        """``(b, h, q, d)`` new K/V -> ``[read-back past | new tokens at 2-byte precision]``."""
        dt, sd = key_states.dtype, self.pair.dtype
        new_k, new_v = key_states.to(sd).to(dt), value_states.to(sd).to(dt)
        past = self.pair.past(self.side, dt)
        self.pair.push(self.side, key_states, value_states)
        if past is None:
            return new_k, new_v
        return torch.cat([past[0], new_k], dim=2), torch.cat([past[1], new_v], dim=2)

    def held_tensors(self):
        return [*self.pair.held(self.side), self.valid.buffer]

    def attended_length(self) -> int:
        return self.tokens_seen if self.window is None else min(self.tokens_seen, self.window)

    def reference_tokens(self) -> int:
        return self.attended_length()

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window + 1


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@register("minicache")
class MiniCache(Method):
    summary = ("MiniCache: merge adjacent deep layers (SLERP direction + per-layer magnitudes, distant tokens "
               "retained); storage=kivi stacks quantization")
    attention = "kvcompress: merged pairs rebuilt a chunk at a time, other layers over their store's parts; padding masked"
    sliding = "adjacent sliding layers merge like any pair (within the window); unpaired ones: plain fp16 window"
    Config = MiniCacheConfig
    test_options = {"start_layer": 1}  # select="depth": the paper's pairs from layer 0 on
    noop_options = {"gamma": 1.0, "select": "depth"}  # every entry retained: both layers exact at 2 bytes

    def prepare(self) -> None:
        g, cfg = self.geometry, self.config
        self.start_layer = g.num_layers // 2 if cfg.start_layer is None else cfg.start_layer
        if not 1 <= self.start_layer <= g.num_layers - 1:
            raise KVCompressError(
                f"minicache: start_layer={self.start_layer} is outside [1, {g.num_layers - 1}] for this "
                f"{g.num_layers}-layer model (the first merged pair is (start_layer - 1, start_layer))"
            )
        if cfg.storage == "fp16" and cfg.storage_options():
            raise KVCompressError(
                f"minicache: {sorted(cfg.storage_options())} apply to a quantizing storage (e.g. storage='kivi'); "
                "storage='fp16' takes none"
            )
        try:  # one tiny append/read: the storage must exist, accept the options and stack
            probe = self.new_storage()
            x = torch.zeros(1, 1, 2, g.head_dim)
            probe.append(x, x)
            ok = isinstance(probe, TokenStorage) and tuple(probe.read(torch.float32)[0].shape) == (1, 1, 2, g.head_dim)
        except KVCompressError as exc:
            raise KVCompressError(f"minicache: storage={cfg.storage!r}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any failure means the storage cannot stack
            raise KVCompressError(f"minicache: storage={cfg.storage!r} cannot stack with minicache: {exc}") from exc
        if not ok:
            raise KVCompressError(f"minicache: storage={cfg.storage!r} is not an append/read KV store")
        # the similarity profile runs the model: only after every option was checked
        self.similarity = None
        if cfg.selection == "similarity":
            self.pairs = self._similar_pairs()
        else:
            self.pairs = layer_pairs(g.layer_types, self.start_layer)
        if not self.pairs:
            raise KVCompressError(
                f"minicache: no two adjacent layers of the same attention type from layer {self.start_layer - 1} "
                f"on (layer types: {list(g.layer_types)}); choose a smaller start_layer"
            )

    def _similar_pairs(self) -> list[tuple[int, int]]:
        """select='similarity': the qualifying pairs, or one KVCompressError naming the best pair and the ways out."""
        from ..profiles.layers import adjacent_similarity, load_similarity

        g, cfg = self.geometry, self.config
        if cfg.profile is not None:
            self.similarity = load_similarity(cfg.profile, g.num_layers)
        else:
            self.similarity = adjacent_similarity(self.model)
        pairs, best = similar_pairs(self.similarity["pairs"], g.layer_types, self.start_layer, cfg.min_similarity)
        if pairs:
            return pairs
        if best is None:
            raise KVCompressError(
                f"minicache: no two adjacent layers of the same attention type from layer {self.start_layer - 1} "
                f"on (layer types: {list(g.layer_types)}); choose a smaller start_layer"
            )
        a, b = best["pair"]
        raise KVCompressError(
            f"minicache: no adjacent layer pair of this model is similar enough to merge safely: the most similar "
            f"pair from layer {self.start_layer - 1} on, ({a}, {b}), has mean per-token cosine K {best['cos_k']:.3f}, "
            f"V {best['cos_v']:.3f}; a pair merges when both reach min_similarity={cfg.min_similarity} (measured on "
            f"{self.similarity.get('tokens', '?')} tokens of {self.similarity.get('source', 'calibration text')}). "
            f"Merging dissimilar layers degrades the model badly. To merge anyway: select='depth' (the paper's pairs "
            f"from start_layer={self.start_layer}: (S-1, S), (S+1, S+2), ...), or a lower min_similarity "
            f"(e.g. min_similarity={math.floor(min(best['cos_k'], best['cos_v']) * 100) / 100:g} merges ({a}, {b}))"
        )

    def describe(self) -> str:
        text = super().describe()
        return f"{text}; pairs {self.pairs}" if self.config.selection == "similarity" else text

    def new_storage(self) -> TokenStorage:
        return make_storage(self.config.storage, self.geometry, **self.config.storage_options())

    def build_layers(self, cache) -> list[KVLayer]:
        g = self.geometry
        # one per cache: a decode step's value tokens of every KIVI store (unmerged layers, merged directions,
        # retained entries) quantized at the next access, one call per shape
        queue = value_queue()

        def queued_storage():
            return share_value_queue(self.new_storage(), queue)

        layers: list[KVLayer | None] = [None] * g.num_layers
        for a, b in self.pairs:
            pair = LayerPair(self, a, b, queued_storage)
            layers[a], layers[b] = MergedLayer(g, a, pair, 0), MergedLayer(g, b, pair, 1)
        for i in range(g.num_layers):
            if layers[i] is None:
                layers[i] = self.sliding_layer(i) if g.is_sliding(i) else ExactLayer(g, i, queued_storage())
        return layers


class ExactLayer(StorageLayer):
    """An unmerged full-attention layer: its tokens in the configured store, attended by kvcompress over the store's
    parts (fp16 runs read in place, a quantizing store chunk by chunk or by its fused kernel), padding masked by
    validity -- never its whole past read back densely for transformers. Over KIVI storage a one-token step is one
    kernel call, as in KIVI's own layers (:meth:`kvcompress.methods.kivi.KiviStore.attend_one_token`)."""

    attends = True


def retained_fractions(cache) -> dict[tuple[int, int], float]:
    """``{(l-1, l): share of merged entries kept exactly}`` for every merged pair of a minicache cache."""
    out = {}
    for layer in cache.layers:
        if isinstance(layer, MergedLayer) and layer.side == 1:
            out[layer.pair.layers] = layer.pair.retained_fraction()
    return out

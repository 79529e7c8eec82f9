"""Exact softmax attention over a layer's stored parts, chunk by chunk, merged by log-sum-exp.

A layer's past is a list of :class:`KVPart` (kept full-precision tokens, quantized blocks, a residual, ...), plus
the step's new tokens as the last, causal part. :func:`attend_parts` reads each part ``chunk`` tokens at a time
(dequantizing only that chunk), keeps a running max / sum / output per query row and merges them exactly (the
online softmax of flash-attention), so the transient memory is bounded by the chunk, not by the context.

Shapes: ``query (batch, heads, q, head_dim)`` with ``heads = kv_heads * group`` (query head ``j`` reads KV head
``j // group``, as transformers' ``repeat_kv``); a part's chunk ``(batch, kv_heads, n, head_dim)``; validity
``(batch, kv_heads or 1, n)`` bool (False = padding or an empty slot: never attended).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: tokens dequantized at a time (the transient per part is ``batch * kv_heads * CHUNK * head_dim * 2`` floats)
CHUNK = 2048


@dataclass
class KVPart:
    """A run of ``length`` stored tokens of one layer.

    ``read(start, stop, dtype)`` returns ``(keys, values)`` of tokens ``[start, stop)``, each
    ``(batch, kv_heads, stop - start, head_dim)`` in ``dtype`` (a transient copy for quantized parts, a view for
    dense ones). ``valid``: ``(batch, kv_heads or 1, length)`` bool or None (all valid). ``causal``: the step's
    new tokens (query ``i`` sees new token ``j`` iff ``j <= i``). ``kind`` names the storage, for reports.
    """

    length: int
    read: Callable[[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor | None = None
    causal: bool = False
    kind: str = "dense"
    chunk_tokens: int = CHUNK  # a quantized part sets a multiple of its group so chunks fall on group edges
    #: a fused kernel over the whole part, or None: ``fused(qg, valid) -> (acc, m, l)`` with ``qg (b, kv_heads, rows,
    #: d)`` fp32 queries already multiplied by the scaling (rows = group * q, query heads of a KV group folded in),
    #: ``valid`` as above; returns fp32 ``acc (b, kv_heads, rows, d) = sum_j exp(s_j - m) v_j``, ``m (b, kv_heads,
    #: rows)`` the row max (-inf where nothing is visible) and ``l (b, kv_heads, rows) = sum_j exp(s_j - m)``. Used for
    #: non-causal parts when no probabilities are asked for.
    fused: Callable | None = None
    kv_heads: int = 0  # KV heads of the part (0 = learnt from its first chunk); needed by fused parts

    @classmethod
    def dense(cls, keys: torch.Tensor, values: torch.Tensor, valid=None, causal=False, kind="dense") -> "KVPart":
        """A part over tensors already held: ``keys``/``values (batch, kv_heads, n, head_dim)``."""

        def read(start, stop, dtype):
            return keys[:, :, start:stop].to(dtype), values[:, :, start:stop].to(dtype)

        return cls(keys.shape[2], read, valid, causal, kind, kv_heads=keys.shape[1])


def with_validity(parts: list[KVPart], valid: torch.Tensor | None) -> list[KVPart]:
    """Give ``parts`` (a layer's stored tokens, in order) their slices of ``valid (batch, kv_heads or 1, total)``;
    ``None`` leaves them all valid. Returns ``parts``."""
    offset = 0
    for part in parts:
        if valid is not None:
            part.valid = valid[:, :, offset : offset + part.length]
        offset += part.length
    return parts


def grow_validity(valid: torch.Tensor | None, new_valid: torch.Tensor | None, stored: int,
                  new_keys: torch.Tensor, heads: int) -> torch.Tensor | None:
    """Validity of a layer's stored tokens after appending the step's ``new_keys (batch, _, q, d)``: ``valid (batch,
    heads, stored)`` or None (all real so far), ``new_valid (batch, q)`` or None (all real). Stays None until padding
    is first seen."""
    if new_valid is None and valid is None:
        return None
    b, q, dev = new_keys.shape[0], new_keys.shape[2], new_keys.device
    if new_valid is None:
        new_valid = torch.ones(b, q, dtype=torch.bool, device=dev)
    if valid is None:
        valid = torch.ones(b, heads, stored, dtype=torch.bool, device=dev)
    return torch.cat([valid, new_valid[:, None, :].expand(b, heads, q)], dim=-1)


def sliding_view(held: int, seen: int, size: int, q: int, batch: int, device) -> tuple[torch.Tensor | None, tuple | None]:
    """How a sliding-window layer masks its window of ``size`` positions for a step of ``q`` queries from position
    ``seen``, holding ``held`` past tokens (positions ``seen - held .. seen - 1``): ``(validity (batch, 1, held) of the
    held keys, None)`` for one query (fused parts still apply), ``(None, window)`` for ``attend_parts(window=...)``
    otherwise, ``(None, None)`` when nothing needs masking."""
    first = seen - held
    if q > 1:
        return None, (size, first, seen)
    if not held:
        return None, None
    visible = first + torch.arange(held, device=device) > seen - size
    return visible.view(1, 1, held).expand(batch, 1, held), None


@dataclass
class AttentionResult:
    """``output (batch, q, heads, head_dim)`` in the query dtype (the layout transformers' attention functions
    return); ``probs (batch, kv_heads, group, q_probs, keys)`` fp32 over all parts in order, for the last
    ``q_probs`` queries, when asked for; ``transient_bytes``: the largest chunk read at once."""

    output: torch.Tensor
    probs: torch.Tensor | None
    transient_bytes: int


def _read_whole(parts: list[KVPart], batch: int):
    """Every part read whole and joined: ``(keys, values)`` fp32 ``(b, kv_heads, n, d)`` and the validity ``(b, kv|1,
    n)`` bool of the joined keys, None when no part has one (all valid)."""
    keys, values = zip(*(part.read(0, part.length, torch.float32) for part in parts))
    k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
    v = values[0] if len(values) == 1 else torch.cat(values, dim=2)
    if all(part.valid is None for part in parts):
        return k, v, None
    masks = [torch.ones(batch, 1, part.length, dtype=torch.bool, device=k.device) if part.valid is None
             else part.valid.to(torch.bool) for part in parts]
    width = max(m.shape[1] for m in masks)
    return k, v, torch.cat([m.expand(batch, width, -1) for m in masks], dim=-1)


def _attend_one_query(query: torch.Tensor, parts: list[KVPart], scaling: float) -> AttentionResult | None:
    """A decode step over a short past (every part read whole, at most ``CHUNK`` keys): one fused sdpa call over all
    keys instead of the per-part online softmax (~20 ops per part). ``query (b, heads, 1, d)``, the query heads of a
    KV group folded into rows (no repeated K/V). None when some query row would see no key (the general path gives
    those rows 0)."""
    b, heads, _, d = query.shape
    k, v, mask = _read_whole(parts, b)
    kv_heads = k.shape[1]
    if mask is not None:
        if not bool(mask.any(dim=-1).all()):
            return None
        mask = mask.unsqueeze(2)  # (b, kv|1, 1, n): every query row of the group
    qg = query.float().reshape(b, kv_heads, heads // kv_heads, d)
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)  # (b, kv, g, d)
    output = out.reshape(b, heads, 1, d).transpose(1, 2)
    return AttentionResult(output.to(query.dtype).contiguous(), None, 2 * k.numel() * k.element_size())


def _merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``(acc, m, l)`` of several parts (the ``KVPart.fused`` contract, same shapes) merged by log-sum-exp into one
    (a single partial is returned as it is). A row no part sees keeps ``m = -inf``, ``l = 0``, ``acc = 0``."""
    if len(partials) == 1:
        return partials[0]
    accs, ms, ls = zip(*partials)
    m_all = torch.stack(ms)  # (parts, b, kv, rows)
    m = m_all.amax(dim=0)
    # -inf rows (nothing visible anywhere) get weights exp(-inf) = 0 instead of nan; finite maxima are unchanged
    w = torch.exp(m_all - m.clamp_min(torch.finfo(torch.float32).min))
    l = (torch.stack(ls) * w).sum(dim=0)
    acc = (torch.stack(accs) * w.unsqueeze(-1)).sum(dim=0)
    return acc, m, l


def _attend_decode(query: torch.Tensor, parts: list[KVPart], scaling: float, kv_heads_of_fused: int) -> AttentionResult:
    """A one-query step over parts of which some are fused (a quantized past read by its kernel): each fused part
    gives its ``(acc, m, l)``, the other parts (short: read whole, at most ``CHUNK`` keys) are one dense softmax
    partial, and all are merged by log-sum-exp once -- a handful of ops per step instead of ~20 per part. ``query
    (b, heads, 1, d)``; a causal part of one token is visible to the one query. Same result as the general loop
    (within float rounding)."""
    b, heads, q, d = query.shape
    kv_heads = kv_heads_of_fused
    qg = query.float().reshape(b, kv_heads, heads // kv_heads * q, d) * scaling
    partials = []
    dense = []
    for part in parts:
        if part.fused is not None:
            partials.append(part.fused(qg, part.valid))
        elif part.length:
            dense.append(part)
    transient = 0
    if dense:
        k, v, mask = _read_whole(dense, b)
        transient = 2 * k.numel() * k.element_size()
        s = torch.matmul(qg, k.transpose(-1, -2))  # (b, kv, g, n)
        if mask is not None:
            s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
        m = s.amax(dim=-1)
        p = torch.exp(s - m.clamp_min(torch.finfo(torch.float32).min).unsqueeze(-1))
        partials.append((torch.matmul(p, v), m, p.sum(dim=-1)))
    acc, _, l = _merge_partials(partials)
    return AttentionResult(normalized_output(acc, l, query), None, transient)


_TINY = torch.finfo(torch.float32).tiny


def normalized_output(acc: torch.Tensor, l: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``acc / l`` of the partials of ``query (b, heads, q, d)`` folded into its KV groups (``acc (b, kv_heads, heads
    // kv_heads * q, d)``, ``l (b, kv_heads, rows)``; a row that saw nothing gives 0) in the layout transformers'
    attention functions return: ``(b, q, heads, d)`` in the query's dtype."""
    b, heads, q, d = query.shape
    output = (acc / l.clamp_min(_TINY).unsqueeze(-1)).reshape(b, heads, q, d).transpose(1, 2)
    return output.to(query.dtype).contiguous()


def _decode_kv_heads(parts: list[KVPart]) -> int:
    """The KV heads of the first fused part when :func:`_attend_decode` serves a one-query step over ``parts`` (some
    fused, none of them causal; the other parts short; a causal part only the one new token), else 0."""
    kv_heads, other = 0, 0
    for part in parts:
        if part.fused is not None:
            if part.causal:
                return 0
            kv_heads = kv_heads or part.kv_heads
        else:
            if part.causal and part.length != 1:
                return 0
            other += part.length
    return kv_heads if other <= CHUNK else 0


def _attend_prompt(query: torch.Tensor, part: KVPart, scaling: float, probs_last: int,
                   window: tuple[int, int, int] | None) -> AttentionResult:
    """A step whose only keys are its own tokens (a prefill): one sdpa call (transformers' own kernel: blocked, never
    the whole ``q x q`` score matrix in fp32) instead of the online softmax over chunks. ``query (b, heads, q, d)``,
    ``part`` the new tokens (causal, ``q`` keys); padding and a sliding window become a boolean mask ``(b, 1, q, q)``.
    The probabilities of the last ``probs_last`` queries are computed for those rows only. A row with no visible key
    gets output 0 (as in the general path)."""
    b, heads, q, d = query.shape
    k, v = part.read(0, part.length, torch.float32)  # (b, kv, q, d)
    kv_heads, group = k.shape[1], heads // k.shape[1]
    qf = query.float()
    mask = None  # (b, 1, q, q) bool: causal & valid & window
    if part.valid is not None or window is not None:
        pos = torch.arange(q, device=query.device)
        mask = (pos.unsqueeze(0) <= pos.unsqueeze(1)).view(1, 1, q, q)
        if part.valid is not None:
            mask = mask & part.valid.to(torch.bool).all(dim=1, keepdim=True).unsqueeze(2)
        if window is not None:
            size, key0, query0 = window
            mask = mask & ((key0 + pos).unsqueeze(0) > (query0 + pos).unsqueeze(1) - size).view(1, 1, q, q)
        empty = ~mask.any(dim=-1, keepdim=True)  # rows that see nothing: let them see all, zero them after
        out = torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=mask | empty, scale=scaling,
                                                               enable_gqa=group > 1)
        out = out.masked_fill(empty, 0.0)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(qf, k, v, is_causal=True, scale=scaling,
                                                               enable_gqa=group > 1)
    probs = None
    if probs_last:
        r = probs_last
        ql = qf[:, :, q - r :].reshape(b, kv_heads, group, r, d) * scaling
        s = torch.einsum("bhgrd,bhnd->bhgrn", ql, k)
        if mask is not None:
            keep = mask[:, :, q - r :].unsqueeze(1)  # (b, 1, 1, r, q)
        else:  # causal only
            rows, cols = torch.arange(q - r, q, device=query.device), torch.arange(q, device=query.device)
            keep = (cols.unsqueeze(0) <= rows.unsqueeze(1)).view(1, 1, 1, r, q)
        s = s.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return AttentionResult(out.transpose(1, 2).to(query.dtype).contiguous(), probs, 2 * k.numel() * k.element_size())


def attend_parts(query: torch.Tensor, parts: list[KVPart], scaling: float, probs_last: int = 0,
                 window: tuple[int, int, int] | None = None) -> AttentionResult:
    """Softmax attention of ``query`` over the concatenation of ``parts`` (the last ``q`` queries of the sequence).

    ``probs_last``: also return the attention probabilities of the last ``probs_last`` queries over every key
    (for methods that score tokens: H2O, SnapKV); 0 = none. ``window``: sliding-window attention, ``(size,
    first key position, first query position)``: the keys of all parts are consecutive positions from the second
    number, the queries from the third, and query ``p`` sees key ``k`` only if ``k > p - size`` (fused parts are then
    read chunk by chunk). A query row with no visible key gets output 0. Computed in fp32.
    """
    b, heads, q, d = query.shape
    if not parts:
        raise ValueError("attention needs at least one part")
    if q == 1 and not probs_last and window is None and all(p.fused is None for p in parts) \
            and sum(p.length for p in parts) <= CHUNK:
        result = _attend_one_query(query, parts, scaling)
        if result is not None:
            return result
    if q == 1 and not probs_last and window is None:
        kv_heads = _decode_kv_heads(parts)
        if kv_heads:
            return _attend_decode(query, parts, scaling, kv_heads)
    if len(parts) == 1 and parts[0].causal and parts[0].length == q and parts[0].fused is None and q > 1 \
            and (parts[0].valid is None or parts[0].valid.shape[1] == 1):
        return _attend_prompt(query, parts[0], scaling, probs_last, window)
    kv_heads = group = out = m = l = qg = rows = None
    kept_scores: list[torch.Tensor] = []
    transient = 0

    def start_rows(n_kv: int):
        nonlocal kv_heads, group, qg, rows, out, m, l
        kv_heads, group = n_kv, heads // n_kv
        qg = query.float().reshape(b, kv_heads, group * q, d) * scaling
        rows = torch.arange(group * q, device=query.device) % q  # query index of each folded row
        out = qg.new_zeros(b, kv_heads, group * q, d)
        m = qg.new_full((b, kv_heads, group * q), float("-inf"))
        l = qg.new_zeros(b, kv_heads, group * q)

    known = [p.kv_heads for p in parts if p.kv_heads]
    if known:
        start_rows(known[0])
    offset = 0  # keys before this part
    for part in parts:
        part_offset, offset = offset, offset + part.length
        if part.fused is not None and not part.causal and not probs_last and kv_heads is not None and window is None:
            acc, m_part, l_part = part.fused(qg, part.valid)
            m_new = torch.maximum(m, m_part)
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha, beta = torch.exp(m - safe), torch.exp(m_part - safe)
            l = l * alpha + l_part * beta
            out = out * alpha.unsqueeze(-1) + acc * beta.unsqueeze(-1)
            m = m_new
            continue
        step = max(part.chunk_tokens, 1)
        for start in range(0, part.length, step):
            stop = min(start + step, part.length)
            k, v = part.read(start, stop, torch.float32)
            transient = max(transient, 2 * k.numel() * k.element_size())
            if kv_heads is None:
                start_rows(k.shape[1])
            s = torch.matmul(qg, k.transpose(-1, -2))  # (b, kv, g*q, n)
            mask = None
            if part.valid is not None:
                mask = part.valid[:, :, start:stop].to(torch.bool).unsqueeze(2)  # (b, kv|1, 1, n)
            if part.causal:
                cols = torch.arange(start, stop, device=query.device)
                causal = (cols.unsqueeze(0) <= rows.unsqueeze(1)).view(1, 1, group * q, stop - start)
                mask = causal if mask is None else mask & causal
            if window is not None:
                size, key0, query0 = window
                key_pos = key0 + part_offset + torch.arange(start, stop, device=query.device)
                seen = (key_pos.unsqueeze(0) > (query0 + rows).unsqueeze(1) - size).view(1, 1, group * q, stop - start)
                mask = seen if mask is None else mask & seen
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            if probs_last:
                kept_scores.append(s.view(b, kv_heads, group, q, -1)[:, :, :, q - probs_last :])
            m_new = torch.maximum(m, s.amax(dim=-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing visible yet
            p = torch.exp(s - safe.unsqueeze(-1))
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(dim=-1)
            out = out * alpha.unsqueeze(-1) + torch.matmul(p, v)
            m = m_new
    output = out / l.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    output = output.view(b, kv_heads, group, q, -1).reshape(b, heads, q, -1).transpose(1, 2)
    probs = None
    if probs_last:
        lse = (torch.where(torch.isinf(m), torch.zeros_like(m), m) + torch.log(l.clamp_min(1e-38)))
        lse = lse.view(b, kv_heads, group, q)[:, :, :, q - probs_last :].unsqueeze(-1)
        probs = torch.exp(torch.cat(kept_scores, dim=-1) - lse)
    return AttentionResult(output.to(query.dtype).contiguous(), probs, transient)

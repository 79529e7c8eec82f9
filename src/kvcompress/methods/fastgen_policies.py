"""FastGen policies: which tokens each KV head keeps, how the policy is chosen from the prompt's attention.

A policy is a set of base policies, held as bit flags: ``special`` (tokenizer special tokens), ``punct``
(punctuation tokens), ``frequent`` (the ``ceil(r_f * n)`` tokens with the largest cumulative attention),
``local`` (the ``ceil(r_l * n)`` most recent tokens), or ``full``. ``+`` is the union of kept sets. FastGen tries
the hybrids of :data:`HYBRIDS` cheapest first and keeps the first whose recovery reaches ``T``.

Recovery of a policy C over a prompt of ``n`` tokens = mean over the prompt queries ``i`` of the attention mass
(pooled over the query heads of the KV group) that falls on the tokens C keeps *as seen by query i*:
special / punct / frequent are the fixed sets the cache will hold after the prompt, and local is the window
relative to that query (``j >= i + 1 - ceil(r_l * (i + 1))``), the same rule decoding applies at every step.
Both reduce to per-key column statistics, so one chunked pass over the attention map suffices:
``sum_i mass_i(C) = sum_{j in C} colsum_j`` and ``sum_i mass_i(C u L_i) = sum_{j in C} colsum_j +
sum_{j not in C} bandcol_j`` where ``bandcol_j`` sums the attention ``j`` receives from queries whose local
window contains it.
"""

from __future__ import annotations

import math
import re
import unicodedata

import torch

from ..attention import grouped_probs
from ..eviction import topk_keep
from ..registry import KVCompressError

SPECIAL, PUNCT, FREQUENT, LOCAL, FULL = 1, 2, 4, 8, 16
BASE = {"special": SPECIAL, "punct": PUNCT, "frequent": FREQUENT, "local": LOCAL, "full": FULL}
#: FastGen's hybrid policies, cheapest first (each keeps a superset of the previous one)
HYBRIDS = (SPECIAL, SPECIAL | PUNCT, SPECIAL | PUNCT | FREQUENT, SPECIAL | PUNCT | FREQUENT | LOCAL, FULL)


def policy_name(bits: int) -> str:
    """``5 -> "special+frequent"``; ``FULL -> "full"``."""
    if bits & FULL:
        return "full"
    return "+".join(name for name, bit in BASE.items() if bits & bit) or "none"


HYBRID_NAMES = tuple(policy_name(b) for b in HYBRIDS)


def parse_policy(text: str) -> int | None:
    """``"adaptive"`` -> None (profile per head); ``"local+frequent"`` -> its bit flags (forced on every head)."""
    if text == "adaptive":
        return None
    parts = text.split("+") if isinstance(text, str) else [None]
    if not all(p in BASE for p in parts) or len(set(parts)) != len(parts) or ("full" in parts and len(parts) > 1):
        raise KVCompressError(
            f"fastgen: policy={text!r} is not 'adaptive', 'full' or a '+'-joined set of {sorted(set(BASE) - {'full'})}"
        )
    return sum(BASE[p] for p in parts)


# --------------------------------------------------------------------------------------------------------------------
# Token classes (from the tokenizer)
# --------------------------------------------------------------------------------------------------------------------

_ASCII_ALNUM = re.compile(r"[A-Za-z0-9]")


def punctuation_ids(tokenizer) -> list[int]:
    """Ids of punctuation tokens: the decoded text, whitespace stripped, is non-empty and every character has a
    Unicode category ``P*`` (``.``, ``,``, ``?!``, ``).``, ``"``, ``’``, ``...``). Special tokens are excluded.

    Tokens whose vocabulary string holds an ASCII letter or digit are skipped without decoding (they always decode
    to text with that letter or digit); byte-fallback pieces such as ``<0x2E>`` are therefore not counted.
    """
    specials = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    candidates = [i for i, p in enumerate(pieces) if p is not None and i not in specials and not _ASCII_ALNUM.search(p)]
    texts = tokenizer.batch_decode([[i] for i in candidates])
    out = []
    for i, text in zip(candidates, texts):
        s = text.strip()
        if s and all(unicodedata.category(c).startswith("P") for c in s):
            out.append(i)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Profiling (one prompt row at a time)
# --------------------------------------------------------------------------------------------------------------------


def local_window(n: torch.Tensor | int, ratio: float):
    """Tokens the local policy keeps at length ``n``: ``ceil(ratio * n)`` (at least 1, at most ``n``)."""
    if isinstance(n, int):
        return max(1, min(math.ceil(ratio * n), n))
    return torch.ceil(n.double() * ratio).long().clamp(min=1).minimum(n)


def map_stats(pooled: torch.Tensor, first_query: int, local: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column statistics of a block of a causal attention map: ``pooled (kv_heads, c, k)`` holds the rows of
    queries ``first_query .. first_query + c - 1`` over keys ``0 .. k - 1``. Returns ``(colsum, bandcol)``, each
    ``(kv_heads, k)``: the attention each key receives from these queries, and the part of it from queries whose
    local window (``j >= i + 1 - ceil(local * (i + 1))``) holds the key."""
    c, k = pooled.shape[1], pooled.shape[2]
    rows = torch.arange(first_query, first_query + c, device=pooled.device)
    start = rows + 1 - local_window(rows + 1, local)  # first key of each query's local window
    inside = torch.arange(k, device=pooled.device)[None, :] >= start[:, None]  # (c, k); causal zeros above
    return pooled.sum(dim=1), (pooled * inside).sum(dim=1)


def column_stats(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, local: float, chunk: int = 256, band: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-key statistics of the causal attention map of one prompt, pooled over each KV group.

    ``query (heads, n, d)``, ``keys (kv_heads, n, d)`` (post-RoPE). Returns fp32 ``colsum (kv_heads, n)`` =
    attention each key receives summed over the queries (mean over the group's query heads) and, with ``band``,
    ``bandcol (kv_heads, n)`` (see :func:`map_stats`). Queries are processed ``chunk`` rows at a time: the
    transient map is ``(kv_heads, group, chunk, n)`` fp32.
    """
    kv, n = keys.shape[0], keys.shape[1]
    colsum = torch.zeros(kv, n, dtype=torch.float32, device=keys.device)
    bandcol = torch.zeros_like(colsum) if band else None
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        pooled = grouped_probs(query[None, :, i0:i1], keys[None, :, :i1], scaling, causal=True)[0].mean(dim=1)
        if band:
            cs, bc = map_stats(pooled, i0, local)
            colsum[:, :i1] += cs
            bandcol[:, :i1] += bc
        else:
            colsum[:, :i1] += pooled.sum(dim=1)
    return colsum, bandcol


def frequent_set(colsum: torch.Tensor, ratio: float) -> torch.Tensor:
    """``(kv_heads, n)`` bool: the ``ceil(ratio * n)`` tokens with the largest cumulative attention per head."""
    kv, n = colsum.shape
    keep = torch.zeros(kv, n, dtype=torch.bool, device=colsum.device)
    idx = topk_keep(colsum[None], local_window(n, ratio))[0]
    return keep.scatter_(1, idx, True)


def recoveries(
    colsum: torch.Tensor, bandcol: torch.Tensor, special: torch.Tensor, punct: torch.Tensor, frequent: float
) -> torch.Tensor:
    """Recovery of each hybrid of :data:`HYBRIDS` per KV head: ``(kv_heads, 5)`` fp32 in [0, 1].

    ``colsum``/``bandcol`` from :func:`column_stats`; ``special``/``punct``: ``(n,)`` bool token classes."""
    n = colsum.shape[1]
    s = special[None].expand_as(colsum)
    sp = s | punct[None]
    spf = sp | frequent_set(colsum, frequent)
    mass = lambda m: (colsum * m).sum(dim=1)  # noqa: E731
    out = torch.stack(
        [mass(s), mass(sp), mass(spf), mass(spf) + (bandcol * ~spf).sum(dim=1), colsum.sum(dim=1)], dim=1
    )
    return (out / n).clamp(max=1.0)


def choose(rec: torch.Tensor, threshold: float, local_always: bool = False) -> list[int]:
    """Cheapest hybrid per head with recovery >= ``threshold`` (full when none, and always at threshold 1:
    a dropped token always carries some attention). ``local_always`` (a refinement, not the paper): only the hybrids
    that keep the local window (special+punct+frequent+local) or full are candidates."""
    if threshold >= 1.0:
        return [FULL] * rec.shape[0]
    ok = rec[:, :-1] >= threshold
    if local_always:
        ok = ok & torch.tensor([bool(h & LOCAL) for h in HYBRIDS[:-1]], device=ok.device)
    return [HYBRIDS[int(row.nonzero()[0])] if row.any() else FULL for row in ok]


def prompt_keep(
    policies: list[int],
    special: torch.Tensor,
    punct: torch.Tensor,
    colsum: torch.Tensor | None,
    local: float,
    frequent: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens each KV head keeps after the prompt: ``(keep, protected)`` both ``(kv_heads, n)`` bool, where
    ``protected`` marks tokens kept for being special/punctuation (never evicted later)."""
    kv, n = len(policies), special.shape[0]
    bits = torch.tensor(policies, device=special.device)[:, None]
    protected = (special[None] & (bits & SPECIAL).bool()) | (punct[None] & (bits & PUNCT).bool())
    keep = protected | (bits & FULL).bool()
    if any(p & LOCAL for p in policies):
        recent = torch.arange(n, device=special.device) >= n - local_window(n, local)
        keep |= recent[None] & (bits & LOCAL).bool()
    if any(p & FREQUENT for p in policies):
        keep |= frequent_set(colsum, frequent) & (bits & FREQUENT).bool()
    return keep.expand(kv, n), protected.expand(kv, n)


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(rows, n)`` bool marking each row's ``k[row]`` largest ``scores`` (``k (rows,)`` int64)."""
    rows, n = scores.shape
    kmax = int(k.max()) if rows else 0
    out = torch.zeros(rows, n, dtype=torch.bool, device=scores.device)
    if kmax == 0 or n == 0:
        return out
    idx = scores.topk(min(kmax, n), dim=1).indices
    return out.scatter_(1, idx, torch.arange(idx.shape[1], device=scores.device)[None] < k[:, None])

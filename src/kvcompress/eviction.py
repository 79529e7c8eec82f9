"""Shared eviction primitives: a layer that really drops tokens, attention-based scores, top-k selection.

Used by every evicting method (streaming, h2o, snapkv, fastkv, fastgen). Shapes:
``keys``/``values`` ``(batch, kv_heads, n, head_dim)``; ``query`` ``(batch, heads, q, head_dim)`` with
``heads = kv_heads * group``; scores and kept indices ``(batch, kv_heads, n)``.

The layer keeps tokens in ascending logical order per (batch row, head): the last ``r`` stored tokens are the
``r`` most recent ones whenever the method keeps its recent window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import KVPart, attend_parts, grouped_probs, grow_validity, with_validity
from .cache import KVLayer, ModelGeometry
from .config import check_positive_int
from .registry import KVCompressError
from .storage import TokenStorage, make_storage

POOLS = ("avg", "max", "none")


# --------------------------------------------------------------------------------------------------------------------
# Composition: how a prefill-only evicting method stores its kept tokens
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageOptions:
    """Config mixin (``class Config(StorageOptions)``) for methods that put their kept tokens in a ``TokenStorage``:
    ``make_cache("snapkv", model, budget=0.2, storage="kivi", bits=2)``. Unset (None) options are not passed
    to the store."""

    storage: str = "fp16"  # how kept tokens are stored: fp16 | kivi | any registered store
    bits: int | None = None  # store option (e.g. kivi bits)
    key_bits: int | None = None  # store option
    value_bits: int | None = None  # store option
    group_size: int | None = None  # store option
    residual: int | None = None  # store option

    def storage_kwargs(self) -> dict:
        names = ("bits", "key_bits", "value_bits", "group_size", "residual")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def make_storage(self, geometry: ModelGeometry) -> TokenStorage:
        """A fresh store (raises KVCompressError for an unknown storage or options it rejects)."""
        if not isinstance(self.storage, str):
            raise KVCompressError(f"storage must be a name such as 'fp16' or 'kivi', got {self.storage!r}")
        return make_storage(self.storage, geometry, **self.storage_kwargs())


# --------------------------------------------------------------------------------------------------------------------
# Scoring and selection
# --------------------------------------------------------------------------------------------------------------------


def received_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int = 512) -> torch.Tensor:
    """Attention each key receives, summed over the queries and over the query heads of its KV group.

    ``query (b, heads, q, d)`` are the last ``q`` positions of ``keys (b, kv_heads, k, d)`` (causal).
    Returns fp32 ``(b, kv_heads, k)``. Queries are processed ``chunk`` at a time so the transient
    probabilities stay ``(b, kv_heads, group, chunk, k)``.
    """
    q, k = query.shape[-2], keys.shape[-2]
    if q > k:
        raise KVCompressError(f"{q} queries cannot be the last positions of {k} keys")
    out = torch.zeros(keys.shape[0], keys.shape[1], k, dtype=torch.float32, device=keys.device)
    for start in range(0, q, chunk):
        stop = min(start + chunk, q)
        visible = k - q + stop  # keys visible to the last query of this chunk
        probs = grouped_probs(query[:, :, start:stop], keys[:, :, :visible], scaling, causal=True)
        out[..., :visible] += probs.sum(dim=(2, 3))
    return out


def pool_scores(scores: torch.Tensor, pool: str = "avg", kernel: int = 5) -> torch.Tensor:
    """1-D smoothing along the token axis (stride 1, same length): ``(b, h, n) -> (b, h, n)``.
    ``avg`` counts the zero padding (as SnapKV's ``avg_pool1d``), ``max`` ignores it."""
    if pool not in POOLS:
        raise KVCompressError(f"pool={pool!r} is not one of {list(POOLS)}")
    n = scores.shape[-1]
    if pool == "none" or kernel == 1 or n == 0:
        return scores
    flat = scores.reshape(-1, 1, n)
    fn = F.avg_pool1d if pool == "avg" else F.max_pool1d
    return fn(flat, kernel_size=kernel, stride=1, padding=kernel // 2)[..., :n].reshape(scores.shape)


def window_scores(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, pool: str = "avg", kernel: int = 5
) -> torch.Tensor:
    """SnapKV scores: attention of the ``w`` window queries ``(b, heads, w, d)`` (the last ``w`` positions)
    over the prompt keys ``(b, kv_heads, k, d)``, summed over the window and over each KV group's query heads,
    then pooled along the tokens *before* the window (as SnapKV does; the window's own ``w`` scores are left
    unpooled — callers keep the window anyway). Returns fp32 ``(b, kv_heads, k)``."""
    return pool_window_scores(received_attention(query, keys, scaling), query.shape[-2], pool, kernel)


def pool_window_scores(scores: torch.Tensor, window: int, pool: str = "avg", kernel: int = 5) -> torch.Tensor:
    """Pool ``scores (b, kv_heads, k)`` along the tokens before the last ``window`` (SnapKV); the window's own
    scores are left as they are."""
    prefix = scores.shape[-1] - window
    if prefix > 0:
        scores = scores.clone()
        scores[..., :prefix] = pool_scores(scores[..., :prefix], pool, kernel)
    return scores


def topk_keep(scores: torch.Tensor, budget: int, always_keep_last: int = 0) -> torch.Tensor:
    """Indices of the ``budget`` tokens to keep per (batch row, head), in ascending (original) order.

    ``scores (b, h, n)``; the last ``always_keep_last`` tokens are always kept (if they alone exceed the budget,
    the last ``budget`` tokens are kept). Returns int64 ``(b, h, min(budget, n))``.
    """
    b, h, n = scores.shape
    if budget >= n:
        return torch.arange(n, device=scores.device).expand(b, h, n)
    if budget < 1:
        raise KVCompressError(f"cannot keep {budget} tokens")
    last = min(max(always_keep_last, 0), n)
    if last >= budget:
        return torch.arange(n - budget, n, device=scores.device).expand(b, h, budget)
    head = scores[..., : n - last]
    picked = torch.topk(head.float(), budget - last, dim=-1).indices
    recent = torch.arange(n - last, n, device=scores.device).expand(b, h, last)
    return torch.cat([picked.sort(dim=-1).values, recent], dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------------


class EvictionLayer(KVLayer):
    """Kept tokens' K/V at 2-byte precision, ``(batch, kv_heads, kept, head_dim)`` (same ``kept`` for every
    row and head, possibly different tokens per head), in ascending logical order.

    - :meth:`append` adds the new tokens and returns ``[kept | new]`` for attention (what is stored, in the
      compute dtype); :meth:`keep` gathers a subset and drops the rest (new, smaller tensors).
    - ``track_positions``: also hold the kept tokens' logical positions ``(batch, kv_heads, kept)`` int32.
    - ``token_state``: per-token tensors ``(batch, kv_heads, kept, ...)`` (e.g. H2O's cumulative scores) that
      follow their tokens on :meth:`keep`; :meth:`append` extends them with zeros for the new tokens.
    - ``storage``: a ``TokenStorage``; after :meth:`commit` the kept tokens live in the store, later tokens are
      appended to it, and :meth:`keep` is no longer possible (for methods that evict only at prefill).

    Subclasses that attend by themselves implement :meth:`after_attention` (select, then ``self.keep(idx)``);
    :meth:`dense_step` (the dense reference) appends, selects and returns ``keys, values``. Everything held is counted by :meth:`held_tensors`.
    """

    def __init__(
        self,
        geometry: ModelGeometry,
        layer_idx: int,
        *,
        storage: TokenStorage | None = None,
        track_positions: bool = False,
    ):
        super().__init__(geometry, layer_idx)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.track_positions = track_positions
        self.token_state: dict[str, torch.Tensor] = {}
        self.storage = storage
        self.committed = False
        self.valid: torch.Tensor | None = None  # (batch, kv_heads, stored) bool once padding was seen; None = all real

    # -- adding and dropping tokens ---------------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, new_valid: torch.Tensor | None = None,
               read_back: bool = True):
        """Add ``(b, kv_heads, q, d)`` new tokens (``new_valid (b, q)``: False = padding, None = all real); return
        all stored tokens ``[kept | new]`` in the compute dtype (None with ``read_back=False``)."""
        b, h, q, _ = key_states.shape
        self.valid = grow_validity(self.valid, new_valid, self.attended_length(), key_states, h)
        if self.track_positions:
            pos = torch.arange(self.tokens_seen, self.tokens_seen + q, dtype=torch.int32, device=key_states.device)
            pos = pos.expand(b, h, q)
            self.positions = pos.contiguous() if self.positions is None else torch.cat([self.positions, pos], -1)
        for name, state in self.token_state.items():
            pad = state.new_zeros(b, h, q, *state.shape[3:])
            self.token_state[name] = torch.cat([state, pad], dim=2)
        if self.committed:
            self.storage.append(key_states, value_states)
            return self.storage.read(key_states.dtype) if read_back else None
        dt = self.geometry.storage_dtype
        k, v = key_states.to(dt), value_states.to(dt)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return (self.k.to(key_states.dtype), self.v.to(value_states.dtype)) if read_back else None

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the stored tokens at ``indices`` — ``(n,)`` (same for all rows and heads) or
        ``(batch, kv_heads, n)`` (per row and head) positions into the current stored tokens — and drop the rest."""
        if self.committed:
            raise KVCompressError("tokens already moved to storage cannot be evicted (storage is append-only)")
        if self.k is None:
            raise KVCompressError("nothing stored yet to evict from")
        indices = indices.to(device=self.k.device, dtype=torch.long)
        if indices.dim() == 1:
            indices = indices.sort().values
            take = lambda t: t.index_select(2, indices)  # noqa: E731
        elif indices.dim() == 3 and indices.shape[:2] == self.k.shape[:2]:
            indices = indices.sort(dim=-1).values

            def take(t):
                idx = indices.view(*indices.shape, *([1] * (t.dim() - 3)))
                return t.gather(2, idx.expand(*indices.shape, *t.shape[3:]))

        else:
            raise KVCompressError(f"keep() needs (n,) or (batch, kv_heads, n) indices, got {tuple(indices.shape)}")
        self.k, self.v = take(self.k), take(self.v)
        if self.valid is not None:
            self.valid = take(self.valid)
        if self.positions is not None:
            self.positions = take(self.positions)
        self.token_state = {name: take(t) for name, t in self.token_state.items()}

    def commit(self) -> None:
        """Move the kept tokens into ``storage`` (no-op without a store). Later tokens go to the store."""
        if self.storage is None or self.committed:
            return
        if self.k is not None:
            self.storage.append(self.k, self.v)
        self.k = self.v = None
        self.committed = True

    def dense_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Default: append without evicting (subclasses select and :meth:`keep` here)."""
        return self.append(key_states, value_states)

    # -- reading ----------------------------------------------------------------------------------------------------
    def stored_kv(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All kept tokens ``(b, kv_heads, kept, d)`` each, in ``dtype``."""
        if self.committed:
            return self.storage.read(dtype)
        return self.k.to(dtype), self.v.to(dtype)

    def attended_length(self) -> int:
        if self.committed:
            return len(self.storage)
        return 0 if self.k is None else self.k.shape[-2]

    # -- attending by itself (subclasses set ``attends = True`` and implement :meth:`after_attention`) ---------------
    def past_parts(self) -> list[KVPart]:
        """The kept tokens as attention parts (the store's parts once committed), with their validity."""
        if self.committed:
            return with_validity(self.storage.parts(), self.valid)
        if self.k is None or not self.k.shape[2]:
            return []
        return [KVPart.dense(self.k, self.v, self.valid)]

    def probs_wanted(self, q: int) -> int:
        """How many of the step's last queries' attention probabilities :meth:`after_attention` needs (0: none)."""
        return 0

    def after_attention(self, probs: torch.Tensor | None, q: int) -> None:
        """Evict after the step's tokens were appended; ``probs (b, kv_heads, group, probs_wanted, kept)`` fp32 over
        the stored tokens in order (the new ones last), or None."""

    def attend_step(self, query, keys, values, new_valid, scaling):
        dt = self.geometry.storage_dtype
        nv = None if new_valid is None else new_valid[:, None, :]
        new = KVPart.dense(keys.to(dt), values.to(dt), nv, causal=True)
        result = attend_parts(query, [*self.past_parts(), new], scaling, probs_last=self.probs_wanted(keys.shape[2]))
        self.append(keys, values, new_valid, read_back=False)
        self.after_attention(result.probs, keys.shape[2])
        return result.output, result.transient_bytes

    def selection_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores (b, kv_heads, kept)`` with padding made the first to go (-inf)."""
        if self.valid is None:
            return scores
        return scores.masked_fill(~self.valid, float("-inf"))

    def held_tensors(self) -> list[torch.Tensor | None]:
        held = [self.k, self.v, self.valid, self.positions, *self.token_state.values()]
        if self.storage is not None:
            held += self.storage.held_tensors()
        return held


def check_pool(pool: str, kernel: int, method: str) -> None:
    """Validate pooling options (config ``__post_init__`` helper)."""
    if pool not in POOLS:
        raise KVCompressError(f"{method}: pool={pool!r} is not one of {list(POOLS)}")
    check_positive_int(kernel, "kernel", method)
    if kernel % 2 == 0:
        raise KVCompressError(f"{method}: kernel={kernel} must be odd (centred pooling)")


__all__ = [
    "EvictionLayer",
    "StorageOptions",
    "check_pool",
    "pool_scores",
    "pool_window_scores",
    "received_attention",
    "topk_keep",
    "window_scores",
]

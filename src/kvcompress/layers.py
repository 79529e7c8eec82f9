"""Cache layers: :class:`KVLayer` (the base every method's layer extends: transformers' layer contract, the
self-attending contract, accounting) and the plain layers :class:`FullLayer`, :class:`StorageLayer`,
:class:`SlidingWindowLayer`.

Every layer keeps its compressed state in plain tensors and reports ``nbytes()`` as the sum of
``numel * element_size`` of exactly those tensors. ``reference_nbytes()`` is what an fp16 full cache of the
same tokens would hold: ``batch * tokens * kv_heads * head_dim * 2 (K and V) * 2 bytes``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention import KVPart, attend_parts, grow_validity, with_validity
from .attention.interface import LAYER_MARK
from .geometry import ModelGeometry
from .registry import KVCompressError

FP16_BYTES = 2


def _query_length(query_length_or_cache_position) -> int:
    """transformers >= 5.3 passes the query length; 5.2 passes the cache_position tensor."""
    if isinstance(query_length_or_cache_position, torch.Tensor):
        return int(query_length_or_cache_position.shape[0])
    return int(query_length_or_cache_position)


def tensors_nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVLayer(CacheLayerMixin):
    """Base of every kvcompress layer.

    The contract (#15): :meth:`update` (transformers' Cache API) only hands the step's new ``(batch, kv_heads, q,
    head_dim)`` keys/values over; a layer with ``attends`` then computes the step's attention itself in
    :meth:`attend_step` over what it stores (its parts, merged by log-sum-exp) plus the new tokens, and updates its
    compressed state after. A layer without ``attends`` implements :meth:`dense_step` instead (update the state and
    return the dense K/V transformers attends over: ``full``, and the self-attending layers' dense reference in tests).
    :meth:`held_tensors` lists every tensor kept between steps (what :meth:`nbytes` counts).

    Lengths: ``tokens_seen`` (tokens this layer was given, = ``get_seq_length()``, so that RoPE positions stay right
    after eviction); :meth:`attended_length` (past tokens the next step attends over, per head);
    :meth:`reference_tokens` (tokens an fp16 full cache of this layer would hold now: the ratio's reference).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    #: True: the layer computes its own attention over its stored parts (:meth:`attend_step`); False: it returns
    #: dense K/V from :meth:`dense_step` and transformers attends
    attends = False

    def __init__(self, geometry: ModelGeometry, layer_idx: int):
        super().__init__()
        self.geometry = geometry
        self.layer_idx = layer_idx
        self.tokens_seen = 0  # logical tokens seen
        self.batch_size = 0
        self.peak_transient_bytes = 0  # largest dequantized copy handed to attention
        self._pending = None  # the step's new K/V between update() and attend() (layers with ``attends``)
        self._rows: list[KVLayer] | None = None  # per-row layers of a padded batch (split_rows_on_padding)
        #: a single-row layer of a padded batch: ``(batch row, indices of the step's real tokens)`` it serves in the
        #: current step (set by the batch's layer before each step; for state the forward carries per batch row)
        self.row_view: tuple[int, torch.Tensor] | None = None

    # -- transformers contract -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise KVCompressError(
                f"batch size changed from {self.batch_size} to {key_states.shape[0]} inside one cache; "
                "make a new cache per batch"
            )
        if self.attends:
            return self._hand_to_attention(key_states, value_states)
        keys, values = self.dense_step(key_states, value_states)
        self.tokens_seen += key_states.shape[-2]
        self.peak_transient_bytes = max(self.peak_transient_bytes, self._transient_bytes(keys, values))
        return keys, values

    def _transient_bytes(self, *tensors: torch.Tensor) -> int:
        """Bytes of ``tensors`` that are not held by the layer (copies made for attention)."""
        held = {t.data_ptr() for t in self.held_tensors() if t is not None and t.numel()}
        return sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in held)

    # -- layers that attend by themselves (attends = True) ------------------------------------------------------------
    def _hand_to_attention(self, key_states, value_states):
        """Keep the step's new ``(b, kv_heads, q, d)`` K/V until :meth:`attend`, and mark them so that kvcompress's
        attention function (:mod:`kvcompress.attention.interface`) calls :meth:`attend` of this layer."""
        if self._pending is not None:
            raise KVCompressError(
                f"layer {self.layer_idx}: the previous step's attention did not go through kvcompress (the model's "
                "attention implementation was changed after make_cache?); make a new cache"
            )
        self._pending = (key_states, value_states)
        setattr(key_states, LAYER_MARK, self)
        return key_states, value_states

    def attend(self, query, keys, values, padding, scaling: float) -> torch.Tensor:
        """Called by the attention function: ``query (b, heads, q, d)``, the marked new ``keys``/``values``
        ``(b, kv_heads, q, d)``, ``padding``: the forward's 2-D mask ``(b, tokens)`` bool or None. Updates the
        compressed state and returns the attention output ``(b, q, heads, d)``."""
        if self._pending is None or self._pending[0] is not keys:
            raise KVCompressError(f"layer {self.layer_idx}: attention was asked for keys this layer did not hand out")
        self._pending = None
        q = keys.shape[2]
        new_valid = None
        if padding is not None:
            new_valid = padding[:, -q:].to(device=keys.device, dtype=torch.bool)
            if bool(new_valid.all()):
                new_valid = None
        if self.split_rows_on_padding and (new_valid is not None or self._rows is not None):
            output, transient = self._attend_rows(query, keys, values, new_valid, scaling)
        else:
            output, transient = self.attend_step(query, keys, values, new_valid, scaling)
        self.peak_transient_bytes = max(self.peak_transient_bytes, transient)
        self.tokens_seen += q
        return output

    def attend_step(self, query, keys, values, new_valid, scaling):
        """Attend over the stored parts plus the new tokens, then update the state; ``new_valid (b, q)`` bool or
        None (no padding). Returns ``(output (b, q, heads, d), transient bytes)``. Layers with ``attends``.

        Default (layers that implement :meth:`dense_step`): attend over the dense ``[past | new]`` that :meth:`dense_step` returns
        (the new tokens causal, their padding masked)."""
        q = keys.shape[2]
        k, v = self.dense_step(keys, values)
        past = k.shape[2] - q
        parts = [KVPart.dense(k[:, :, :past], v[:, :, :past])] if past else []
        nv = None if new_valid is None else new_valid[:, None, :]
        parts.append(KVPart.dense(k[:, :, past:], v[:, :, past:], nv, causal=True))
        result = attend_parts(query, parts, scaling)
        return result.output, max(self._transient_bytes(k, v), result.transient_bytes)

    # -- padded batches, one row at a time (split_rows_on_padding) ---------------------------------------------------
    #: a layer whose state cannot mask padding (quantization groups, flush schedules) sets this: once a padded batch
    #: is seen it keeps one single-row layer per row (:meth:`new_row_layer`), fed only that row's real tokens, so a
    #: row holds and computes exactly what it would alone
    split_rows_on_padding = False

    def new_row_layer(self) -> "KVLayer":
        """A fresh layer of the same kind and config for one batch row (layers with ``split_rows_on_padding``)."""
        raise NotImplementedError

    def _attend_rows(self, query, keys, values, new_valid, scaling):
        b, q = keys.shape[0], keys.shape[2]
        if self._rows is None:
            if self.tokens_seen:
                raise KVCompressError(
                    f"layer {self.layer_idx}: padding appeared after the first step; pad the prompt (left) only"
                )
            self._rows = [self.new_row_layer() for _ in range(b)]
        valid = torch.ones(b, q, dtype=torch.bool, device=keys.device) if new_valid is None else new_valid
        output = query.new_zeros(b, q, query.shape[1], query.shape[3])
        transient = 0
        for r, row in enumerate(self._rows):
            idx = valid[r].nonzero().squeeze(-1)
            if not idx.numel():
                continue
            k, v = keys[r : r + 1, :, idx], values[r : r + 1, :, idx]
            if not row.is_initialized:
                row.lazy_initialization(k, v)
            row.row_view = (r, idx)  # this step's real tokens of the row (read inside the step only)
            try:
                out, t = row.attend_step(query[r : r + 1, :, idx], k, v, None, scaling)
            finally:
                row.row_view = None
            row.tokens_seen += idx.numel()
            output[r, idx] = out[0]
            transient += t
        return output, transient

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask: the kept past + the new tokens, offset by the tokens
        not kept (evicted, merged away or slid out of a window). Accepts 5.2's cache_position tensor too."""
        query_length = _query_length(query_length)
        if query_length == 0:
            raise KVCompressError(
                f"this cache already holds {self.tokens_seen} tokens and the forward brings no new one: a cache serves one "
                "sequence (batch); pass only the new tokens, or make a new cache with make_cache() per generate call"
            )
        if self.attends:  # the mask only carries the new tokens' padding; the layer masks its own past
            return query_length, self.tokens_seen
        kept = self.attended_length()
        return kept + query_length, max(self.tokens_seen - kept, 0)

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.3 name of get_max_length
        return self.get_max_length()

    def reset(self) -> None:
        raise KVCompressError("a kvcompress cache cannot be reset; make a new one with make_cache()")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise KVCompressError("beam search is not supported by kvcompress caches (use greedy or sampling)")

    def crop(self, tokens_to_remove: int) -> None:
        raise KVCompressError("kvcompress caches cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise KVCompressError("kvcompress caches cannot be expanded along the batch (num_return_sequences > 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise KVCompressError("kvcompress caches cannot select batch rows")

    # -- what subclasses implement ---------------------------------------------------------------------------------
    def dense_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def held_tensors(self) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def attended_length(self) -> int:
        """Past tokens (per head) returned to attention at the next step."""
        return self.tokens_seen

    def reference_tokens(self) -> int:
        """Tokens an fp16 full cache of this layer would hold now (the reference)."""
        return self.tokens_seen

    # -- accounting --------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        if self._rows is not None:  # the rows' state, and what the layer itself still holds (e.g. its codebooks)
            return sum(row.nbytes() for row in self._rows) + tensors_nbytes(self.held_tensors())
        return tensors_nbytes(self.held_tensors())

    def reference_nbytes(self) -> int:
        g = self.geometry
        return self.batch_size * self.reference_tokens() * g.num_kv_heads * g.head_dim * 2 * FP16_BYTES


class FullLayer(KVLayer):
    """Keeps every token's K/V as they are (optionally cast to a 2-byte float for storage)."""

    def __init__(self, geometry: ModelGeometry, layer_idx: int, dtype: torch.dtype | None = None):
        super().__init__(geometry, layer_idx)
        self.store_dtype = dtype  # None = the model's own dtype (exactly DynamicCache)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def dense_step(self, key_states, value_states):
        dt = self.store_dtype or key_states.dtype
        k, v = key_states.to(dt), value_states.to(dt)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return self.k.to(key_states.dtype), self.v.to(value_states.dtype)

    def held_tensors(self):
        return [self.k, self.v]


class StorageLayer(KVLayer):
    """A full-attention layer whose past K/V live in a ``TokenStorage`` (kivi codes, fp16, ...). With ``attends`` (set by
    a subclass) it attends over the store's parts chunk by chunk (:meth:`attend_step`); otherwise attention sees
    the store's read-back of the past plus the new tokens rounded to the store's 2-byte dtype."""

    def __init__(self, geometry: ModelGeometry, layer_idx: int, kv_store):
        super().__init__(geometry, layer_idx)
        self.kv = kv_store
        self.valid: torch.Tensor | None = None  # (batch, 1, stored) bool once padding was seen; None = all real

    def dense_step(self, key_states, value_states):
        """``(b, h, q, d)`` new K/V -> ``(b, h, seen + q, d)``: read-back past | new tokens at 2-byte precision."""
        dt, sd = key_states.dtype, self.kv.dtype
        new_k, new_v = key_states.to(sd).to(dt), value_states.to(sd).to(dt)
        if len(self.kv):
            past_k, past_v = self.kv.read(dt)
            new_k, new_v = torch.cat([past_k, new_k], dim=2), torch.cat([past_v, new_v], dim=2)
        self.kv.append(key_states, value_states)
        return new_k, new_v

    def attend_step(self, query, keys, values, new_valid, scaling):
        """A one-token step without padding by the store's own fast path where it has one
        (:meth:`kvcompress.storage.TokenStorage.attend_one_token`: KIVI's one kernel call); otherwise over the
        store's parts and the new tokens, padding masked, then the new tokens appended."""
        if keys.shape[2] == 1 and new_valid is None and self.valid is None:
            step = self.kv.attend_one_token(query, keys, values, scaling)
            if step is not None:
                return step
        sd = self.kv.dtype
        nv = None if new_valid is None else new_valid[:, None, :]
        parts = with_validity(self.kv.parts(), self.valid)
        result = attend_parts(query, [*parts, KVPart.dense(keys.to(sd), values.to(sd), nv, causal=True)], scaling)
        self.valid = grow_validity(self.valid, new_valid, len(self.kv), keys, 1)
        self.kv.append(keys, values)
        return result.output, result.transient_bytes

    def held_tensors(self):
        return [*self.kv.held_tensors(), self.valid]


class SlidingWindowLayer(FullLayer):
    """A sliding-window attention layer (Gemma-3 style): holds the last ``window - 1`` tokens, like
    transformers' ``DynamicSlidingWindowLayer``. Its reference is the same window, so it adds no ratio."""

    is_sliding = True

    def __init__(self, geometry: ModelGeometry, layer_idx: int, dtype: torch.dtype | None = None):
        super().__init__(geometry, layer_idx, dtype)
        self.window = geometry.sliding_window

    def dense_step(self, key_states, value_states):
        dt = self.store_dtype or key_states.dtype
        full_k = torch.cat([self.k, key_states.to(dt)], dim=-2) if self.k is not None else key_states.to(dt)
        full_v = torch.cat([self.v, value_states.to(dt)], dim=-2) if self.v is not None else value_states.to(dt)
        self.k = full_k[:, :, -self.window + 1 :, :].clone()
        self.v = full_v[:, :, -self.window + 1 :, :].clone()
        return full_k.to(key_states.dtype), full_v.to(value_states.dtype)

    def attended_length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def get_max_length(self) -> int:
        return self.window

    def reference_tokens(self) -> int:
        return min(self.tokens_seen, self.window - 1)

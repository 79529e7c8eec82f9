"""``kivi``: tuning-free asymmetric low-bit KV quantization (Liu et al., ICML 2024).

* Keys are quantized **per channel**: min/max statistics along tokens, in groups of ``group_size`` (G)
  consecutive tokens, one (scale, zero) pair per group and channel.
* Values are quantized **per token**: statistics along head_dim, in groups of G channels. When head_dim is not
  divisible by G, the value group is the largest divisor of head_dim that is <= G (G >= head_dim: the whole
  head_dim is one group).
* The most recent tokens stay in a full-precision residual (2-byte floats, ``geometry.storage_dtype``):
  keys leave it in blocks of ``residual`` (R, R % G == 0) -- when the key residual reaches R tokens the whole
  block is quantized -- so 0 <= key residual < R after every append; values leave it one token at a time, the
  oldest fp value being quantized as soon as more than R are held, so the value residual is min(tokens, R).
  Prefill follows the same rule (all complete R-blocks of keys, all but the last R values).
* Quantized chunks are appended to concatenated packed tensors (codes packed densely along head_dim, fp16
  scale + fp16 zero) and are never re-quantized. ``read()`` dequantizes a transient copy.

Attention sees ``[dequantized past | the step's new tokens at 2-byte precision]`` -- like the paper, where the
prompt attends to itself in full precision and a decode token attends to its own fp16 key/value.
Sliding-window layers (Gemma-3) are held the same way (:class:`KiviSlidingLayer`): tokens that left the window are
dropped from the front by whole key groups, never re-quantizing what stays; their reference is the window
(``quantize_sliding=False``: the plain fp16 window, no gain, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import Method, StorageLayer
from ..config import check_bits, check_positive_int
from ..quant import UniformQuantized, quantize_uniform
from ..registry import KVCompressError, register
from ..storage import GrowingTokens, TokenStorage, register_storage
from .. import kernels
from ..attention import KVPart, attend_parts, chunk_tokens, grow_validity, sliding_view, with_validity

#: code widths accepted for keys and values (the paper's 2 and 4; 8 as a near-lossless check)
SUPPORTED_BITS = (2, 4, 8)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


def check_kivi_options(bits, group_size, residual, key_bits=None, value_bits=None, who: str = "kivi") -> None:
    """Raise KVCompressError for an unsupported bit width or a residual that is not a multiple of the group."""
    check_bits(bits, SUPPORTED_BITS, who)
    if key_bits is not None:
        check_bits(key_bits, SUPPORTED_BITS, who, "key_bits")
    if value_bits is not None:
        check_bits(value_bits, SUPPORTED_BITS, who, "value_bits")
    check_positive_int(group_size, "group_size", who)
    check_positive_int(residual, "residual", who)
    if residual % group_size:
        raise KVCompressError(
            f"{who}: residual={residual} must be a multiple of group_size={group_size} "
            "(keys leave the residual in blocks of `residual` tokens, quantized in groups of `group_size` tokens)"
        )


def value_group_size(head_dim: int, group_size: int) -> int:
    """Group along head_dim for values: the largest divisor of ``head_dim`` that is <= ``group_size``."""
    g = min(group_size, head_dim)
    while head_dim % g:
        g -= 1
    return g


@dataclass(frozen=True)
class KiviConfig:
    bits: int = 2  # code width for keys and values: 2 (paper), 4 or 8
    group_size: int = 32  # G: tokens per key group, channels per value group (paper: 32)
    residual: int = 128  # R: most recent tokens kept at 2-byte precision; multiple of G (paper: 128)
    key_bits: int | None = None  # overrides `bits` for keys
    value_bits: int | None = None  # overrides `bits` for values
    quantize_sliding: bool = True  # sliding-window layers held as KIVI codes too (False: their plain fp16 window)

    def __post_init__(self):
        check_kivi_options(self.bits, self.group_size, self.residual, self.key_bits, self.value_bits)
        if not isinstance(self.quantize_sliding, bool):
            raise KVCompressError(f"kivi: quantize_sliding must be True or False, got {self.quantize_sliding!r}")


# --------------------------------------------------------------------------------------------------------------------
# Storage: quantized past + full-precision residual
# --------------------------------------------------------------------------------------------------------------------


#: a quantized stream grows its buffers by at least this many tokens (and by 1/32 of its length; the spare is counted)
GROW_TOKENS = 16


class _Quantized:
    """Quantized tokens appended in chunks: packed codes ``(b, h, n, ceil(d*bits/8))`` uint8 and fp16 stats
    ``(b, h, n // G, d)`` (keys, per channel) or ``(b, h, n, d // Gv)`` (values, per token), each grown in place
    (:class:`kvcompress.storage.GrowingTokens`: a decode step copies O(1) tokens amortized, not the past)."""

    def __init__(self, bits: int, axis: int, group: int):
        self.bits, self.axis, self.group = bits, axis, group
        stats_grow = max(1, GROW_TOKENS // group) if axis == 2 else GROW_TOKENS  # key stats: a row per token group
        self.codes = GrowingTokens(GROW_TOKENS)
        self.scales, self.zeros = GrowingTokens(stats_grow), GrowingTokens(stats_grow)
        self._length = 0
        #: a :class:`_DeferredQuantization` shared by the layers of one cache (None: :meth:`defer` quantizes at once)
        self.queue: _DeferredQuantization | None = None
        self._queued = False  # tokens of this stream wait in ``queue``: any access settles the queue first

    def _settle(self) -> None:
        if self._queued:
            self.queue.settle()

    @property
    def length(self) -> int:
        self._settle()
        return self._length

    @property
    def packed(self) -> torch.Tensor | None:
        self._settle()
        return self.codes.view()

    @property
    def scale(self) -> torch.Tensor | None:
        self._settle()
        return self.scales.view()

    @property
    def zero(self) -> torch.Tensor | None:
        self._settle()
        return self.zeros.view()

    def add(self, x: torch.Tensor) -> None:
        """Quantize ``x: (b, h, n, d)`` once and append it."""
        self._settle()
        self._append(quantize_uniform(x, self.bits, axis=self.axis, group_size=self.group))

    def _append(self, q: UniformQuantized) -> None:
        self.codes.append(q.packed)
        self.scales.append(q.scale)
        self.zeros.append(q.zero)
        self._length += q.shape[2]

    def defer(self, x: torch.Tensor) -> None:
        """:meth:`add` ``x``, or (with a ``queue``) leave it in the queue, quantized with the other layers' tokens of
        the step at the first access to any of them (same codes: per-token groups never mix tokens or batch rows)."""
        if self.queue is None or self.axis != 3:
            self.add(x)
            return
        self._settle()
        self.queue.pending.append((self, x, (torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
        self._queued = True

    def read(self, shape_bhd: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """Dequantized ``(b, h, n, d)`` transient copy (None when empty)."""
        if not self.length:
            return None
        b, h, d = shape_bhd
        q = UniformQuantized(self.packed, self.scale, self.zero, self.bits, (b, h, self.length, d), self.axis,
                             self.group)
        return q.dequantize(dtype)

    def read_range(self, start: int, stop: int, shape_bhd: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """Dequantized tokens ``[start, stop)``: ``(b, h, stop - start, d)``; for per-channel keys ``start`` is a
        multiple of the group and ``stop`` a multiple of it or the end."""
        b, h, d = shape_bhd
        if self.axis == 2:
            g0, g1 = start // self.group, -(-stop // self.group)
            scale, zero = self.scale[:, :, g0:g1], self.zero[:, :, g0:g1]
        else:
            scale, zero = self.scale[:, :, start:stop], self.zero[:, :, start:stop]
        q = UniformQuantized(self.packed[:, :, start:stop], scale, zero, self.bits, (b, h, stop - start, d), self.axis,
                             self.group)
        return q.dequantize(dtype)

    def arrays(self):
        """The held buffers as the numba kernel reads them (:func:`kvcompress.kernels.kivi_decode`): ``(codes (b, h,
        capacity, bytes) uint8, scale bits, zero bits (b, h, *) uint16)`` numpy views made once per buffer (a grown
        buffer gets new ones; nothing is copied), None when no token is quantized yet."""
        self._settle()
        if not self._length:
            return None
        return self.codes.array(), self.scales.bits_array(), self.zeros.bits_array()

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` oldest tokens (per-channel keys: ``n`` a multiple of the group); what stays keeps its codes
        (moved once, so the dropped bytes are really freed)."""
        n = min(n, self.length)
        stats = n // self.group if self.axis == 2 else n
        self.codes.drop_front(n)
        self.scales.drop_front(stats)
        self.zeros.drop_front(stats)
        self._length -= n

    def limit_capacity(self, tokens: int) -> None:
        """Never grow the buffers past ``tokens`` tokens (unless one append needs more; 0: always exact-sized)."""
        self._settle()
        self.codes.limit = tokens
        self.scales.limit = self.zeros.limit = -(-tokens // self.group) if self.axis == 2 else tokens

    def spare_nbytes(self) -> int:
        """Bytes of the buffers' spare capacity (held, counted in :meth:`tensors`, not yet filled)."""
        self._settle()
        return sum(g.spare_nbytes() for g in (self.codes, self.scales, self.zeros))

    def tensors(self) -> list[torch.Tensor | None]:
        """The held buffers, spare capacity included."""
        self._settle()
        return [*self.codes.tensors(), *self.scales.tensors(), *self.zeros.tensors()]


class _DeferredQuantization:
    """Per-token value quantization of one decode step, batched over the layers of a cache: in a decode step every
    KIVI layer hands one value token out of its residual; quantizing one ``(b, h, 1, d)`` token costs ~30 small torch
    ops (~0.1 ms), the same as quantizing all layers' tokens at once. Each layer hands its token here
    (:meth:`_Quantized.defer`); the first access to any deferred stream (the next step's attention, ``nbytes()``, a
    read) settles all of them with one :func:`quantize_uniform` over the tokens stacked along the batch axis, then
    appends each layer's slice (tokens of another shape, bit width or mode form their own batch). Codes, scales and
    zeros are those of separate calls (statistics are per token and group), so nothing observable changes. The
    settling runs in the inference / grad mode the tokens were deferred in (a forward under ``torch.inference_mode()``
    holds inference tensors, which only that mode may update in place). One queue per cache (a cache is driven by
    one thread)."""

    def __init__(self):
        self.pending: list[tuple[_Quantized, torch.Tensor, tuple[bool, bool]]] = []

    def settle(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        batches: dict[tuple, list[tuple[_Quantized, torch.Tensor]]] = {}
        for stream, x, mode in pending:  # one stream has at most one token waiting (defer settles first)
            stream._queued = False
            key = (stream.bits, stream.group, tuple(x.shape[1:]), x.dtype, x.device, mode)
            batches.setdefault(key, []).append((stream, x))
        for (bits, group, *_, (inference, grad)), members in batches.items():
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                if len(members) == 1:
                    members[0][0].add(members[0][1])
                    continue
                stacked = torch.cat([x for _, x in members], dim=0)
                q = quantize_uniform(stacked, bits, axis=3, group_size=group)
                row = 0
                for stream, x in members:
                    b = x.shape[0]
                    stream._append(UniformQuantized(q.packed[row : row + b], q.scale[row : row + b],
                                                    q.zero[row : row + b], q.bits, tuple(x.shape), q.axis,
                                                    q.group_size))
                    row += b


def value_queue() -> _DeferredQuantization:
    """A new queue for :func:`share_value_queue` (one per cache)."""
    return _DeferredQuantization()


def share_value_queue(store: TokenStorage, queue: _DeferredQuantization) -> TokenStorage:
    """Let a :class:`KiviStore`'s value tokens wait in ``queue`` (shared by the stores of one cache) and be quantized
    with the other stores' at the next access (:class:`_DeferredQuantization`: the same codes). Other stores are left
    as they are. Returns ``store``."""
    if isinstance(store, KiviStore):
        store.vq.queue = queue
    return store


@register_storage("kivi")
class KiviStore(TokenStorage):
    """KIVI storage of an append-only token sequence: ``make_storage("kivi", geometry, bits=4, group_size=32,
    residual=128)`` (also ``key_bits``, ``value_bits``). Append ``(batch, kv_heads, n, head_dim)`` keys/values;
    ``read()`` returns ``[dequantized | residual]`` in token order."""

    def __init__(self, geometry, bits: int = 2, group_size: int = 32, residual: int = 128,
                 key_bits: int | None = None, value_bits: int | None = None, **unknown):
        if unknown:
            raise KVCompressError(f"kivi storage: unknown option(s) {sorted(unknown)}; its options are "
                                  "bits, group_size, residual, key_bits, value_bits")
        check_kivi_options(bits, group_size, residual, key_bits, value_bits, who="kivi storage")
        self.dtype = geometry.storage_dtype
        self.head_dim = geometry.head_dim
        self.residual = residual
        self.group_size = group_size
        self.value_group = value_group_size(geometry.head_dim, group_size)
        self.kq = _Quantized(key_bits or bits, axis=2, group=group_size)  # per channel, groups of G tokens
        self.vq = _Quantized(value_bits or bits, axis=3, group=self.value_group)  # per token
        self.k_res: torch.Tensor | None = None  # (b, h, r_k, d), 0 <= r_k < R
        self.v_res: torch.Tensor | None = None  # (b, h, r_v, d), r_v = min(len, R)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.shape != values.shape or keys.dim() != 4 or keys.shape[-1] != self.head_dim:
            raise KVCompressError(f"kivi storage: keys {tuple(keys.shape)} / values {tuple(values.shape)} are not "
                                  f"matching (batch, kv_heads, n, {self.head_dim}) tensors")
        if keys.shape[2] == 0:
            return
        self.stage(keys, values)
        # a decode step's value token waits for the step's others where a queue is shared (a prompt's are quantized
        # at once: deferred, their 2-byte copy would be held, uncounted, until the next access)
        self.flush(defer=keys.shape[2] == 1)

    def stage(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """First half of :meth:`append`: the new tokens join the 2-byte residuals (nothing is quantized yet), so that
        one fused kernel call can attend over ``[codes | residual | new tokens]``; :meth:`flush` must follow before
        the next step. ``append = stage + flush``."""
        k, v = keys.to(self.dtype), values.to(self.dtype)
        self.k_res = k if self.k_res is None else torch.cat([self.k_res, k], dim=2)
        self.v_res = v if self.v_res is None else torch.cat([self.v_res, v], dim=2)

    def flush(self, defer: bool = False) -> None:
        """Second half of :meth:`append`: complete R-blocks of keys and the values beyond the R most recent leave the
        residual, quantized once (``defer``: the values through :meth:`_Quantized.defer`)."""
        n_k = (self.k_res.shape[2] // self.residual) * self.residual  # complete R-blocks of keys
        if n_k:
            self.kq.add(self.k_res[:, :, :n_k])
            self.k_res = self.k_res[:, :, n_k:].clone()
        n_v = self.v_res.shape[2] - self.residual  # values beyond the R most recent
        if n_v > 0:
            (self.vq.defer if defer else self.vq.add)(self.v_res[:, :, :n_v])
            self.v_res = self.v_res[:, :, n_v:].clone()

    def droppable(self, n: int) -> int:
        """How many of the ``n`` oldest tokens :meth:`drop_front` can forget now: whole key groups of quantized keys."""
        n = min(n, self.kq.length)
        return n - n % self.group_size

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` oldest tokens (a sliding window): ``n`` from :meth:`droppable`. Keys leave by whole groups
        of quantized keys, values by tokens (quantized first, then the residual); nothing that stays is re-quantized."""
        if n != self.droppable(n):
            raise KVCompressError(f"kivi storage: cannot drop {n} tokens (whole groups of {self.group_size} quantized "
                                  f"keys only; {self.kq.length} quantized)")
        if not n:
            return
        self.kq.drop_front(n)
        from_codes = min(n, self.vq.length)
        if from_codes:
            self.vq.drop_front(from_codes)
        if n > from_codes:
            self.v_res = self.v_res[:, :, n - from_codes :].clone()

    def read(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, kv_heads, len, head_dim)`` keys and values in token order (transient copies)."""
        if self.k_res is None:
            raise KVCompressError("kivi storage is empty: append tokens before reading")
        b, h, _, d = self.k_res.shape
        kq, vq = self.kq.read((b, h, d), dtype), self.vq.read((b, h, d), dtype)
        k = self.k_res.to(dtype) if kq is None else torch.cat([kq, self.k_res.to(dtype)], dim=2)
        v = self.v_res.to(dtype) if vq is None else torch.cat([vq, self.v_res.to(dtype)], dim=2)
        return k, v

    def held_tensors(self) -> list[torch.Tensor | None]:
        return [*self.kq.tensors(), self.k_res, *self.vq.tensors(), self.v_res]

    def spare_nbytes(self) -> int:
        """Bytes held as spare capacity of the code buffers (part of :meth:`nbytes`): at most ~1/32 of the codes."""
        return self.kq.spare_nbytes() + self.vq.spare_nbytes()

    def read_range(self, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[start, stop)`` dequantized: ``(batch, kv_heads, stop - start, head_dim)`` keys and values."""
        b, h, _, d = self.k_res.shape

        def one(quant: _Quantized, res: torch.Tensor) -> torch.Tensor:
            n_q = quant.length
            pieces = []
            if start < n_q:
                pieces.append(quant.read_range(start, min(stop, n_q), (b, h, d), dtype))
            if stop > n_q:
                pieces.append(res[:, :, max(start - n_q, 0) : stop - n_q].to(dtype))
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

        return one(self.kq, self.k_res), one(self.vq, self.v_res)

    def fused(self) -> bool:
        """Whether :meth:`parts` gives the fused part: once some values are quantized (before that the store holds
        only 2-byte tokens, attended as before) and a kernel applies (:func:`kvcompress.kernels.kivi_fused_applies`:
        switched on, numba for CPU tensors or triton for CUDA tensors, on the CPU value groups that never split a byte
        of codes)."""
        return bool(self.vq.length) and kernels.kivi_fused_applies(self.k_res.device, self.kq.bits, self.vq.bits,
                                                                   self.head_dim, self.value_group)

    def attention_path(self) -> str:
        """How :meth:`parts` is attended now: ``"fused-numba"``/``"fused-triton"`` (:meth:`fused`), ``"chunked"``
        (codes dequantized a chunk at a time), ``"dense"`` (no codes yet: only the 2-byte residual)."""
        if not self.vq.length:
            return "dense"
        return f"fused-{kernels.backend(self.vq.packed.device)}" if self.fused() else "chunked"

    def parts(self, fused: bool | None = None):
        """The stored tokens as attention parts. With :meth:`fused`, one ``kind="kivi-fused"`` part whose ``fused``
        kernel attends straight from the codes and the residual in one pass (keys and values leave the residual at
        different times; the kernel takes each from where it is; ``fused(qg, valid, mult=None)`` also takes per-token
        key / value multipliers ``(b, kv_heads, 2, n)``, see :func:`kvcompress.kernels.kivi_attention`); its ``read``
        still serves callers that ask for probabilities. Otherwise one ``kind="kivi"`` part read chunk by chunk.
        Chunks fall on key-group edges. ``fused``: what :meth:`fused` says now, when the caller just asked it (None:
        ask)."""
        if not len(self):
            return []
        chunk = chunk_tokens(self.group_size)
        if not (self.fused() if fused is None else fused):
            return [KVPart(len(self), self.read_range, kind="kivi", chunk_tokens=chunk)]
        n, kq, vq = len(self), self.kq, self.vq
        # the tensors as of now: a later append makes new ones (or writes past n), so the part stays consistent
        k_codes, v_codes = (kq.packed, kq.scale, kq.zero), (vq.packed, vq.scale, vq.zero)
        k_res, v_res = self.k_res, self.v_res

        def fused(qg, valid, mult=None):  # mult: per-token key / value multipliers (MiniCache's merged directions)
            if qg.shape[2] > kernels.MAX_FUSED_ROWS:  # a long prefill chunk: BLAS on dequantized chunks is faster
                return kernels.chunked_partials(qg, self.read_range, n, chunk, valid, mult)
            return kernels.kivi_attention(qg, n, *k_codes, kq.bits, kq.group, *v_codes, vq.bits, vq.group, valid,
                                          k_tail=k_res, v_tail=v_res, mult=mult)

        return [KVPart(n, self.read_range, kind="kivi-fused", chunk_tokens=chunk, fused=fused, kv_heads=k_res.shape[1])]

    def attend_one_token(self, query, keys, values, scaling):
        """A one-token step over a fused store (:meth:`kvcompress.storage.TokenStorage.attend_one_token`): the new token
        joins the residual first (:meth:`stage`), so one kernel call covers ``[codes | residual | new token]`` (the
        token the query sees as itself is the 2-byte value that ends the residual, exactly the last part of the
        general path), then the residual is flushed (its value token deferred to the queue, if any). None where the
        store is not fused (no kernel, or no value quantized yet)."""
        if not self.fused():
            return None
        self.stage(keys, values)
        if kernels.backend(keys.device) == "numba":  # one kernel call from the held buffers, no parts to build
            # the kernel decodes the 2-byte residuals (with the new token) into fp32 scratch: the step's transient
            output = self.decode_step(query, scaling)
            transient = (self.k_res.numel() + self.v_res.numel()) * 4
        else:
            result = attend_parts(query, self.parts(fused=True), scaling)
            output, transient = result.output, result.transient_bytes
        self.flush(defer=True)
        return output, transient

    def decode_step(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The attention output ``(b, 1, heads, d)`` of a one-token ``query (b, heads, 1, d)`` over every stored token
        (the step's own token already :meth:`stage` d), by one numba kernel call straight from the held buffers
        (:func:`kvcompress.kernels.kivi_decode`): the fused part of :meth:`parts` without its per-step setup. Only when
        :meth:`fused` and the backend is numba."""
        kq, vq = self.kq, self.vq
        return kernels.kivi_decode(query, scaling, len(self), kq.arrays(), kq.bits, kq.group, vq.arrays(), vq.bits,
                                   vq.group, self.k_res, self.v_res)

    def __len__(self) -> int:
        return 0 if self.k_res is None else self.kq.length + self.k_res.shape[2]

    @property
    def key_residual(self) -> int:
        """Keys currently held at 2-byte precision."""
        return 0 if self.k_res is None else self.k_res.shape[2]

    @property
    def value_residual(self) -> int:
        """Values currently held at 2-byte precision."""
        return 0 if self.v_res is None else self.v_res.shape[2]


# --------------------------------------------------------------------------------------------------------------------
# Layer and registration
# --------------------------------------------------------------------------------------------------------------------


class KiviLayer(StorageLayer):
    """A full-attention layer whose past K/V live in a :class:`KiviStore`; it attends over the quantized past chunk by
    chunk (never the whole dequantized past at once) and masks padding."""

    attends = True
    split_rows_on_padding = True  # key groups and residual flushes are per row: a padded row runs alone

    def __init__(self, geometry, layer_idx: int, config: KiviConfig):
        self.config = config
        super().__init__(geometry, layer_idx, KiviStore(geometry, bits=config.bits, group_size=config.group_size,
                                                        residual=config.residual, key_bits=config.key_bits,
                                                        value_bits=config.value_bits))

    def new_row_layer(self):
        return KiviLayer(self.geometry, self.layer_idx, self.config)


class KiviSlidingLayer(KiviLayer):
    """A sliding-window layer (Gemma-3: each query sees the last ``window`` positions, itself included) held as KIVI
    codes: after each step the tokens no later query can see leave from the front by whole key groups, so it holds
    at most ``window - 1 + group_size - 1`` tokens (plus the step's own); nothing that stays is re-quantized. Its
    reference is the window (``window - 1`` tokens), as for a plain sliding layer. Attention masks exactly the window:
    a decode step as a validity of the held keys (the fused kernel applies), a multi-token step per query row."""

    is_sliding = True

    def __init__(self, geometry, layer_idx: int, config: KiviConfig):
        super().__init__(geometry, layer_idx, config)
        self.window = geometry.sliding_window
        # buffers at their exact size, no spare: a step copies at most the window's codes (bounded by the window, not
        # the context), and the bytes held are those of the tokens held (a spare would cost ~6 % of a 512 window)
        self.kv.kq.limit_capacity(0)
        self.kv.vq.limit_capacity(0)

    def new_row_layer(self):
        return KiviSlidingLayer(self.geometry, self.layer_idx, self.config)

    def attend_step(self, query, keys, values, new_valid, scaling):
        sd, q = self.kv.dtype, keys.shape[2]
        held = len(self.kv)
        first = self.tokens_seen - held  # position (cache index) of the first held token
        visible, window = sliding_view(held, self.tokens_seen, self.window, q, keys.shape[0], keys.device)
        valid = self.valid if visible is None else visible if self.valid is None else self.valid & visible
        parts = with_validity(self.kv.parts(), valid)
        nv = None if new_valid is None else new_valid[:, None, :]
        result = attend_parts(query, [*parts, KVPart.dense(keys.to(sd), values.to(sd), nv, causal=True)], scaling,
                              window=window)
        self.valid = grow_validity(self.valid, new_valid, held, keys, 1)
        self.kv.append(keys, values)
        # tokens before position (seen + q) - (window - 1) are out of every later query's window
        drop = self.kv.droppable(max(0, self.tokens_seen + q - (self.window - 1) - first))
        if drop:
            self.kv.drop_front(drop)
            if self.valid is not None:
                self.valid = self.valid[:, :, drop:].clone()
        return result.output, result.transient_bytes

    def attended_length(self) -> int:
        if self._rows is not None:  # a padded batch: each row holds its own window
            return max(row.attended_length() for row in self._rows)
        return len(self.kv)

    def reference_tokens(self) -> int:
        return min(self.tokens_seen, self.window - 1)

    def get_max_length(self) -> int:
        return self.window


@register("kivi")
class Kivi(Method):
    summary = "KIVI: keys per-channel, values per-token asymmetric 2/4/8-bit quantization + fp16 residual of R tokens"
    sliding = "KIVI codes too, tokens leave the window by key groups (quantize_sliding=False: plain fp16 window)"
    attention = "kvcompress: fused kernel over the codes (numba on CPU, Triton on CUDA; chunked without them)"
    Config = KiviConfig
    test_options = {"bits": 2, "group_size": 8, "residual": 16}
    noop_options = {"residual": 1 << 20}  # a residual longer than any prompt keeps every token at 2 bytes

    def build_layers(self, cache):
        layers = super().build_layers(cache)
        queue = value_queue()  # one per cache: the decode step's value tokens quantized in one call
        for layer in layers:
            if type(layer) is KiviLayer:
                share_value_queue(layer.kv, queue)
        return layers

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):
            if self.config.quantize_sliding:
                return KiviSlidingLayer(self.geometry, layer_idx, self.config)
            return self.sliding_layer(layer_idx)
        return KiviLayer(self.geometry, layer_idx, self.config)

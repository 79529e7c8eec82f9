"""``logquant``: LogQuant (Chen et al., 2025, arXiv 2503.19950) — a log-spaced subset of tokens stays in full
precision, every other token is quantized to 2 or 4 bits; nothing is evicted.

Selection (the authors' loop, one rule for prefill and decoding): the full-precision tokens form one run
``[log-sparse list | local window]``. Whenever the local window holds more than ``2W`` tokens, the first ``2W``
tokens of that run (the log-sparse list + the oldest local tokens; the oldest ``2W`` local tokens when the
log-sparse list is still empty) are halved: every other one stays full precision (``W`` tokens, the new
log-sparse list), the other ``W`` are quantized. So at most ``3W`` tokens are full precision and their density
halves every window going back. Position 0 is always kept (the first token of every halved run).

Position-agnostic layout: keys are stored post-RoPE as ``[quantized block | full-precision block]``. A flush
quantizes only the ``W`` tokens leaving full precision and appends their codes to the quantized block; nothing
already quantized is touched again and nothing is scattered back into positional order on read. Attention
gets ``[dequantized block | full-precision block | new tokens]``: one query's softmax attention over a set of
keys does not depend on their order, and for multi-token queries (prefill, chunked input) the new tokens come
last in their true order, so the causal mask transformers builds stays right. The prefill itself attends to
the prompt's own full-precision K/V (as in KIVI); the compressed cache serves the tokens after it.

Sliding-window layers (Gemma-3; :class:`LogQuantSlidingLayer`) run the same selection inside their window: the
window is held as quantized flush blocks (``W`` tokens each, with their positions) plus the full-precision
log-spaced run. A full-precision token that leaves the window is dropped (never quantized); a block is dropped
whole once all its tokens have left; nothing that stays is re-quantized. Attention masks exactly the window.
Their reference is the window (``quantize_sliding=False``: the plain fp16 window, no gain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..cache import KVLayer, Method, ModelGeometry
from ..config import check_bits, check_positive_int
from ..quant import UniformQuantized, quantize_uniform
from ..registry import KVCompressError, register
from ..storage import GrowingTokens
from .. import kernels
from ..attention import KVPart, attend_parts, chunk_tokens, sliding_view

KEY_AXES = ("token", "channel")


@dataclass(frozen=True)
class LogQuantConfig:
    window: int = 42  # W: local window up to 2W + a log-sparse list of W -> at most 3W full-precision tokens (paper: 128/3)
    bits: int = 2  # code width of the quantized tokens: 2 or 4 (the paper's settings)
    key_axis: str = "channel"  # keys: "channel" = per channel over each W-token flush (KIVI-like; measured far better at 2 bits), "token" = per-token groups along head_dim (authors' code)
    group_size: int = 64  # group length along head_dim for per-token quantization (keys with key_axis="token", values); clipped to head_dim
    quantize_sliding: bool = True  # sliding-window layers held as LogQuant too (False: their plain fp16 window)

    def __post_init__(self):
        check_positive_int(self.window, "window", "logquant")
        check_bits(self.bits, (2, 4), "logquant")
        if self.key_axis not in KEY_AXES:
            raise KVCompressError(f"logquant: key_axis={self.key_axis!r} is not one of {list(KEY_AXES)}")
        check_positive_int(self.group_size, "group_size", "logquant")
        if not isinstance(self.quantize_sliding, bool):
            raise KVCompressError(f"logquant: quantize_sliding must be True or False, got {self.quantize_sliding!r}")


# --------------------------------------------------------------------------------------------------------------------
# Selection: the log-sparse merge loop, on plain lists (positions, or row indices of the full-precision block)
# --------------------------------------------------------------------------------------------------------------------


def log_flush(fp: list, n_sparse: int, window: int) -> tuple[list, list, int]:
    """Apply the merge loop to the full-precision run ``fp = [log-sparse (n_sparse) | local]``.

    Returns ``(kept, quantized, n_sparse)``: the new full-precision run, the items leaving full precision in the
    order they are quantized (``W`` per flush, flush after flush), and the new log-sparse length."""
    quantized: list = []
    while len(fp) - n_sparse > 2 * window:
        run = fp[: 2 * window]
        fp = run[0::2] + fp[2 * window :]
        quantized += run[1::2]
        n_sparse = window
    return fp, quantized, n_sparse


def log_schedule(call_lengths: Sequence[int], window: int) -> tuple[list[int], list[int]]:
    """Positions after feeding ``call_lengths`` tokens per forward (e.g. ``[prompt, 1, 1, ...]``).

    Returns ``(full_precision, quantized)``: the full-precision positions in storage order (log-sparse list, then
    the local window) and the quantized positions in storage order. Same for every layer, head and batch row."""
    fp: list[int] = []
    quantized: list[int] = []
    n_sparse, pos = 0, 0
    for n in call_lengths:
        fp += range(pos, pos + n)
        pos += n
        fp, dropped, n_sparse = log_flush(fp, n_sparse, window)
        quantized += dropped
    return fp, quantized


# --------------------------------------------------------------------------------------------------------------------
# Storage layer
# --------------------------------------------------------------------------------------------------------------------


class _QuantBlock:
    """Append-only quantized tokens ``(batch, kv_heads, n, head_dim)``: packed codes ``(b, h, n, d*bits/8)`` uint8 and
    fp16 stats, each one buffer (:class:`kvcompress.storage.GrowingTokens`) held at its exact size: a flush (W tokens,
    every ~W steps) moves the quantized past once into a buffer W tokens longer -- ``n / W`` tokens' codes copied per
    step amortized, no spare capacity held (a growth share of 1/32 would cost ~2 % of the compression ratio in
    decode). One run of codes, so a decode step is one kernel call. ``axis=-1``: per-token groups of ``group`` along
    head_dim (stats ``(b, h, n, d/group)``); ``axis=-2``: per channel over each block of ``group`` consecutive tokens
    (one flush; stats ``(b, h, n/group, d)``), so reads fall on block edges."""

    def __init__(self, bits: int, axis: int, group: int):
        self.bits, self.axis, self.group = bits, axis, group
        self.codes, self.scales, self.zeros = GrowingTokens(1), GrowingTokens(1), GrowingTokens(1)
        for buffer in (self.codes, self.scales, self.zeros):
            buffer.limit = 0  # exact-sized: every flush grows the buffer by its own tokens only
        self.length = 0
        self.bhd: tuple[int, int, int] = (0, 0, 0)

    def append(self, x: torch.Tensor) -> None:
        """Quantize ``x (b, h, m, head_dim)`` (for per-channel: ``m`` a multiple of the block) and append it."""
        q = quantize_uniform(x, self.bits, axis=self.axis, group_size=self.group)
        self.codes.append(q.packed)
        self.scales.append(q.scale)
        self.zeros.append(q.zero)
        self.length += x.shape[-2]
        self.bhd = (x.shape[0], x.shape[1], x.shape[-1])

    def run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(packed, scale, zero)``: views of the held codes and stats (as of now: a later append writes past them or
        grows new buffers)."""
        return self.codes.view(), self.scales.view(), self.zeros.view()

    def arrays(self):
        """The held buffers as the numba kernel reads them (:func:`kvcompress.kernels.kivi_decode`): ``(codes, scale
        bits, zero bits)`` numpy views made once per buffer, None when nothing is quantized."""
        if not self.length:
            return None
        return self.codes.array(), self.scales.bits_array(), self.zeros.bits_array()

    def read_range(self, a: int, z: int, dtype: torch.dtype, run=None) -> torch.Tensor:
        """Tokens ``[a, z)`` (per channel: ``a`` on a block edge), dequantized ``(b, h, z - a, d)``; ``run``: the
        :meth:`run` to read (None: now)."""
        packed, scale, zero = self.run() if run is None else run
        b, h, d = self.bhd
        if self.axis == -2:
            g0, g1 = a // self.group, -(-z // self.group)
            scale, zero = scale[:, :, g0:g1], zero[:, :, g0:g1]
        else:
            scale, zero = scale[:, :, a:z], zero[:, :, a:z]
        q = UniformQuantized(packed[:, :, a:z], scale, zero, self.bits, (b, h, z - a, d), 4 + self.axis, self.group)
        return q.dequantize(dtype)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized copy ``(b, h, n, head_dim)`` of every token (transient)."""
        return self.read_range(0, self.length, dtype)

    def tensors(self) -> list[torch.Tensor | None]:
        return [*self.codes.tensors(), *self.scales.tensors(), *self.zeros.tensors()]


class LogQuantLayer(KVLayer):
    """One attention layer: ``[quantized block | full-precision block]`` for keys (post-RoPE) and values.

    The full-precision block ``(batch, kv_heads, n_fp <= 3W, head_dim)`` in the 2-byte storage dtype is
    ``[log-sparse list (n_sparse) | local window]``; the quantized blocks only ever grow, W tokens per flush.
    Attention (:meth:`attend_step`) reads the quantized run (by the fused kernel, or a chunk at a time), then the
    full-precision block, then the new tokens; :meth:`dense_step` is the same computation as one dense ``[past |
    new]`` copy (a reference)."""

    attends = True
    split_rows_on_padding = True  # quantization blocks and the log schedule are per row: a padded row runs alone

    def __init__(self, geometry: ModelGeometry, layer_idx: int, config: LogQuantConfig):
        super().__init__(geometry, layer_idx)
        self.config = config
        self.window = config.window
        group = min(config.group_size, geometry.head_dim)
        key_axis, key_group = (-2, config.window) if config.key_axis == "channel" else (-1, group)
        self.kq = _QuantBlock(config.bits, key_axis, key_group)
        self.vq = _QuantBlock(config.bits, -1, group)
        self.fp_k: torch.Tensor | None = None
        self.fp_v: torch.Tensor | None = None
        self.n_sparse = 0

    def attend_step(self, query, keys, values, new_valid, scaling):
        sd = self.geometry.storage_dtype
        chunk = chunk_tokens(self.window)  # per-channel key blocks are W tokens
        fused = self.fused()
        if fused and keys.shape[2] == 1 and new_valid is None:
            return self._attend_one_fused(query, keys, values, scaling, chunk)
        parts = []
        if self.kq.length:
            n, read = self.kq.length, self._run_reader()
            parts.append(KVPart(n, read, kind="logquant-fused" if fused else "logquant", chunk_tokens=chunk,
                                kv_heads=keys.shape[1], fused=self._fused_run(n, read, chunk) if fused else None))
        if self.fp_k is not None:
            parts.append(KVPart.dense(self.fp_k, self.fp_v, kind="fp16"))
        nv = None if new_valid is None else new_valid[:, None, :]
        parts.append(KVPart.dense(keys.to(sd), values.to(sd), nv, causal=True))
        result = attend_parts(query, parts, scaling)
        self._append(keys, values)
        return result.output, result.transient_bytes

    def _run_reader(self):
        """``read(start, stop, dtype) -> (keys, values)`` over the quantized tokens as held now."""
        k_run, v_run = self.kq.run(), self.vq.run()
        return lambda a, z, dt: (self.kq.read_range(a, z, dt, k_run), self.vq.read_range(a, z, dt, v_run))

    def _attend_one_fused(self, query, keys, values, scaling, chunk):
        """A one-token step with the fused kernel: the new token joins the full-precision block first (as
        :meth:`_append` does), and that block is the float tail of the quantized run in one kernel call (numba:
        :func:`kvcompress.kernels.kivi_decode`, straight from the held buffers; otherwise the fused part through
        :func:`kvcompress.attention.attend_parts`); then the merge loop runs (:meth:`_flush`). Same keys and values
        as the general path: ``[quantized | full precision | new token (2-byte)]``, attended in one softmax."""
        sd = self.geometry.storage_dtype
        k, v = keys.to(sd), values.to(sd)
        self.fp_k = k if self.fp_k is None else torch.cat([self.fp_k, k], dim=-2)
        self.fp_v = v if self.fp_v is None else torch.cat([self.fp_v, v], dim=-2)
        n = self.kq.length + self.fp_k.shape[-2]
        # the kernel reads the full-precision block (+ the new token) as an fp32 copy: the transient the dense part
        # of the general path reported
        transient = 2 * self.fp_k.numel() * 4
        kq, vq = self.kq, self.vq
        if kernels.backend(keys.device) == "numba":
            output = kernels.kivi_decode(query, scaling, n, kq.arrays(), kq.bits, kq.group, vq.arrays(), vq.bits,
                                         vq.group, self.fp_k, self.fp_v, k_per_token=kq.axis == -1)
        else:
            read = self._run_and_tail_reader(kq.length, self._run_reader(), self.fp_k, self.fp_v)
            part = KVPart(n, read, kind="logquant-fused", chunk_tokens=chunk, kv_heads=keys.shape[1],
                          fused=self._fused_run(n, read, chunk, (self.fp_k, self.fp_v)))
            result = attend_parts(query, [part], scaling)
            output, transient = result.output, max(result.transient_bytes, transient)
        self._flush()
        return output, transient

    @staticmethod
    def _run_and_tail_reader(n: int, read, fp_k, fp_v):
        """``read(start, stop, dtype)`` over a quantized run of ``n`` tokens followed by the full-precision block."""

        def both(a, z, dt):
            pieces = []
            if a < n:
                pieces.append(read(a, min(z, n), dt))
            if z > n:
                pieces.append((fp_k[:, :, max(a - n, 0) : z - n].to(dt), fp_v[:, :, max(a - n, 0) : z - n].to(dt)))
            if len(pieces) == 1:
                return pieces[0]
            return torch.cat([pieces[0][0], pieces[1][0]], dim=-2), torch.cat([pieces[0][1], pieces[1][1]], dim=-2)

        return both

    def dense_step(self, key_states, value_states):
        """The dense reference: ``[dequantized | full precision | new tokens (2-byte)]``, then the state update."""
        dt, sd = key_states.dtype, self.geometry.storage_dtype
        ks, vs = [key_states.to(sd).to(dt)], [value_states.to(sd).to(dt)]  # the new tokens as stored, last
        if self.fp_k is not None:
            ks.insert(0, self.fp_k.to(dt))
            vs.insert(0, self.fp_v.to(dt))
            if self.kq.length:
                ks.insert(0, self.kq.read(dt))
                vs.insert(0, self.vq.read(dt))
        self._append(key_states, value_states)
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def _append(self, key_states, value_states) -> None:
        """Take the step's ``(b, h, q, d)`` K/V into the full-precision block (the prompt: as it is), then flush."""
        sd = self.geometry.storage_dtype
        k, v = key_states.to(sd), value_states.to(sd)
        if self.fp_k is not None:  # bounded: the full-precision block holds at most 3W + q tokens
            self.fp_k, self.fp_v = torch.cat([self.fp_k, k], dim=-2), torch.cat([self.fp_v, v], dim=-2)
        else:
            self.fp_k, self.fp_v = k, v
        self._flush()

    def _flush(self) -> None:
        """Run the merge loop on the full-precision block; quantize (once) exactly the rows that leave it."""
        kept, dropped, self.n_sparse = log_flush(list(range(self.fp_k.shape[-2])), self.n_sparse, self.window)
        if not dropped:
            return
        dev = self.fp_k.device
        drop_idx, keep_idx = torch.tensor(dropped, device=dev), torch.tensor(kept, device=dev)
        self.kq.append(self.fp_k.index_select(-2, drop_idx))
        self.vq.append(self.fp_v.index_select(-2, drop_idx))
        self.fp_k = self.fp_k.index_select(-2, keep_idx)
        self.fp_v = self.fp_v.index_select(-2, keep_idx)

    def held_tensors(self):
        return [self.fp_k, self.fp_v, *self.kq.tensors(), *self.vq.tensors()]

    def fused(self) -> bool:
        """Whether the quantized run is attended by the fused KIVI-layout kernel straight from its codes
        (:func:`kvcompress.kernels.kivi_attention`): keys per channel in blocks of W tokens and values per token are
        exactly KIVI's layout; keys per token (``key_axis="token"``) are read like the values; and a kernel applies on
        the device."""
        if not self.kq.length:
            return False
        key_token_group = self.kq.group if self.kq.axis == -1 else None
        return kernels.kivi_fused_applies(self.kq.codes.buffer.device, self.kq.bits, self.vq.bits,
                                          self.geometry.head_dim, self.vq.group, key_token_group=key_token_group)

    def _fused_run(self, n: int, read, chunk: int, tail=None):
        """``KVPart.fused`` of the quantized run as held now, ``n`` tokens in all, the last ones from ``tail = (keys,
        values)`` (2-byte floats after the run) when given."""
        kq, vq = self.kq, self.vq
        k_run, v_run = kq.run(), vq.run()
        k_tail, v_tail = (None, None) if tail is None else tail

        def attend(qg, valid):
            if qg.shape[2] > kernels.MAX_FUSED_ROWS:  # a long prefill chunk: BLAS on dequantized chunks is faster
                return kernels.chunked_partials(qg, read, n, chunk, valid)
            return kernels.kivi_attention(qg, n, *k_run, kq.bits, kq.group, *v_run, vq.bits, vq.group, valid,
                                          k_tail=k_tail, v_tail=v_tail, k_per_token=kq.axis == -1)

        return attend

    def attention_path(self) -> str:
        """``"fused-numba"``/``"fused-triton"`` (:meth:`fused`), ``"chunked"`` once tokens were quantized (read a chunk
        at a time), else ``"dense"`` (:mod:`kvcompress.memory`)."""
        if not self.kq.length:
            return "dense"
        return f"fused-{kernels.backend(self.kq.codes.buffer.device)}" if self.fused() else "chunked"

    def new_row_layer(self):
        return LogQuantLayer(self.geometry, self.layer_idx, self.config)

    @property
    def quantized_length(self) -> int:
        return self.kq.length


class LogQuantSlidingLayer(LogQuantLayer):
    """A sliding-window layer (each query sees the last ``size`` positions, itself included) held as LogQuant.

    State: the full-precision run ``fp_k``/``fp_v (batch, kv_heads, n_fp, head_dim)`` = ``[log-sparse | local]`` with
    its positions ``fp_pos (n_fp,)`` int32, and ``blocks``: one entry per flush, oldest first, ``(keys, values,
    positions (W,) int32, newest position)`` with keys/values :class:`UniformQuantized` ``(batch, kv_heads, W,
    head_dim)`` quantized once. After each step (the next query at position ``p`` sees positions ``> p - size``)
    full-precision tokens outside the window are dropped before the merge loop runs (so they are never quantized),
    and a block is dropped whole once its newest token is outside; tokens of a block still held that already left
    the window are masked. The reference is the window (``size - 1`` tokens).

    Attention: a decode step reads the blocks (a chunk of whole blocks at a time) and the full-precision run, with
    a validity mask from the positions; a multi-token step gathers the window's tokens into position order
    (transient: the window, ``(batch, kv_heads, <= size - 1, head_dim)`` fp32) and masks per query row.
    :meth:`dense_step` returns that position-ordered window plus the new tokens (the dense reference)."""

    is_sliding = True

    def __init__(self, geometry: ModelGeometry, layer_idx: int, config: LogQuantConfig):
        super().__init__(geometry, layer_idx, config)
        self.size = geometry.sliding_window
        self.fp_pos: torch.Tensor | None = None
        self.blocks: list[tuple[UniformQuantized, UniformQuantized, torch.Tensor, int]] = []

    def new_row_layer(self):
        return LogQuantSlidingLayer(self.geometry, self.layer_idx, self.config)

    # -- reading ---------------------------------------------------------------------------------------------------
    def _read_blocks(self, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized tokens ``[start, stop)`` in block order: ``(batch, kv_heads, stop - start, head_dim)`` keys and
        values, the blocks they fall in dequantized (transient; attention reads whole blocks, chunks of ``W``)."""
        w = self.window
        first = start // w
        blocks = self.blocks[first : -(-stop // w)]
        k = torch.cat([blk[0].dequantize(dtype) for blk in blocks], dim=-2)
        v = torch.cat([blk[1].dequantize(dtype) for blk in blocks], dim=-2)
        a = start - first * w
        return k[:, :, a : a + stop - start], v[:, :, a : a + stop - start]

    def _held_positions(self) -> torch.Tensor:
        """Positions ``(n_quantized + n_fp,)`` of every held token in storage order (blocks, then the fp run)."""
        pieces = [blk[2] for blk in self.blocks] + ([self.fp_pos] if self.fp_pos is not None else [])
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)

    def _window(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The held tokens the next query can see (positions ``seen - n .. seen - 1``, ``n = min(seen, size - 1)``)
        in position order: ``(batch, kv_heads, n, head_dim)`` keys and values (transient), or ``(None, None)``."""
        pos = self._held_positions()
        if not pos.numel():
            return None, None
        ks, vs = [], []
        if self.blocks:
            k, v = self._read_blocks(0, len(self.blocks) * self.window, dtype)
            ks.append(k)
            vs.append(v)
        if self.fp_k is not None:
            ks.append(self.fp_k.to(dtype))
            vs.append(self.fp_v.to(dtype))
        k, v = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)
        inside = (pos > self.tokens_seen - self.size).nonzero().squeeze(-1)
        order = inside[torch.argsort(pos[inside])].to(k.device)
        if order.numel() != min(self.tokens_seen, self.size - 1):  # every position of the window is held, once
            raise KVCompressError(f"logquant: layer {self.layer_idx} holds {order.numel()} tokens of its window, "
                                  f"expected {min(self.tokens_seen, self.size - 1)} (internal error)")
        return k.index_select(-2, order), v.index_select(-2, order)

    def attend_step(self, query, keys, values, new_valid, scaling):
        sd, q = self.geometry.storage_dtype, keys.shape[2]
        nv = None if new_valid is None else new_valid[:, None, :]
        new = KVPart.dense(keys.to(sd), values.to(sd), nv, causal=True)
        if q == 1:  # one query: order does not matter; mask the held tokens that left the window
            parts = []
            visible = self._held_positions().to(keys.device) > self.tokens_seen - self.size
            n_q = len(self.blocks) * self.window
            if n_q:
                chunk = chunk_tokens(self.window)
                parts.append(KVPart(n_q, self._read_blocks, kind="logquant", chunk_tokens=chunk,
                                    kv_heads=keys.shape[1]))
                if not bool(visible[:n_q].all()):
                    parts[-1].valid = visible[:n_q].view(1, 1, n_q).expand(keys.shape[0], 1, n_q)
            if self.fp_k is not None:
                parts.append(KVPart.dense(self.fp_k, self.fp_v, kind="fp16"))
            result = attend_parts(query, [*parts, new], scaling)
            transient = result.transient_bytes
        else:  # several queries: the window in position order, masked per query row
            k, v = self._window(torch.float32)
            held = 0 if k is None else k.shape[-2]
            _, window = sliding_view(held, self.tokens_seen, self.size, q, keys.shape[0], keys.device)
            parts = [KVPart.dense(k, v, kind="logquant-window")] if held else []
            result = attend_parts(query, [*parts, new], scaling, window=window)
            transient = max(result.transient_bytes, 0 if k is None else 2 * k.numel() * k.element_size())
        self._append(keys, values)
        return result.output, transient

    def dense_step(self, key_states, value_states):
        """The dense reference: ``[the window in position order (dequantized) | new tokens (2-byte)]``, then the
        state update (transformers masks the window; :meth:`attended_length` must then be the window's length)."""
        dt, sd = key_states.dtype, self.geometry.storage_dtype
        k, v = self._window(dt)
        new_k, new_v = key_states.to(sd).to(dt), value_states.to(sd).to(dt)
        self._append(key_states, value_states)
        if k is None:
            return new_k, new_v
        return torch.cat([k, new_k], dim=-2), torch.cat([v, new_v], dim=-2)

    # -- state update ------------------------------------------------------------------------------------------------
    def _append(self, key_states, value_states) -> None:
        """Take the step's ``(b, h, q, d)`` K/V (positions ``seen .. seen + q - 1``) into the full-precision run, drop
        what the next query cannot see, run the merge loop (one block per flush), drop blocks that left whole."""
        sd, q, dev = self.geometry.storage_dtype, key_states.shape[-2], key_states.device
        horizon = self.tokens_seen + q - self.size  # the next query (position seen + q) sees positions > horizon
        pos = torch.arange(self.tokens_seen, self.tokens_seen + q, dtype=torch.int32, device=dev)
        k, v = key_states.to(sd), value_states.to(sd)
        if self.fp_k is not None:
            k, v = torch.cat([self.fp_k, k], dim=-2), torch.cat([self.fp_v, v], dim=-2)
            pos = torch.cat([self.fp_pos, pos])
        out = int((pos <= horizon).sum())  # the fp run is in position order: those that left are a prefix
        if out:
            k, v, pos = k[:, :, out:], v[:, :, out:], pos[out:]
            self.n_sparse = max(0, self.n_sparse - out)
        kept, dropped, self.n_sparse = log_flush(list(range(pos.numel())), self.n_sparse, self.window)
        w = self.window
        for i in range(0, len(dropped), w):  # one block per flush, quantized once
            idx = torch.tensor(dropped[i : i + w], device=dev)
            bk, bv, bp = k.index_select(-2, idx), v.index_select(-2, idx), pos.index_select(0, idx)
            self.blocks.append((quantize_uniform(bk, self.kq.bits, axis=self.kq.axis, group_size=self.kq.group),
                                quantize_uniform(bv, self.vq.bits, axis=self.vq.axis, group_size=self.vq.group),
                                bp, int(bp.max())))
        if dropped:
            idx = torch.tensor(kept, device=dev)
            k, v, pos = k.index_select(-2, idx), v.index_select(-2, idx), pos.index_select(0, idx)
        elif out and pos.numel():  # the slices above would keep the tokens that left alive (uncounted): copies
            k, v, pos = k.clone(), v.clone(), pos.clone()
        self.fp_k, self.fp_v, self.fp_pos = (k, v, pos) if pos.numel() else (None, None, None)
        self.blocks = [blk for blk in self.blocks if blk[3] > horizon]  # whole blocks, never re-quantized

    # -- accounting --------------------------------------------------------------------------------------------------
    def held_tensors(self):
        blocks = [t for kq, vq, p, _ in self.blocks for t in (kq.packed, kq.scale, kq.zero, vq.packed, vq.scale,
                                                               vq.zero, p)]
        return [self.fp_k, self.fp_v, self.fp_pos, *blocks]

    def attention_path(self) -> str:
        """``"chunked"`` once blocks are held (a decode step reads them a chunk of blocks at a time), else
        ``"dense"``."""
        return "chunked" if self.blocks else "dense"

    def attended_length(self) -> int:
        if self._rows is not None:  # a padded batch: each row holds its own window
            return max(row.attended_length() for row in self._rows)
        return len(self.blocks) * self.window + (0 if self.fp_pos is None else self.fp_pos.numel())

    @property
    def quantized_length(self) -> int:
        return len(self.blocks) * self.window

    def reference_tokens(self) -> int:
        return min(self.tokens_seen, self.size - 1)

    def get_max_length(self) -> int:
        return self.size


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@register("logquant")
class LogQuant(Method):
    summary = "LogQuant: log-spaced full-precision tokens (<= 3W), the rest 2/4-bit, position-agnostic layout"
    attention = ("kvcompress: the quantized run through the fused KIVI-layout kernel (keys per channel or per token; "
                 "chunked without a kernel), then the full-precision block")
    sliding = ("LogQuant too: quantized flush blocks + log-spaced fp16 inside the window, blocks leave whole, window "
               "masked (quantize_sliding=False: plain fp16 window)")
    Config = LogQuantConfig
    test_options = {"window": 8}
    noop_options = None  # no setting keeps every token at 2 bytes: a window past the context is an error

    def prepare(self) -> None:
        g = self.geometry
        group = min(self.config.group_size, g.head_dim)
        if g.head_dim % group:
            raise KVCompressError(f"logquant: group_size={self.config.group_size} does not divide head_dim={g.head_dim}")
        if g.max_positions is not None and 2 * self.config.window >= g.max_positions:
            raise KVCompressError(
                f"logquant: window={self.config.window} is larger than the context it must serve: the model's "
                f"context is {g.max_positions} tokens and nothing is quantized before 2*window+1 tokens"
            )

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):
            if self.config.quantize_sliding:
                return LogQuantSlidingLayer(self.geometry, layer_idx, self.config)
            return self.sliding_layer(layer_idx)
        return LogQuantLayer(self.geometry, layer_idx, self.config)

"""Storage parts of ``kvquant`` (see :mod:`kvcompress.methods.kvquant`): the model's RoPE for stored positions,
bit-plane packed codes, CSR outlier rows, one quantized stream (K or V), positions of stored tokens.

Shapes: K/V ``(batch, kv_heads, n, head_dim)``; token-major rows ``(n, batch, kv_heads*head_dim)``.
"""

from __future__ import annotations

import inspect
import math
import sys

import numpy as np

import torch

from .. import kernels
from ..observe import Observer
from ..quant import (
    normalize_minmax,
    outlier_thresholds,
    pack_bits,
    unpack_bits,
)
from ..quant._common import check_fp16_finite
from ..registry import KVCompressError
from ..rope import unapply_rope
from ..storage import GrowingTokens

#: appends of at most this many (token, batch row) rows are quantized by one numba call (all, in practice: it is
#: faster than the torch path for a decode step and for a prompt; tests lower it to compare the two)
FAST_ROWS = 1 << 62
#: tokens a buffer grows by at least (then by 1/32 of what it holds)
GROW_TOKENS = 16
#: outlier entries a buffer grows by at least
GROW_OUTLIERS = 64
_NO_PLANE = np.zeros((0, 0, 0, 0), np.uint8)
_NO_RANGE = np.zeros((1, 0), np.uint16)
_NO_BITS = np.zeros((1, 1, 0), np.uint16)
_NO_BYTES = np.zeros((1, 1, 0, 1), np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# RoPE: recompute the model's cos/sin for stored positions
# --------------------------------------------------------------------------------------------------------------------


class RopeTable:
    """cos/sin of the model's own rotary module for any positions, per layer type, computed when asked.

    Nothing is kept between calls (a table of every position would be memory the cache holds but does not count):
    the cost is one ``cos``/``sin`` per stored position and dimension per read. ``cos_sin(positions (b|1, n),
    layer_type)`` -> ``(cos, sin)`` each ``(b|1, n, head_dim)`` fp32, rounded through the model's dtype as the model
    does.
    """

    def __init__(self, model, dtype: torch.dtype):
        self.module = find_rotary(model)
        self.takes_layer_type = "layer_type" in inspect.signature(self.module.forward).parameters
        self.dtype = dtype
        self._frequencies: dict = {}  # layer type -> (inv_freq, scaling) | None

    def cos_sin(self, positions: torch.Tensor, layer_type: str):
        pos = positions.long()
        x = torch.zeros(1, dtype=self.dtype, device=pos.device)
        with torch.no_grad():
            c, s = self.module(x, pos, layer_type) if self.takes_layer_type else self.module(x, pos)
        return c.float(), s.float()

    def frequencies(self, layer_type: str):
        """``(inv_freq (d/2,), scaling)`` of the rotary module for ``layer_type`` -- its own buffer, not a copy -- when
        ``cos/sin(position * inv_freq) * scaling`` reproduces what the module computes (checked once per layer type
        at a few positions, to the rounding of the model's dtype); None otherwise (the fused kernel does not apply)."""
        if layer_type not in self._frequencies:
            self._frequencies[layer_type] = self._find_frequencies(layer_type)
        return self._frequencies[layer_type]

    def _find_frequencies(self, layer_type: str):
        buffers = dict(self.module.named_buffers(recurse=False))
        inv_freq = buffers.get(f"{layer_type}_inv_freq", buffers.get("inv_freq"))
        scaling = getattr(self.module, "attention_scaling", 1.0)
        scaling = getattr(self.module, f"{layer_type}_attention_scaling", scaling)
        if inv_freq is None or not isinstance(scaling, (int, float)):
            return None
        pos = torch.tensor([[0, 1, 2, 3, 17, 100, 1000]])
        cos, sin = self.cos_sin(pos, layer_type)
        half = inv_freq.numel()
        if cos.shape[-1] != 2 * half:
            return None
        ang = pos[0, :, None].double() * inv_freq.double()[None, :]
        want_c = torch.cat([ang.cos(), ang.cos()], -1) * scaling
        want_s = torch.cat([ang.sin(), ang.sin()], -1) * scaling
        tol = 5e-4 if self.dtype == torch.float32 else 1e-2
        if not (torch.allclose(cos[0].double(), want_c, atol=tol)
                and torch.allclose(sin[0].double(), want_s, atol=tol)):
            return None
        return inv_freq, float(scaling)

    def cos_sin_range(self, start: int, n: int, layer_type: str):
        """cos/sin of positions ``start .. start+n-1``: ``(1, n, head_dim)``."""
        return self.cos_sin(torch.arange(start, start + n).unsqueeze(0), layer_type)


def find_rotary(model):
    """The model's rotary-embedding module (``model.model.rotary_emb`` or any module holding ``inv_freq``)."""
    for m in model.modules():
        if any(n == "inv_freq" or n.endswith("_inv_freq") for n, _ in m.named_buffers(recurse=False)):
            return m
    raise KVCompressError("kvquant: pre_rope=True needs a RoPE model (no rotary-embedding module found); "
                          "use pre_rope=False")


class PositionObserver(Observer):
    """The Observer plus the ``position_ids`` each attention module received (per forward)."""

    def __init__(self, model, cache):
        self._positions: dict[int, torch.Tensor | None] = {}
        super().__init__(model, cache)

    def _capture(self, layer_idx, module, args, kwargs):
        self._positions[layer_idx] = kwargs.get("position_ids")
        return super()._capture(layer_idx, module, args, kwargs)

    def position_ids(self, layer_idx: int):
        return self._positions.get(layer_idx)

    def _forget(self, layer_idx: int) -> None:
        super()._forget(layer_idx)
        self._positions.pop(layer_idx, None)


# --------------------------------------------------------------------------------------------------------------------
# Storage: sparse outlier rows, one quantized stream (K or V), positions
# --------------------------------------------------------------------------------------------------------------------


def _small_int(limit: int) -> torch.dtype:
    return torch.uint8 if limit <= 255 else torch.int16 if limit <= 32767 else torch.int32


_NO_ROTATION = (np.zeros((1, 0, 0), np.float32),) * 2


def _rotation_arrays(unrotate) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(1|b, q, d)`` as float32 numpy arrays for ``quantize_rows`` (``(1, 0, 0)`` each: none)."""
    if unrotate is None:
        return _NO_ROTATION
    return tuple(kernels._np32(t) for t in unrotate)


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """``(b, h, n, d)`` -> token-major rows ``(n, b, h*d)``."""
    b, h, n, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(n, b, h * d)


def from_rows(r: torch.Tensor, h: int) -> torch.Tensor:
    """``(n, b, h*d)`` -> ``(b, h, n, d)``."""
    n, b, w = r.shape
    return r.reshape(n, b, h, w // h).permute(1, 2, 0, 3)


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes ``(..., d)`` -> packed bit planes along the last dim (:func:`kvcompress.quant.pack_bits`, channels in
    order): one ``bits``-bit plane for 2 and 4 bits; for 3 bits a 2-bit plane (low bits) and a 1-bit plane (high bit)
    -- the same ``ceil(3d/8)`` bytes when 8 divides d, and power-of-two planes are read as whole 64-bit words by the
    fused kernel."""
    if bits == 3:
        return [pack_bits(codes & 3, 2, validate=False), pack_bits(codes >> 2, 1, validate=False)]
    return [pack_bits(codes, bits, validate=False)]


def unpack_planes(planes: list[torch.Tensor], bits: int, d: int) -> torch.Tensor:
    if bits == 3:
        return unpack_bits(planes[0], 2, d) | (unpack_bits(planes[1], 1, d) << 2)
    return unpack_bits(planes[0], bits, d)


def scatter_rows_(x: torch.Tensor, counts: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Write CSR outliers of the same tokens (``counts (n, b)`` per token-major row, ``cols``, ``vals``, as
    :class:`QuantStream` holds them) into ``x (b, h, n, d)`` (contiguous, in place)."""
    if vals.numel():
        b, h, n, d = x.shape
        r = torch.repeat_interleave(torch.arange(n * b, device=x.device), counts.reshape(-1).long())
        c = cols.long()
        flat = (((r % b) * h + c // d) * n + r // b) * d + c % d
        x.view(-1)[flat] = vals.to(x.dtype)
    return x


class SparseView:
    """The CSR outliers of a whole stream, joined (a transient view for inspection)."""

    def __init__(self, counts, cols, vals):
        self.counts, self.cols, self.vals = counts, cols, vals

    def tensors(self):
        return [self.counts, self.cols, self.vals]


class QuantStream:
    """Quantized K or V of the stored tokens.

    ``per_channel``: rows are normalized with the fixed per-channel range ``lower/upper`` ``(1|b, width)``
    (given, or fixed by :meth:`fix_range` from data); else per token: ``token_range="token"`` one range per token
    over all KV heads (the paper: its outlier thresholds, or min/max without outliers; scale/offset ``(b, 1, n, 1)``),
    ``"head"`` one per token and KV head (min/max of the row after the outliers left; ``(b, h, n, 1)``).
    ``codebook`` assigns codes, ``decode_book`` reconstructs (different only with Q-Norm).

    Held in :class:`kvcompress.storage.GrowingTokens` buffers (appending copies O(1) tokens amortized, and each
    tensor is one contiguous buffer the fused kernel reads in place; the spare capacity is held and counted):
    ``planes`` (``(b, h, n, bytes)`` uint8 each), per-token ``scale``/``offset`` ``(b, 1|h, n, 1)`` fp16, and the
    outliers as CSR rows (row = (token, batch row), token-major, width ``h*d``): ``counts (b, 1, n)`` per row
    (uint8 / int16), ``cols (1, 1, nnz)`` the column in the row, ``vals (1, 1, nnz)`` fp16.
    """

    def __init__(self, bits, fraction, codebook, decode_book, heads, head_dim, per_channel, lower=None, upper=None,
                 token_range="token"):
        self.bits, self.fraction, self.h, self.d = bits, fraction, heads, head_dim
        self.token_range = token_range
        self.codebook, self.decode_book = codebook, decode_book
        self.per_channel = per_channel
        self.n_planes = 2 if bits == 3 else 1
        self.has_sparse = fraction > 0
        self.length = 0
        self._planes = [GrowingTokens(GROW_TOKENS) for _ in range(self.n_planes)]
        self._ranges = [] if per_channel else [GrowingTokens(GROW_TOKENS), GrowingTokens(GROW_TOKENS)]
        self._sparse = [GrowingTokens(GROW_TOKENS), GrowingTokens(GROW_OUTLIERS), GrowingTokens(GROW_OUTLIERS)] \
            if self.has_sparse else []
        self._per_token = [*self._planes, *self._ranges, *self._sparse[:1]]  # one entry per token (the others: outliers)
        self.channel_scale = self.channel_offset = None  # per channel: (1|b, width) fp16
        cb = codebook.float()
        self._midpoints = (cb[:-1] + cb[1:]) / 2  # nearest level = bucket among the midpoints (held: counted)
        self._midpoints_array = None  # the same as numpy (made once)
        self._channel_arrays = None  # per channel: the fp16 (offset, scale) as uint16 numpy views, for the quantizer
        self._codes = None  # the last codes() handed out, while the buffers it views stay the same
        self._kernel_args, self._room = None, 0  # quantize_into's buffer arguments, and the room they have (in tokens)
        # counts and columns are written as little-endian bytes; ranges per head have no kernel
        self._kernel_serves = kernels.AVAILABLE and sys.byteorder == "little" and (per_channel or token_range == "token")
        if per_channel and lower is not None:
            self._set_range(lower, upper)

    def _buffers(self) -> list[GrowingTokens]:
        return [*self._planes, *self._ranges, *self._sparse]

    @property
    def ready(self) -> bool:
        return not self.per_channel or self.channel_scale is not None

    def _set_range(self, lower, upper):
        """Held as fp16 offset/scale; the thresholds used later are ``offset -/+ scale``."""
        w = self.h * self.d
        self.channel_offset = ((upper.float() + lower.float()) / 2).half().reshape(-1, w)  # (1|b, width)
        self.channel_scale = ((upper.float() - lower.float()) / 2).half().reshape(-1, w)
        self._channel_arrays = None
        self._buffers_replaced()

    def fix_range(self, x: torch.Tensor) -> None:
        """Per-channel range from ``x (b, h, n, d)``: outlier thresholds along tokens (min/max if none)."""
        r = x.float().permute(0, 1, 3, 2).reshape(x.shape[0], self.h * self.d, -1)  # (b, width, n)
        if self.fraction > 0:
            lo, hi = outlier_thresholds(r, self.fraction, axis=-1)
        else:
            lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
        self._set_range(lo.squeeze(-1), hi.squeeze(-1))

    def __len__(self):
        return self.length

    def limit_capacity(self, tokens: int) -> None:
        """Grow no further than ``tokens`` tokens unless one append needs more (0: always exact-sized; a sliding
        window). The outlier entries keep growing geometrically (their number per token varies)."""
        for g in self._per_token:
            g.limit = tokens

    def append(self, x: torch.Tensor, unrotate: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantize and append ``x (b, h, q, d)`` (the quantization of :mod:`kvcompress.quant` -- outlier thresholds,
        dense-and-sparse split, min/max normalization, nearest level -- inlined without its argument checks: a decode
        step appends one token per layer, and the checks cost more than the arithmetic). ``unrotate``: ``(cos, sin)``
        ``(1|b, q, d)``: ``x`` is post-RoPE, un-rotated first (:func:`kvcompress.rope.unapply_rope`; inside the numba
        call when it applies)."""
        b, h, q, d = x.shape
        if not q:
            return
        w = h * d
        if q * b <= FAST_ROWS and self._append_with_kernel(x, unrotate):
            return
        rows = to_rows(x.float() if unrotate is None else unapply_rope(x.float(), *unrotate))  # (q, b, w)
        if self.per_channel:
            lo, hi = self._channel_bounds()
        elif self.fraction > 0:
            m = min(math.floor(w * self.fraction / 2 + 0.5 + 1e-9), (w - 1) // 2)
            lo = torch.kthvalue(rows, m + 1, dim=-1, keepdim=True).values
            hi = torch.kthvalue(rows, w - m, dim=-1, keepdim=True).values
        if self.has_sparse:
            out = (rows > hi) | (rows < lo)
            flat = out.reshape(-1).nonzero().squeeze(1)
            counts = out.reshape(q, b, w).sum(-1, dtype=torch.int32).to(_small_int(w)).t().unsqueeze(1)  # (b, 1, q)
            sparse = (counts, (flat % w).to(_small_int(w - 1)).view(1, 1, -1),
                      rows.reshape(-1)[flat].to(torch.float16).view(1, 1, -1))
            rows = torch.clamp(rows, lo, hi)
        else:
            sparse = ()
            if self.per_channel:
                rows = torch.clamp(rows, lo, hi)
        ranges = ()
        if self.per_channel:
            xn = ((rows - self.channel_offset.float().unsqueeze(0)) / self._safe_scale()).clamp_(-1, 1)
        elif self.token_range == "token":  # one range per token (rows are clamped to the thresholds: min/max = them)
            mn, mx = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)  # (q, b, 1)
            offset, scale = ((mx + mn) / 2).half(), ((mx - mn) / 2).half()
            check_fp16_finite(offset, scale)
            sc = scale.float()
            xn = (rows - offset.float()) / torch.where(sc > 0, sc, torch.ones_like(sc))
            ranges = (scale.permute(1, 2, 0).unsqueeze(-1), offset.permute(1, 2, 0).unsqueeze(-1))  # (b, 1, q, 1)
        else:
            xn, scale, offset = normalize_minmax(from_rows(rows, h).contiguous(), axis=-1)
            ranges = (scale, offset)
        if xn.dim() == 3:
            xn = from_rows(xn, h)
        codes = torch.bucketize(xn.contiguous(), self._midpoints).to(torch.uint8)
        grown = False
        for buf, t in zip(self._buffers(), (*pack_planes(codes, self.bits), *ranges, *sparse)):
            grown |= buf.append(t)
        if grown:  # the last codes() and the kernel's arguments must not keep the old buffers alive
            self._buffers_replaced()
        self._room -= q  # (the kernel path's room, where it kept arguments: q tokens taken here)
        self.length += q

    def _append_with_kernel(self, x: torch.Tensor, unrotate=None) -> bool:
        """:meth:`append` of ``x (b, h, q, d)`` by one numba call
        (:func:`kvcompress.kernels.kvquant_cpu.quantize_into`: the arithmetic of the torch path) that writes codes,
        ranges, outlier counts and -- where they fit in the room already held -- the outliers themselves straight into
        the buffers (:meth:`kvcompress.storage.GrowingTokens.reserve`, numpy views made once per buffer); outliers that
        do not fit are placed after the buffer grew, as :meth:`append` grows it. One call per stream and step instead
        of ~15 numpy/torch calls (each ~0.1 ms inside a forward); the buffers' arguments are kept from step to step
        while the buffers stay and have room (:meth:`_kernel_buffers`). False where it does not apply (no numba, not on
        the CPU, ranges per head). Nothing is committed when it raises."""
        if x.device.type != "cpu":
            return False
        args = self.kernel_append_args(x.shape)
        if args is None:
            return False
        head, t0, tail, e0 = args
        result = kernels._kvq_cpu.quantize_into(kernels._np32(x), *head, t0, *tail, e0, *_rotation_arrays(unrotate))
        self.commit_kernel_append(x.shape[2], result)
        return True

    def kernel_append_args(self, shape: tuple) -> tuple | None:
        """:func:`quantize_into`'s arguments for appending ``shape = (b, h, q, d)`` tokens on the CPU (room made for
        them): ``(bits .. planes1, t0, scale_bits .. vals, e0)`` as four items, or None where the kernel path does not
        apply (no numba, ranges per head, a big-endian machine). Then :meth:`commit_kernel_append`."""
        if not self._kernel_serves:
            return None
        args = self._kernel_args if self._room >= shape[2] else None
        if args is None:
            args = self._kernel_buffers(shape)
        g_cols = self._sparse[1] if self.has_sparse else None
        held_entries = g_cols.length if g_cols is not None and g_cols.buffer is not None else 0
        return args[0], self.length, args[1], held_entries

    def _kernel_buffers(self, shape: tuple) -> tuple[tuple, tuple]:
        """Room for ``shape[2]`` more tokens in every per-token buffer, and :func:`quantize_into`'s arguments before and
        after the first token's index (``t0``) up to the outliers' buffers: ``(bits .. planes1, scale_bits .. vals)``,
        numpy views of the buffers as they are now, kept (``_kernel_args``) with the tokens every per-token buffer can
        still take in place (``_room``) until a buffer is replaced (:meth:`_buffers_replaced`)."""
        b, h, q, d = shape
        w = h * d
        widths = [d * (4 if self.bits == 4 else 2) // 8, d // 8]
        replaced = False  # a buffer made or grown: the last codes() must go (it would keep the old one alive)
        for g, width in zip(self._planes, widths):
            replaced |= g.reserve(q, (b, h, q, width), torch.uint8)
        planes0 = self._planes[0].array()
        planes1 = self._planes[1].array() if self.bits == 3 else _NO_PLANE
        m = -1
        if not self.per_channel and self.has_sparse:
            m = min(math.floor(w * self.fraction / 2 + 0.5 + 1e-9), (w - 1) // 2)
        scale_bits = offset_bits = _NO_BITS
        if self.per_channel:
            if self._channel_arrays is None:  # the held fp16 range's bits (views of the same memory)
                self._channel_arrays = tuple(kernels._half_bits(t) for t in (self.channel_offset, self.channel_scale))
            ch_off, ch_scale = self._channel_arrays
        else:
            ch_off = ch_scale = _NO_RANGE
            for g in self._ranges:
                replaced |= g.reserve(q, (b, 1, q, 1), torch.float16)
            scale_bits, offset_bits = (g.bits_array() for g in self._ranges)
        counts = cols = _NO_BYTES
        vals = _NO_BITS
        if self.has_sparse:
            g_counts, g_cols, g_vals = self._sparse
            replaced |= g_counts.reserve(q, (b, 1, q), _small_int(w))
            counts = g_counts.bytes_array()
            if g_cols.buffer is not None:
                cols, vals = g_cols.bytes_array(), g_vals.bits_array()
        if self._midpoints_array is None:
            self._midpoints_array = self._midpoints.numpy()
        if replaced:
            self._codes = None
        self._kernel_args = ((self.bits, self._midpoints_array, self.per_channel, ch_off, ch_scale, m, planes0, planes1),
                             (scale_bits, offset_bits, self.has_sparse, counts, cols, vals))
        self._room = min(g.buffer.shape[2] - g.length for g in self._per_token)
        return self._kernel_args

    def commit_kernel_append(self, q: int, result: tuple) -> None:
        """After :func:`quantize_into` wrote ``q`` tokens (``result``: what it returned): raise where a range was not
        finite (nothing committed), place the outliers that did not fit (growing their buffers as :meth:`append`
        would), hold the tokens."""
        nnz, ok, in_place, new_cols, new_vals = result
        if not ok:
            check_fp16_finite(torch.tensor([float("inf")]))  # the torch path's error, word for word
        if nnz:
            g_cols, g_vals = self._sparse[1:]
            if not in_place:  # more outliers than the room held: grow as append would, then place them
                w = self.h * self.d
                for g, src, dtype in ((g_cols, new_cols, _small_int(w - 1)), (g_vals, new_vals, torch.float16)):
                    g.reserve(nnz, (1, 1, nnz), dtype)
                    with np.errstate(over="ignore"):  # fp16: rounded to nearest even, beyond its range inf, as torch
                        g.array()[0, 0, g.length : g.length + nnz] = src
                self._buffers_replaced()
            g_cols.commit(nnz)
            g_vals.commit(nnz)
        for g in self._per_token:  # (as drop_front)
            g.commit(q)
        self.length += q
        self._room -= q

    def _buffers_replaced(self) -> None:
        """A buffer was made, grown, cut or refilled outside the kernel path: what was kept of the old ones goes (the
        last codes() and the kernel's arguments would keep them alive, and the room is no longer known)."""
        self._codes = self._kernel_args = None
        self._room = 0

    def _channel_bounds(self):
        """Per-channel thresholds ``(lower, upper)`` as float32 ``(1, 1|b, width)`` (transient)."""
        off, sc = self.channel_offset.float().unsqueeze(0), self.channel_scale.float().unsqueeze(0)
        return off - sc, off + sc

    def _safe_scale(self):
        s = self.channel_scale.float().unsqueeze(0)
        return torch.where(s > 0, s, torch.ones_like(s))

    def _sparse_span(self, a: int, z: int) -> tuple[int, int]:
        """The entries ``[n0, n1)`` of ``cols``/``vals`` that belong to tokens ``[a, z)`` (all batch rows)."""
        counts = self._sparse[0].view()
        n0 = int(counts[:, :, :a].sum(dtype=torch.int64)) if a else 0
        return n0, n0 + int(counts[:, :, a:z].sum(dtype=torch.int64))

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stored tokens ``[start, stop)`` (default all), dequantized: ``(b, h, n, d)`` fp32 (a transient copy)."""
        a, z = start, len(self) if stop is None else stop
        planes = [g.view()[:, :, a:z] for g in self._planes]
        codes = unpack_planes(planes, self.bits, self.d)
        x = self.decode_book.index_select(0, codes.reshape(-1).int()).view(codes.shape)
        if self.per_channel:
            b = self.channel_scale.shape[0]
            x = (x * self.channel_scale.float().view(b, self.h, 1, self.d)
                 + self.channel_offset.float().view(b, self.h, 1, self.d))
        else:
            scale, offset = (g.view()[:, :, a:z] for g in self._ranges)
            x = x * scale.float() + offset.float()
        if self.has_sparse:
            counts, cols, vals = (g.view() for g in self._sparse)
            n0, n1 = self._sparse_span(a, z)
            if n1 > n0:
                x = scatter_rows_(x.contiguous(), counts[:, 0, a:z].t(), cols[0, 0, n0:n1], vals[0, 0, n0:n1])
        return x

    def drop_front(self, k: int) -> None:
        """Forget the ``k`` oldest tokens (sliding windows)."""
        if self.has_sparse:
            nnz = self._sparse_span(0, k)[1]
            for g in self._sparse[1:]:
                g.drop_front(nnz)
        for g in self._per_token:
            g.drop_front(k)
        self.length -= k
        self._buffers_replaced()

    def codes(self):
        """The held tokens in the fused kernels' contract (:class:`kvcompress.kernels.CodebookCodes`): the buffers
        themselves, spare capacity included (the contract reads the first ``len(self)`` tokens), nothing copied; the
        same object while the buffers stay the same (read it, do not change it)."""
        if self._codes is not None:  # the same buffers: the same object (the kernel's numpy views are made once)
            return self._codes
        counts, cols, vals = (g.buffer for g in self._sparse) if self.has_sparse else (None, None, None)
        if self.per_channel:
            scale, offset = self.channel_scale, self.channel_offset
        else:
            scale, offset = (g.buffer for g in self._ranges)
        codes = kernels.CodebookCodes(planes=[g.buffer for g in self._planes], bits=self.bits, levels=self.decode_book,
                                      scale=scale, offset=offset, per_channel=self.per_channel, counts=counts,
                                      cols=None if cols is None else cols.view(-1),
                                      vals=None if vals is None else vals.view(-1))
        self._codes = codes
        return codes

    # -- views (inspection, tests) -----------------------------------------------------------------------------------
    @property
    def planes(self) -> list[torch.Tensor]:
        return [g.view() for g in self._planes] if len(self) else []

    @property
    def scale(self):
        return self.channel_scale if self.per_channel else self._ranges[0].view()

    @property
    def offset(self):
        return self.channel_offset if self.per_channel else self._ranges[1].view()

    @property
    def sparse(self) -> SparseView | None:
        """The outliers as CSR rows: ``counts (n, b)`` (a view), ``cols (nnz,)``, ``vals (nnz,)``."""
        if not self.has_sparse:
            return None
        if not len(self):
            w = self.h * self.d
            return SparseView(torch.zeros(0, 0, dtype=_small_int(w)), torch.zeros(0, dtype=_small_int(w - 1)),
                              torch.zeros(0, dtype=torch.float16))
        counts, cols, vals = (g.view() for g in self._sparse)
        return SparseView(counts[:, 0].t(), cols.reshape(-1), vals.reshape(-1))

    def spare_nbytes(self) -> int:
        """Bytes of the buffers' spare capacity (held, counted, not yet filled)."""
        return sum(g.spare_nbytes() for g in self._buffers())

    def tensors(self):
        out = [t for g in self._buffers() for t in g.tensors()]
        out += [self.channel_scale, self.channel_offset, self.codebook, self._midpoints]
        if self.decode_book is not self.codebook:
            out.append(self.decode_book)
        return out


class Positions:
    """Positions of the stored (non-sink) tokens: implicit ``start, start+1, ...`` (nothing held) until a
    step arrives whose positions differ (left padding); then explicit int32 ``(b, n)``."""

    def __init__(self):
        self.start, self.n, self.explicit = None, 0, None

    def append(self, pos: torch.Tensor) -> None:
        """``pos``: ``(b|1, q)`` positions of the appended tokens."""
        q = pos.shape[-1]
        if self.explicit is None:
            if self.start is None:
                self.start = int(pos.reshape(-1)[0])
            first = self.start + self.n
            if q == 1:  # a decode step: compare Python ints (one op instead of three)
                same = all(p == first for p in pos.reshape(-1).tolist())
            else:
                same = torch.equal(pos, torch.arange(first, first + q).expand_as(pos))
            if same:
                self.n += q
                return
            self.explicit = torch.arange(self.start, self.start + self.n, dtype=torch.int32).expand(pos.shape[0], -1)
        rows = max(self.explicit.shape[0], pos.shape[0])
        self.explicit = torch.cat([self.explicit.expand(rows, -1), pos.to(torch.int32).expand(rows, -1)], dim=1)
        self.n += q

    def is_next(self, p: int) -> bool:
        """Whether a token at position ``p`` (every row) is the next implicit one (:meth:`append_next` takes it)."""
        return self.explicit is None and self.start is not None and p == self.start + self.n

    def append_next(self, p: int) -> bool:
        """Append one token at position ``p`` (every row) when it is the next implicit one; False (nothing done)
        otherwise (then :meth:`append`)."""
        if self.is_next(p):
            self.n += 1
            return True
        return False

    def get(self) -> torch.Tensor:
        """``(b|1, n)`` long."""
        if self.explicit is not None:
            return self.explicit.long()
        return torch.arange(self.start, self.start + self.n).unsqueeze(0)

    def drop_front(self, k: int) -> None:
        self.n -= k
        if self.explicit is not None:
            self.explicit = self.explicit[:, k:].clone()
        else:
            self.start += k

    def tensors(self):
        return [self.explicit]

"""Storage parts of ``kvquant`` (see :mod:`kvcompress.methods.kvquant`): the model's RoPE for stored positions,
bit-plane packed codes, CSR outlier rows, one quantized stream (K or V), positions of stored tokens.

Shapes: K/V ``(batch, kv_heads, n, head_dim)``; token-major rows ``(n, batch, kv_heads*head_dim)``.
"""

from __future__ import annotations

import inspect

import torch

from ..compat import uses_cache
from ..observe import Observer
from ..quant import (
    normalize_minmax,
    outlier_thresholds,
    pack_bits,
    quantize_codebook,
    split_outliers,
    unpack_bits,
)
from ..quant._common import check_fp16_finite
from ..registry import KVCompressError


# --------------------------------------------------------------------------------------------------------------------
# RoPE: recompute the model's cos/sin for stored positions
# --------------------------------------------------------------------------------------------------------------------


class RopeTable:
    """cos/sin of the model's own rotary module for any positions, per layer type, cached lazily.

    Derivable from positions, so not counted as KV bytes. ``cos_sin(positions (b|1, n), layer_type)`` ->
    ``(cos, sin)`` each ``(b|1, n, head_dim)`` fp32.
    """

    def __init__(self, model, dtype: torch.dtype):
        self.module = find_rotary(model)
        self.takes_layer_type = "layer_type" in inspect.signature(self.module.forward).parameters
        self.dtype = dtype
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, needed: int, layer_type: str):
        cos, _ = self._tables.get(layer_type, (None, None))
        if cos is None or cos.shape[0] < needed:
            size = 1 << max(needed - 1, 255).bit_length()
            pos = torch.arange(size).unsqueeze(0)
            x = torch.zeros(1, dtype=self.dtype)
            with torch.no_grad():
                args = (x, pos, layer_type) if self.takes_layer_type else (x, pos)
                c, s = self.module(*args)
            self._tables[layer_type] = (c[0].float(), s[0].float())
        return self._tables[layer_type]

    def cos_sin(self, positions: torch.Tensor, layer_type: str):
        cos, sin = self._table(int(positions.max()) + 1, layer_type)
        idx = positions.long().to(cos.device)
        return cos[idx], sin[idx]

    def cos_sin_range(self, start: int, n: int, layer_type: str):
        """cos/sin of positions ``start .. start+n-1``: ``(1, n, head_dim)`` views of the table."""
        cos, sin = self._table(start + n, layer_type)
        return cos[start : start + n].unsqueeze(0), sin[start : start + n].unsqueeze(0)


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
        if uses_cache(kwargs, self._cache_ref()):
            self._positions[layer_idx] = kwargs.get("position_ids")
        return super()._capture(layer_idx, module, args, kwargs)

    def position_ids(self, layer_idx: int):
        return self._positions.get(layer_idx)


# --------------------------------------------------------------------------------------------------------------------
# Storage: sparse outlier rows, one quantized stream (K or V), positions
# --------------------------------------------------------------------------------------------------------------------


def _small_int(limit: int) -> torch.dtype:
    return torch.uint8 if limit <= 255 else torch.int16 if limit <= 32767 else torch.int32


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """``(b, h, n, d)`` -> token-major rows ``(n, b, h*d)``."""
    b, h, n, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(n, b, h * d)


def from_rows(r: torch.Tensor, h: int) -> torch.Tensor:
    """``(n, b, h*d)`` -> ``(b, h, n, d)``."""
    n, b, w = r.shape
    return r.reshape(n, b, h, w // h).permute(1, 2, 0, 3)


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes ``(..., d)`` -> packed bit planes along the last dim: one ``bits``-bit plane for 2 and 4 bits; for 3 bits
    a 2-bit plane (low bits) and a 1-bit plane (high bit) -- the same ``ceil(3d/8)`` bytes when 8 divides d, and
    unpacking power-of-two planes is several times faster than a 3-bit stream."""
    if bits == 3:
        return [pack_bits(codes & 3, 2, validate=False), pack_bits(codes >> 2, 1, validate=False)]
    return [pack_bits(codes, bits, validate=False)]


def unpack_planes(planes: list[torch.Tensor], bits: int, d: int) -> torch.Tensor:
    if bits == 3:
        return unpack_bits(planes[0], 2, d) | (unpack_bits(planes[1], 1, d) << 2)
    return unpack_bits(planes[0], bits, d)


class SparseRows:
    """Exact outliers in CSR form over token-major rows ``(n, b, width)``: ``counts (n, b)`` per row,
    ``cols (nnz,)`` column in the row, ``vals (nnz,)`` fp16. Appending tokens appends rows."""

    def __init__(self, width: int):
        self.width = width
        self.counts = torch.zeros(0, 0, dtype=_small_int(width))
        self.cols = torch.zeros(0, dtype=_small_int(width - 1))
        self.vals = torch.zeros(0, dtype=torch.float16)

    def append(self, sp, n: int, b: int) -> None:
        idx = sp.indices.long()
        counts = torch.bincount(idx // self.width, minlength=n * b).reshape(n, b)
        self.counts = torch.cat([self.counts.reshape(-1, b), counts.to(self.counts.dtype)])
        self.cols = torch.cat([self.cols, (idx % self.width).to(self.cols.dtype)])
        self.vals = torch.cat([self.vals, sp.values])

    def scatter_(self, x: torch.Tensor) -> torch.Tensor:
        """Write the outliers into ``x (b, h, n, d)`` (contiguous, in place)."""
        if self.vals.numel():
            b, h, n, d = x.shape
            r = torch.repeat_interleave(torch.arange(n * b), self.counts.reshape(-1).long())
            c = self.cols.long()
            flat = (((r % b) * h + c // d) * n + r // b) * d + c % d
            x.view(-1)[flat] = self.vals.to(x.dtype)
        return x

    def drop_front(self, k: int) -> None:
        nnz = int(self.counts[:k].long().sum())
        self.counts, self.cols, self.vals = self.counts[k:].clone(), self.cols[nnz:].clone(), self.vals[nnz:].clone()

    def tensors(self):
        return [self.counts, self.cols, self.vals]


class QuantStream:
    """Quantized K or V of the stored tokens.

    ``per_channel``: rows are normalized with the fixed per-channel range ``lower/upper`` ``(1|b, width)``
    (given, or fixed by :meth:`fix_range` from data); else per token: ``token_range="token"`` one range per token
    over all KV heads (the paper: its outlier thresholds, or min/max without outliers; scale/offset ``(b, 1, n, 1)``),
    ``"head"`` one per token and KV head (min/max of the row after the outliers left; ``(b, h, n, 1)``).
    ``codebook`` assigns codes, ``decode_book`` reconstructs (different only with Q-Norm).
    """

    def __init__(self, bits, fraction, codebook, decode_book, heads, head_dim, per_channel, lower=None, upper=None,
                 token_range="token"):
        self.bits, self.fraction, self.h, self.d = bits, fraction, heads, head_dim
        self.token_range = token_range
        self.codebook, self.decode_book = codebook, decode_book
        self.per_channel = per_channel
        self.planes: list[torch.Tensor] = []  # packed codes, each (b, h, n, bytes) uint8 (see pack_planes)
        self.scale = self.offset = None  # per token: (b, h, n, 1) fp16; per channel: (1|b, width) fp16
        self.sparse = SparseRows(heads * head_dim) if fraction > 0 else None
        if per_channel and lower is not None:
            self._set_range(lower, upper)

    @property
    def ready(self) -> bool:
        return not self.per_channel or self.scale is not None

    def _set_range(self, lower, upper):
        """Held as fp16 offset/scale; the thresholds used later are ``offset -/+ scale``."""
        w = self.h * self.d
        self.offset = ((upper.float() + lower.float()) / 2).half().reshape(-1, w)  # (1|b, width)
        self.scale = ((upper.float() - lower.float()) / 2).half().reshape(-1, w)

    def fix_range(self, x: torch.Tensor) -> None:
        """Per-channel range from ``x (b, h, n, d)``: outlier thresholds along tokens (min/max if none)."""
        r = x.float().permute(0, 1, 3, 2).reshape(x.shape[0], self.h * self.d, -1)  # (b, width, n)
        if self.fraction > 0:
            lo, hi = outlier_thresholds(r, self.fraction, axis=-1)
        else:
            lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
        self._set_range(lo.squeeze(-1), hi.squeeze(-1))

    def __len__(self):
        return self.planes[0].shape[2] if self.planes else 0

    def append(self, x: torch.Tensor) -> None:
        """Quantize and append ``x (b, h, q, d)``."""
        b, h, q, d = x.shape
        rows = to_rows(x.float())
        if self.per_channel:
            lo = (self.offset.float() - self.scale.float()).unsqueeze(0)
            hi = (self.offset.float() + self.scale.float()).unsqueeze(0)
        elif self.fraction > 0:
            lo, hi = outlier_thresholds(rows, self.fraction, axis=-1)
        if self.sparse is not None:
            rows, sp = split_outliers(rows, lo, hi)
            self.sparse.append(sp, q, b)
        elif self.per_channel:
            rows = torch.minimum(torch.maximum(rows, lo), hi)
        if self.per_channel:
            s = self.scale.float().unsqueeze(0)
            xn = ((rows - self.offset.float().unsqueeze(0)) / torch.where(s > 0, s, torch.ones_like(s))).clamp(-1, 1)
            codes = quantize_codebook(from_rows(xn, h).contiguous(), self.codebook)
        elif self.token_range == "token":  # one range per token (rows are clamped to the thresholds: min/max = them)
            mn, mx = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)  # (q, b, 1)
            offset, scale = ((mx + mn) / 2).half(), ((mx - mn) / 2).half()
            check_fp16_finite(offset, scale)
            s = scale.float()
            xn = (rows - offset.float()) / torch.where(s > 0, s, torch.ones_like(s))
            codes = quantize_codebook(from_rows(xn, h).contiguous(), self.codebook)
            scale, offset = scale.permute(1, 2, 0).unsqueeze(-1), offset.permute(1, 2, 0).unsqueeze(-1)  # (b, 1, q, 1)
            self.scale = scale if self.scale is None else torch.cat([self.scale, scale], dim=2)
            self.offset = offset if self.offset is None else torch.cat([self.offset, offset], dim=2)
        else:
            xn, scale, offset = normalize_minmax(from_rows(rows, h).contiguous(), axis=-1)
            codes = quantize_codebook(xn, self.codebook)
            self.scale = scale if self.scale is None else torch.cat([self.scale, scale], dim=2)
            self.offset = offset if self.offset is None else torch.cat([self.offset, offset], dim=2)
        new = pack_planes(codes, self.bits)
        self.planes = new if not self.planes else [torch.cat([a, p], dim=2) for a, p in zip(self.planes, new)]

    def read(self) -> torch.Tensor:
        """All stored tokens, dequantized: ``(b, h, n, d)`` fp32 (contiguous)."""
        codes = unpack_planes(self.planes, self.bits, self.d)
        x = self.decode_book.index_select(0, codes.reshape(-1).int()).view(codes.shape)
        if self.per_channel:
            b = self.scale.shape[0]
            x = x * self.scale.float().view(b, self.h, 1, self.d) + self.offset.float().view(b, self.h, 1, self.d)
        else:
            x = x * self.scale.float() + self.offset.float()
        return self.sparse.scatter_(x) if self.sparse is not None else x

    def drop_front(self, k: int) -> None:
        self.planes = [p[:, :, k:].clone() for p in self.planes]
        if not self.per_channel:
            self.scale, self.offset = self.scale[:, :, k:].clone(), self.offset[:, :, k:].clone()
        if self.sparse is not None:
            self.sparse.drop_front(k)

    def tensors(self):
        out = [*self.planes, self.scale, self.offset, self.codebook]
        if self.decode_book is not self.codebook:
            out.append(self.decode_book)
        return out + (self.sparse.tensors() if self.sparse is not None else [])


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
            expect = torch.arange(self.start + self.n, self.start + self.n + q)
            if torch.equal(pos, expect.expand_as(pos)):
                self.n += q
                return
            self.explicit = torch.arange(self.start, self.start + self.n, dtype=torch.int32).expand(pos.shape[0], -1)
        rows = max(self.explicit.shape[0], pos.shape[0])
        self.explicit = torch.cat([self.explicit.expand(rows, -1), pos.to(torch.int32).expand(rows, -1)], dim=1)
        self.n += q

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

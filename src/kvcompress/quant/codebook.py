"""Non-uniform (codebook / "nuq", KVQuant style) quantization.

A per-layer codebook of ``2**bits`` sorted centroids is fitted offline with
weighted 1-D k-means on *normalized* values.  At runtime each vector along
``axis`` is normalized to [-1, 1] with its min/max
(``offset = (max + min) / 2``, ``scale = (max - min) / 2``), mapped to the
nearest centroid, and the codes are densely bit-packed along the last dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..registry import KVCompressError

from ._common import check_float_tensor, check_fp16_finite, normalize_axis
from .packing import pack_bits, unpack_bits, validate_bits

__all__ = [
    "fit_codebook",
    "quantize_codebook",
    "dequantize_codebook",
    "normalize_minmax",
    "CodebookQuantized",
    "quantize_with_codebook",
]


def _check_codebook(codebook: torch.Tensor) -> None:
    if not isinstance(codebook, torch.Tensor) or not codebook.dtype.is_floating_point:
        raise KVCompressError("codebook must be a floating-point torch.Tensor")
    if codebook.dim() != 1 or not 1 <= codebook.numel() <= 256:
        raise KVCompressError(
            f"codebook must be 1-D with 1..256 entries, got shape {tuple(codebook.shape)}"
        )
    if codebook.numel() > 1 and not bool((codebook[1:] >= codebook[:-1]).all()):
        raise KVCompressError("codebook must be sorted in ascending order")


def _weighted_quantiles(v: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weighted quantiles of 1-D sorted ``v`` with weights ``w`` at levels ``q`` in (0, 1)."""
    cw = torch.cumsum(w, 0)
    idx = torch.searchsorted(cw, q * cw[-1]).clamp_(max=v.numel() - 1)
    return v[idx]


def fit_codebook(
    values: torch.Tensor,
    bits: int,
    weights: Optional[torch.Tensor] = None,
    max_samples: int = 200_000,
    seed: int = 0,
    max_iter: int = 100,
) -> torch.Tensor:
    """Weighted 1-D k-means: values (N,) [, weights (N,)] -> sorted centroids (2**bits,) fp32.

    Non-finite values are dropped; if more than ``max_samples`` remain a
    uniform subsample (``torch.randperm`` seeded by ``seed``) is used.
    Initialization at weighted quantiles, then Lloyd iterations (vectorized
    assignment via ``bucketize`` on centroid midpoints); empty clusters are
    re-seeded at the worst-fit points.  If there are at most ``2**bits``
    distinct values they are returned (padded by repeating the largest).
    The result lives on ``values.device``.
    """
    bits = validate_bits(bits)
    check_float_tensor(values, "values")
    if max_samples < 1:
        raise KVCompressError(f"max_samples must be >= 1, got {max_samples}")
    device = values.device
    v = values.detach().reshape(-1).to("cpu", torch.float64)
    if weights is None:
        w = torch.ones_like(v)
    else:
        if not isinstance(weights, torch.Tensor) or weights.numel() != values.numel():
            raise KVCompressError(
                f"weights must be a tensor with {values.numel()} elements (one per value)"
            )
        w = weights.detach().reshape(-1).to("cpu", torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise KVCompressError("weights must be finite and non-negative")
    keep = torch.isfinite(v) & (w > 0)
    v, w = v[keep], w[keep]
    if v.numel() == 0:
        raise KVCompressError("no finite values with positive weight to fit a codebook on")
    if v.numel() > max_samples:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(v.numel(), generator=gen)[:max_samples]
        v, w = v[idx], w[idx]
    k = 1 << bits

    uniq = torch.unique(v)  # sorted
    if uniq.numel() <= k:
        pad = uniq[-1:].expand(k - uniq.numel())
        return torch.cat([uniq, pad]).to(device=device, dtype=torch.float32)

    order = torch.argsort(v)
    v, w = v[order], w[order]
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = _weighted_quantiles(v, w, q)
    span = float(v[-1] - v[0])
    prev_assign = None
    for _ in range(max_iter):
        assign = torch.bucketize(v, (c[:-1] + c[1:]) / 2)
        wsum = torch.zeros(k, dtype=torch.float64).scatter_add_(0, assign, w)
        wx = torch.zeros(k, dtype=torch.float64).scatter_add_(0, assign, w * v)
        new = torch.where(wsum > 0, wx / wsum.clamp_min(1e-300), c)
        empty = wsum == 0
        n_empty = int(empty.sum())
        if n_empty:
            err = w * (v - new[assign]) ** 2
            top = torch.topk(err, min(n_empty, err.numel())).indices
            if bool((err[top] > 0).all()):
                new = new.clone()
                new[empty.nonzero().squeeze(1)[: top.numel()]] = v[top]
        new, _ = torch.sort(new)
        converged = (
            n_empty == 0
            and prev_assign is not None
            and torch.equal(assign, prev_assign)
        ) or float((new - c).abs().max()) <= 1e-12 * max(span, 1e-300)
        c = new
        prev_assign = assign
        if converged:
            break
    return c.to(device=device, dtype=torch.float32)


def quantize_codebook(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes: x (any shape), sorted codebook (K,) -> uint8 codes, shape of x."""
    _check_codebook(codebook)
    check_float_tensor(x)
    cb = codebook.to(device=x.device, dtype=torch.float32)
    mids = (cb[:-1] + cb[1:]) / 2
    return torch.bucketize(x.float(), mids).to(torch.uint8)


def dequantize_codebook(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """LUT gather: codes (any shape, int) -> codebook[codes] (same shape, codebook dtype)."""
    _check_codebook(codebook)
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise KVCompressError(f"codes must have an integer dtype, got {codes.dtype}")
    return codebook.to(codes.device)[codes.long()]


def normalize_minmax(
    x: torch.Tensor, axis: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vector min/max normalization along ``axis``.

    Returns ``(xn, scale, offset)``: ``xn`` fp32 of x's shape, roughly in [-1, 1];
    ``scale`` (half-range) and ``offset`` (center) fp16 with ``x.shape[axis] -> 1``.
    ``xn`` is computed with the fp16-rounded stats; constant vectors give ``xn = x - offset``.
    """
    check_float_tensor(x)
    a = normalize_axis(axis, x.dim())
    if x.shape[a] == 0:
        raise KVCompressError(f"cannot normalize along axis {a} of length 0")
    xf = x.float()
    mn = xf.amin(dim=a, keepdim=True)
    mx = xf.amax(dim=a, keepdim=True)
    offset = ((mx + mn) / 2).half()
    scale = ((mx - mn) / 2).half()
    check_fp16_finite(offset, scale)
    s = scale.float()
    xn = (xf - offset.float()) / torch.where(s > 0, s, torch.ones_like(s))
    return xn, scale, offset


@dataclass
class CodebookQuantized:
    """Codebook-quantized tensor.

    Attributes:
        packed: uint8 (*shape[:-1], ceil(shape[-1]*bits/8)) packed codes (last dim).
        scale: fp16 half-range, ``shape`` with ``shape[axis] -> 1``.
        offset: fp16 center, same shape as ``scale``.
        codebook: (K,) sorted centroids, K <= 2**bits; a shared reference,
            NOT counted by :meth:`nbytes` / :meth:`tensors` -- its owner
            (e.g. the per-layer cache) counts it once.
        bits, shape, axis (non-negative reduced dim).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    codebook: torch.Tensor
    bits: int
    shape: Tuple[int, ...]
    axis: int

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes, shape ``shape``."""
        return unpack_bits(self.packed, self.bits, self.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reconstruct ``codebook[code] * scale + offset``, shape ``shape``."""
        cb = self.codebook.to(device=self.packed.device, dtype=torch.float32)
        xn = cb[self.codes().long()]
        return (xn * self.scale.float() + self.offset.float()).to(dtype)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Yield the per-tensor storage (packed, scale, offset); excludes the shared codebook."""
        yield self.packed
        yield self.scale
        yield self.offset

    def nbytes(self) -> int:
        """Bytes of codes + stats (codebook excluded, see class docstring)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantize_with_codebook(
    x: torch.Tensor, codebook: torch.Tensor, axis: int, bits: Optional[int] = None
) -> CodebookQuantized:
    """Normalize ``x`` per vector along ``axis`` to [-1, 1], map to nearest centroid, pack.

    ``bits`` defaults to ``ceil(log2(len(codebook)))`` (min 1); the codebook
    must have at most ``2**bits`` entries.
    """
    _check_codebook(codebook)
    if bits is None:
        bits = max(1, math.ceil(math.log2(codebook.numel())))
    bits = validate_bits(bits)
    if codebook.numel() > (1 << bits):
        raise KVCompressError(
            f"codebook has {codebook.numel()} entries, more than 2**bits = {1 << bits}"
        )
    xn, scale, offset = normalize_minmax(x, axis)
    codes = quantize_codebook(xn, codebook)
    return CodebookQuantized(
        packed=pack_bits(codes, bits, validate=False),
        scale=scale,
        offset=offset,
        codebook=codebook,
        bits=bits,
        shape=tuple(x.shape),
        axis=normalize_axis(axis, x.dim()),
    )

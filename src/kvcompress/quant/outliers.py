"""Dense-and-sparse decomposition: isolate outliers in an exact sparse part."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch

from ..registry import KVCompressError

from ._common import check_float_tensor, normalize_axis

__all__ = ["SparseOutliers", "split_outliers", "outlier_thresholds"]


@dataclass
class SparseOutliers:
    """Sparse outlier values of a tensor of shape ``shape``.

    Attributes:
        values: fp16 (nnz,) outlier values.
        indices: int32 (nnz,) flat (row-major) indices into the original tensor.
        shape: original tensor shape.
    """

    values: torch.Tensor
    indices: torch.Tensor
    shape: Tuple[int, ...]

    @property
    def nnz(self) -> int:
        """Number of stored outliers."""
        return self.values.numel()

    def tensors(self) -> Iterator[torch.Tensor]:
        """Yield the held tensors (values, indices)."""
        yield self.values
        yield self.indices

    def nbytes(self) -> int:
        """Bytes held: 2 * nnz (fp16 values) + 4 * nnz (int32 indices)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def scatter_into(self, dense: torch.Tensor) -> torch.Tensor:
        """Return a copy of ``dense`` (shape ``shape``) with the outlier values written back."""
        if tuple(dense.shape) != tuple(self.shape):
            raise KVCompressError(
                f"dense has shape {tuple(dense.shape)}, expected {tuple(self.shape)}"
            )
        out = dense.reshape(-1).clone()
        out[self.indices.to(device=out.device, dtype=torch.long)] = self.values.to(
            device=out.device, dtype=out.dtype
        )
        return out.reshape(self.shape)


def split_outliers(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> Tuple[torch.Tensor, SparseOutliers]:
    """Split ``x`` into (dense, sparse).

    Elements with ``x > upper`` or ``x < lower`` (thresholds broadcastable to x)
    go to the sparse part (stored as fp16, exact for fp16 inputs); in ``dense``
    (same shape/dtype as x) they are clamped to [lower, upper].
    """
    check_float_tensor(x)
    if x.numel() >= 2**31:
        raise KVCompressError("x has too many elements for int32 flat indices")
    lower = torch.as_tensor(lower, device=x.device)
    upper = torch.as_tensor(upper, device=x.device)
    try:
        torch.broadcast_shapes(lower.shape, upper.shape, x.shape)
    except RuntimeError as e:
        raise KVCompressError(f"thresholds are not broadcastable to x: {e}") from None
    if torch.broadcast_shapes(lower.shape, upper.shape, x.shape) != x.shape:
        raise KVCompressError("thresholds must broadcast to x's shape without enlarging it")
    mask = (x > upper) | (x < lower)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    sparse = SparseOutliers(
        values=x.reshape(-1)[idx].to(torch.float16),
        indices=idx.to(torch.int32),
        shape=tuple(x.shape),
    )
    dense = torch.minimum(torch.maximum(x, lower.to(x.dtype)), upper.to(x.dtype))
    return dense, sparse


def outlier_thresholds(
    x: torch.Tensor, fraction: float, axis: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-vector thresholds along ``axis``: returns (lower, upper), x.shape with axis -> 1.

    With ``n = x.shape[axis]`` and ``m = round(n * fraction / 2)`` (half up), ``upper`` is
    the m-th largest value and ``lower`` the m-th smallest (exact order
    statistics), so at most m values per vector lie strictly above / below
    (fewer with ties); m is capped at ``(n - 1) // 2`` so lower <= upper.
    ``fraction == 0`` gives -inf / +inf.
    """
    check_float_tensor(x)
    a = normalize_axis(axis, x.dim())
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise KVCompressError(f"fraction must be in [0, 1), got {fraction}")
    n = x.shape[a]
    if n == 0:
        raise KVCompressError(f"cannot compute thresholds along axis {a} of length 0")
    stat_shape = list(x.shape)
    stat_shape[a] = 1
    if fraction == 0.0:
        lo = torch.full(stat_shape, float("-inf"), dtype=x.dtype, device=x.device)
        hi = torch.full(stat_shape, float("inf"), dtype=x.dtype, device=x.device)
        return lo, hi
    m = min(math.floor(n * fraction / 2 + 0.5 + 1e-9), (n - 1) // 2)
    xf = x.float()
    lower = torch.kthvalue(xf, m + 1, dim=a, keepdim=True).values
    upper = torch.kthvalue(xf, n - m, dim=a, keepdim=True).values
    return lower.to(x.dtype), upper.to(x.dtype)

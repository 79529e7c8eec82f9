"""Small shared helpers for :mod:`kvcompress.quant` (private)."""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from ..registry import KVCompressError


def normalize_axis(axis: int, ndim: int) -> int:
    """Map ``axis`` (possibly negative) to ``0..ndim-1`` or raise KVCompressError."""
    try:
        a = operator.index(axis)
    except TypeError:
        raise KVCompressError(f"axis must be an integer, got {axis!r}") from None
    if not -ndim <= a < ndim:
        raise KVCompressError(f"axis {a} is out of range for a tensor with {ndim} dims")
    return a % ndim


def check_float_tensor(x: torch.Tensor, name: str = "x") -> None:
    """Raise KVCompressError unless ``x`` is a floating-point tensor with >= 1 dim."""
    if not isinstance(x, torch.Tensor):
        raise KVCompressError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise KVCompressError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise KVCompressError(f"{name} must have at least one dimension")


def group_layout(
    shape: Tuple[int, ...], axis: int, group_size: Optional[int]
) -> Tuple[int, Tuple[int, ...]]:
    """Validate grouping of ``shape[axis]``; return (group_size, grouped_shape).

    ``grouped_shape`` splits ``axis`` into ``(n_groups, group_size)``.
    """
    length = shape[axis]
    if length == 0:
        raise KVCompressError(f"cannot quantize along axis {axis} of length 0")
    if group_size is None:
        g = length
    else:
        try:
            g = operator.index(group_size)
        except TypeError:
            raise KVCompressError(f"group_size must be an int or None, got {group_size!r}") from None
        if g <= 0:
            raise KVCompressError(f"group_size must be positive, got {g}")
        if length % g != 0:
            raise KVCompressError(
                f"group_size {g} does not divide the length {length} of axis {axis}"
            )
    grouped = tuple(shape[:axis]) + (length // g, g) + tuple(shape[axis + 1:])
    return g, grouped


def check_fp16_finite(*tensors: torch.Tensor) -> None:
    """Raise KVCompressError if any fp16 statistic is inf/NaN (input non-finite or beyond fp16 range)."""
    for t in tensors:
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise KVCompressError(
                "quantization statistics are not finite in fp16: input contains inf/NaN "
                "or values beyond the fp16 range (|x| > 65504)"
            )

"""Asymmetric min/max uniform quantization (KIVI style) with dense bit packing.

Layout
------
For ``x`` of shape ``S`` quantized along ``axis`` (the *reduced* dim) with
``group_size`` ``G`` (``None`` = whole axis is one group, ``n_groups = S[axis] // G``):

* ``packed``: uint8, shape ``S[:-1] + (ceil(S[-1]*bits/8),)`` -- codes always keep
  the original element order and are packed along the **last** dim, whatever
  ``axis`` is (works for per-token ``axis=-1`` and per-channel ``axis=-2``).
* ``scale``, ``zero``: fp16, shape ``S`` with ``S[axis]`` replaced by ``n_groups``.
  Without groups that dim is 1, so the stats broadcast directly against ``x``;
  with groups use :meth:`UniformQuantized.expanded_stats`.

``x ~= code * scale + zero`` with ``code = clamp(round((x - zero) / scale), 0, 2**bits - 1)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from ._common import check_float_tensor, check_fp16_finite, group_layout, normalize_axis
from .packing import pack_bits, packed_nbytes, unpack_bits, validate_bits

__all__ = ["UniformQuantized", "quantize_uniform"]

#: CPU tensors of four dims quantized along axis 2 or 3 go through one numba call
#: (:func:`kvcompress.kernels.uniform_cpu.quantize_uniform_4d`, the same codes and statistics bit for bit) when numba
#: is there; tests switch it off to compare with the torch path
NUMBA_QUANTIZE = True


@dataclass
class UniformQuantized:
    """Uniformly quantized tensor (see module docstring for the layout).

    Attributes:
        packed: uint8 (*shape[:-1], ceil(shape[-1]*bits/8)) packed codes.
        scale: fp16 stats, ``shape`` with ``shape[axis]`` -> n_groups.
        zero: fp16 stats (group minimum), same shape as ``scale``.
        bits: code width, 1..8.
        shape: original tensor shape.
        axis: non-negative index of the reduced (statistics) dim.
        group_size: group length along ``axis`` or None (whole axis).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: Tuple[int, ...]
    axis: int
    group_size: Optional[int] = None

    @property
    def _group(self) -> int:
        return self.shape[self.axis] if self.group_size is None else self.group_size

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes, shape ``shape``."""
        return unpack_bits(self.packed, self.bits, self.shape[-1])

    def expanded_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) as fp32, expanded to the full ``shape``."""
        g = self._group
        s = self.scale.float().repeat_interleave(g, dim=self.axis)
        z = self.zero.float().repeat_interleave(g, dim=self.axis)
        return s, z

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reconstruct a tensor of shape ``shape`` and dtype ``dtype``."""
        g = self._group
        a = self.axis
        grouped = tuple(self.shape[:a]) + (self.shape[a] // g, g) + tuple(self.shape[a + 1:])
        codes = self.codes().float().reshape(grouped)
        out = codes * self.scale.float().unsqueeze(a + 1) + self.zero.float().unsqueeze(a + 1)
        return out.reshape(self.shape).to(dtype)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Yield the tensors actually held (packed, scale, zero)."""
        yield self.packed
        yield self.scale
        yield self.zero

    def nbytes(self) -> int:
        """Bytes held: sum of numel * element_size over :meth:`tensors`."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _fp16_round_down(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> largest fp16 value <= v (elementwise)."""
    h = v.half()
    lower = torch.nextafter(h, torch.full_like(h, float("-inf")))
    return torch.where(h.float() > v, lower, h)


def _fp16_round_up(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> smallest fp16 value >= v (elementwise)."""
    h = v.half()
    upper = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < v, upper, h)


def quantize_uniform(
    x: torch.Tensor, bits: int, axis: int, group_size: Optional[int] = None
) -> UniformQuantized:
    """Asymmetric min/max quantization of ``x`` (any shape) along ``axis``.

    Stats are computed in fp32 per group of ``group_size`` consecutive elements
    along ``axis`` (``None``: the whole axis), then stored as fp16 with ``zero``
    rounded down and ``scale`` rounded up so the fp16 grid still covers
    [min, max]; codes use the stored stats, hence
    ``|x - dequantize()| <= scale / 2`` (+ fp32 rounding) elementwise.
    Constant groups whose value is fp16-representable get ``scale = 0`` and
    reconstruct exactly (no NaN: division uses a safe scale of 1).
    """
    bits = validate_bits(bits)
    check_float_tensor(x)
    shape = tuple(x.shape)
    a = normalize_axis(axis, x.dim())
    g, grouped = group_layout(shape, a, group_size)
    fast = _quantize_with_numba(x, bits, a, g)
    if fast is not None:
        packed, scale16, zero16 = fast
        return UniformQuantized(packed=packed, scale=scale16, zero=zero16, bits=bits, shape=shape, axis=a,
                                group_size=group_size if group_size is None else g)
    qmax = (1 << bits) - 1

    xg = x.float().reshape(grouped)
    mn, mx = torch.aminmax(xg, dim=a + 1)  # one pass for both
    zero16 = _fp16_round_down(mn)
    scale32 = (mx - zero16.float()) / qmax
    scale16 = _fp16_round_up(scale32)
    check_fp16_finite(zero16, scale16)

    s = scale16.float().unsqueeze(a + 1)
    z = zero16.float().unsqueeze(a + 1)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    # the same operations as round((x - z) / s), in place on one temporary (a prompt's prefill quantizes every layer)
    codes = torch.sub(xg, z).div_(safe_s).round_().clamp_(0, qmax).to(torch.uint8).reshape(shape)
    packed = pack_bits(codes, bits, validate=False)
    return UniformQuantized(
        packed=packed,
        scale=scale16,
        zero=zero16,
        bits=bits,
        shape=shape,
        axis=a,
        group_size=group_size if group_size is None else g,
    )


def _quantize_with_numba(x: torch.Tensor, bits: int, axis: int, group: int):
    """``(packed, scale, zero)`` of :func:`quantize_uniform` by one numba call where it serves (a CPU tensor ``(b, h,
    n, d)`` quantized along axis 2 or 3, numba importable, a little-endian machine), else None -- also where a group
    is not finite, so that the torch path raises its error."""
    if not NUMBA_QUANTIZE or x.dim() != 4 or axis < 2 or x.device.type != "cpu" or sys.byteorder != "little":
        return None
    from .. import kernels

    if not kernels.AVAILABLE:
        return None
    b, h, n, d = x.shape
    x32 = x.detach().to(torch.float32).contiguous()
    stats = (b, h, n // group, d) if axis == 2 else (b, h, n, d // group)
    packed = torch.empty((b, h, n, packed_nbytes(d, bits)), dtype=torch.uint8)
    scale = torch.empty(stats, dtype=torch.float16)
    zero = torch.empty(stats, dtype=torch.float16)
    ok = kernels._uniform_cpu.quantize_uniform_4d(x32.numpy(), bits, axis == 2, group, packed.numpy(),
                                                  _bits16(scale), _bits16(zero))
    return (packed, scale, zero) if ok else None


def _bits16(t: torch.Tensor) -> np.ndarray:
    """A 2-byte float tensor's memory as uint16 numpy (its bits)."""
    return t.view(torch.int16).numpy().view(np.uint16)

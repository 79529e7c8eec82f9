"""Uniform min/max quantization (KIVI's layout) on the CPU in one numba call: the arithmetic of
:func:`kvcompress.quant.quantize_uniform`, operation for operation, so the codes and the fp16 statistics are the same
bit for bit.

Where it serves: every prompt and every flush of KIVI, LogQuant and the stores built on KIVI's codes (MiniCache's, the
eviction methods' ``kivi`` storage). The torch path spends ~30 small ops per call (``aminmax`` over a strided axis,
the fp16 rounding by ``nextafter``, sub/div/round/clamp, then :func:`kvcompress.quant.pack_bits`); a 1k prompt's
60 calls took ~80 ms of a ~3.2 s prefill (session 29). Here one pass per group finds the range, one pass writes the
codes, and each row is packed as it is made.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from .kvquant_cpu import _ROUNDER, _f16, _half_bits, _key


@njit(cache=True, inline="always")
def _down(v):
    """The fp16 bits (uint16) of the largest fp16 value <= ``v`` (float32, finite or not): ``v`` rounded to the
    nearest, then one step down where that went up (``torch.nextafter`` toward -inf: +-0 steps to the smallest
    negative subnormal)."""
    h = _half_bits(v)
    step = np.uint16(0x8001) if h & np.uint16(0x7FFF) == 0 else (h + np.uint16(1) if h & np.uint16(0x8000)
                                                                  else h - np.uint16(1))
    return step if _f16(h) > v else h


@njit(cache=True, inline="always")
def _up(v):
    """The fp16 bits (uint16) of the smallest fp16 value >= ``v`` (float32): :func:`_down`'s mirror."""
    h = _half_bits(v)
    step = np.uint16(0x0001) if h & np.uint16(0x7FFF) == 0 else (h - np.uint16(1) if h & np.uint16(0x8000)
                                                                  else h + np.uint16(1))
    return step if _f16(h) < v else h


@njit(cache=True, inline="always")
def _pack_row(codes, bits, out):
    """``codes (d,)`` (uint8, each < 2**bits) packed into ``out (ceil(d*bits/8),)`` uint8 as
    :func:`kvcompress.quant.pack_bits` lays them out: a little-endian bit stream, code ``i`` at bits ``[i*bits,
    (i+1)*bits)``, the last byte's unused bits zero."""
    d = codes.shape[0]
    if bits == 8:
        for i in range(d):
            out[i] = codes[i]
    elif bits == 4 and d % 2 == 0:
        for u in range(d // 2):
            out[u] = codes[2 * u] | (codes[2 * u + 1] << 4)
    elif bits == 2 and d % 4 == 0:
        for u in range(d // 4):
            out[u] = codes[4 * u] | (codes[4 * u + 1] << 2) | (codes[4 * u + 2] << 4) | (codes[4 * u + 3] << 6)
    else:  # any width and length: the bit stream a code at a time
        acc = uint64(0)
        have = 0
        o = 0
        for i in range(d):
            acc |= uint64(codes[i]) << uint64(have)
            have += bits
            while have >= 8:
                out[o] = acc & uint64(255)
                acc >>= uint64(8)
                have -= 8
                o += 1
        if have > 0:
            out[o] = acc & uint64(255)


@njit(cache=True, inline="always")
def _stats(lo_keys, hi_keys, qmax, z16, s16, zs, divs):
    """KIVI's fp16 statistics of groups whose float32 ranges are ``[lo, hi]`` (given as :func:`_key` keys, ``(k,)``
    int32): zero rounded down to fp16 (``z16``, uint16 bits; ``zs`` its float32), scale ``(hi - zero) / qmax`` rounded
    up so the grid covers the range (``s16``), ``divs`` the scale or 1 where it is 0 (a constant group). Returns
    False where a statistic is not finite in fp16 (a NaN in the group, or a value beyond fp16's range)."""
    bad = 0
    for i in range(uint64(lo_keys.shape[0])):
        lo = np.int32(_key(lo_keys[i])).view(np.float32)
        hi = np.int32(_key(hi_keys[i])).view(np.float32)
        zb = _down(lo)
        z = _f16(zb)
        sb = _up((hi - z) / qmax)
        sc = _f16(sb)
        z16[i], s16[i], zs[i] = zb, sb, z
        divs[i] = sc if sc > 0 else np.float32(1.0)
        bad += 1 if ((zb & np.uint16(0x7C00)) == np.uint16(0x7C00)) | ((sb & np.uint16(0x7C00)) == np.uint16(0x7C00)) \
            else 0
    return bad == 0


@njit(cache=True, inline="always")
def _code(v, z, div, qmax):
    """``clamp(round((v - z) / div), 0, qmax)`` as a uint8 (clamped first, then rounded: the same for a finite
    quotient, and the rounding trick needs the clamped range)."""
    y = min(max((v - z) / div, np.float32(0.0)), qmax)
    return np.uint8((y + _ROUNDER) - _ROUNDER)


@njit(cache=True, error_model="numpy")
def quantize_uniform_4d(x, bits, per_channel, group, packed, scale_bits, zero_bits):
    """:func:`kvcompress.quant.quantize_uniform` of ``x (b, h, n, d)`` float32 (C-contiguous) along the tokens
    (``per_channel``: axis 2, groups of ``group`` tokens; statistics ``(b, h, n // group, d)``) or the channels (axis
    3, groups of ``group`` channels; statistics ``(b, h, n, d // group)``), written into ``packed (b, h, n,
    ceil(d*bits/8))`` uint8 and ``scale_bits``/``zero_bits`` (the fp16 statistics' bits, uint16, C-contiguous).
    Returns False -- the outputs then mean nothing -- where a group holds a NaN or a statistic is not finite in fp16
    (the torch path raises there). A group's range is found over :func:`_key` keys; where its minimum is a zero of
    both signs, the zero point is -0.0 (torch's keeps the sign of the first zero it met): the same value, codes and
    dequantization. ``error_model="numpy"``: no zero-divisor check, which kept the division loops scalar (divisors
    are ``qmax`` or a nonzero scale)."""
    b, h, n, d = x.shape
    qmax = np.float32((1 << bits) - 1)
    keys = x.view(np.int32)
    codes = np.empty(d, np.uint8)
    D, G = uint64(d), uint64(group)
    k = d if per_channel else n * (d // group)  # groups per (batch row, head)
    lo_k = np.empty(k, np.int32)
    hi_k = np.empty(k, np.int32)
    z16 = np.empty(k, np.uint16)
    s16 = np.empty(k, np.uint16)
    zs = np.empty(k, np.float32)
    divs = np.empty(k, np.float32)
    for bi in range(b):
        for hi in range(h):
            zero_out = zero_bits[bi, hi].reshape(-1)
            scale_out = scale_bits[bi, hi].reshape(-1)
            if per_channel:
                for g in range(n // group):
                    t0 = g * group
                    for c in range(D):
                        lo_k[c] = hi_k[c] = _key(keys[bi, hi, t0, c])
                    for t in range(t0 + 1, t0 + group):
                        for c in range(D):
                            kc = _key(keys[bi, hi, t, c])
                            lo_k[c] = min(lo_k[c], kc)
                            hi_k[c] = max(hi_k[c], kc)
                    if not _stats(lo_k, hi_k, qmax, z16, s16, zs, divs):
                        return False
                    for c in range(D):
                        zero_out[uint64(g) * D + c] = z16[c]
                        scale_out[uint64(g) * D + c] = s16[c]
                    for t in range(t0, t0 + group):
                        for c in range(D):
                            codes[c] = _code(x[bi, hi, t, c], zs[c], divs[c], qmax)
                        _pack_row(codes, bits, packed[bi, hi, t])
            else:
                ng = d // group
                for t in range(n):
                    for g in range(ng):
                        c0 = uint64(g) * G
                        lo = hi_ = _key(keys[bi, hi, t, c0])
                        for c in range(c0 + uint64(1), c0 + G):
                            kc = _key(keys[bi, hi, t, c])
                            lo = min(lo, kc)
                            hi_ = max(hi_, kc)
                        lo_k[t * ng + g] = lo
                        hi_k[t * ng + g] = hi_
                if not _stats(lo_k, hi_k, qmax, z16, s16, zs, divs):
                    return False
                for i in range(uint64(k)):
                    zero_out[i] = z16[i]
                    scale_out[i] = s16[i]
                for t in range(n):
                    for g in range(ng):
                        c0 = uint64(g) * G
                        z, div = zs[t * ng + g], divs[t * ng + g]
                        for c in range(c0, c0 + G):
                            codes[c] = _code(x[bi, hi, t, c], z, div, qmax)
                    _pack_row(codes, bits, packed[bi, hi, t])
    return True

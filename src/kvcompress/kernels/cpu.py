"""Fused attention over KIVI's packed codes on the CPU (numba): ``(acc, m, l)`` straight from the codes.

What is read, per KV head and token: the packed key codes (``ceil(d*kbits/8)`` bytes), the packed value codes and the
value's fp16 scale/zero (one pair per ``Gv`` channels); per group of ``G`` tokens the keys' fp16 scale/zero per
channel. Nothing is dequantized to memory:

* **keys** (per channel): ``s_r(t) = q_r . (code_t * ks_g + kz_g) = (q_r * ks_g) . code_t + q_r . kz_g``. The scaled
  query ``q_r * ks_g`` and the bias ``q_r . kz_g`` are formed once per group (``rows * d`` operations per ``G``
  tokens), so a token costs one unpack plus one dot product per query row.
* **keys per token** (``kpt``: LogQuant's ``key_axis="token"``, scale/zero per token and group of channels, like the
  values): ``s_r(t) = sum_j ks_tj (q_r . code_tj) + sum_j kz_tj * Q_rj`` with ``Q_rj`` the query summed over key group
  ``j`` (once per range): the codes are unpacked times their scale, as values are, and the zeros add one small dot
  product per token; blocks are :data:`TOKEN_BLOCK` tokens.
* **values** (per token, ``v = code * scale + zero`` per group of ``Gv`` channels): a token's codes are unpacked
  times their scale once and added with the softmax weight to every query row; the zero points are summed per
  (row, value group) on the side (``sum_t w_t * zero_t``) and added at the end, so ``v`` is never formed.
* **per-token multipliers** (optional, MiniCache's merged layers: a token's key and value are magnitudes times a
  stored direction): the block's scores are multiplied by the key multipliers before the softmax and its weights by
  the value multipliers after it (the row sums ``l`` take the weights before that).
* **one pass serves every query row** of the KV group (GQA/MQA heads and multi-token queries folded into ``rows``).
* **the residual**: keys and values leave KIVI's fp16 residual at different times; the kernel takes the first ``nk``
  keys and ``nv`` values from codes and the rest from float tails, so one call covers a whole layer.
* **unpacking**: codes are unpacked in *planes*: for 1/2/4/8 bits, byte ``u`` holds channels ``u*per .. u*per+per-1``
  (``per = 8 // bits``); plane ``k`` takes bits ``[k*bits, (k+1)*bits)`` of every byte, so each plane is one
  contiguous, vectorizable loop over the row's bytes that reads each byte once (3/5/6/7 bits: ``bits`` bytes form a
  word of 8 codes, plane ``k`` = code ``k`` of every word). The query and the statistics are permuted into the same
  plane order once per group, so no code is ever moved. 2/4-bit rows of whole 8-byte runs (``d`` a multiple of
  32 / 16) are unpacked eight bytes per instruction in vector registers (:mod:`.simd`, :func:`_unpack_vec`); codes
  per token then come out as values (scale and zero applied), so no zero-point sums are kept. Other 2-bit rows are
  too short for LLVM's vectorized loop body, so each byte is looked up in a 256-entry table of its four codes (one
  16-byte copy, channel order; the value scale is applied per group afterwards).
* **registers**: the scores are reduced eight tokens at a time with the query held in registers, and a block's
  value accumulators stay in registers over its tokens (64 channels at a time, :func:`_scores_vec`,
  :func:`_values_vec`). Where numba's target has AVX-512 (:data:`~.lookup.WIDE`) these pieces and the unpacking
  use sixteen lanes (``*16``), elsewhere eight (``*8``): the KIVI-4 kernel ~1.1x faster on an Intel Xeon (session
  31). Not measured on AMD Zen 4, which splits a 512-bit operation in two; a sixteen-lane value path measured there
  in session 30 was no faster than eight lanes.
* **values fused** (sixteen lanes, :func:`_values_fused`): where a value row is a whole number of 16-byte runs and the
  target has AVX-512, a token's value codes are converted, scaled and shifted in registers and added straight into
  the accumulators of up to four query rows, with no scratch row between (its scale and zero picked per run by one
  ``vpermps``, :func:`~.simd.pick16`). Bit for bit what unpacking to a scratch row and adding from it gives; the
  kernel 1.07-1.10x faster on a Zen 5 host (session 36). Fusing the keys the same way (eight tokens' partial sums for
  three rows held at once) spilled registers; the kernel ran 1.09-1.14x slower than session 35's: not taken.
  Compile time (session 37): numba inlines by copying IR, once per literal variant and call site, so the path is
  inlined only into the whole-block loop (one copy per width and row count, any row length) and called from the
  general loop (:func:`_values_fused_call`); ``kivi_layer_serial``'s first call with an empty numba cache 331 s ->
  107 s, the kernel 0.96-1.01x as fast as with session 36's 48 copies.
* **softmax** is online per block of one key group (max, rescale only when the max grows), with a vectorizable
  polynomial ``exp`` (relative error < 2e-7) instead of one libm call per score; padding (``valid``) is masked.
* **threads**: the context of every (batch, KV head) is split into token ranges (multiples of ``G``) that run under
  ``numba.prange``; each returns its own ``(acc, m, l)`` and a second parallel loop merges them by log-sum-exp
  (flash-decoding). With one thread a serial twin of the same code runs (no thread pool launch).

fp16 statistics are passed as their raw ``uint16`` bits (numba has no CPU float16) and decoded in the kernel.
Shapes are in :func:`kivi_attention`; everything is fp32 inside.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, uint64

from .lookup import WIDE
from .simd import (add8, add16, codes8, codes16, fma8, fma16, halves16, hmax8, hsum8x8, join8, load8, load8_1d, load16,
                   max8, mul8, mul16, pick16, splat8, splat16, store8, store16, where8)

#: LLVM fast-math flags: reassociation lets dot products vectorize; no ``nnan``/``ninf`` (-inf marks empty rows)
_FM = {"reassoc", "contract", "nsz", "arcp"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_TWO112 = np.float32(2.0**112)


# --------------------------------------------------------------------------------------------------------------------
# Layout: where each channel lands when a row of codes is unpacked in planes
# --------------------------------------------------------------------------------------------------------------------


def plane_layout(bits: int, d: int) -> tuple[int, int]:
    """``(per, units)``: codes per unit (a byte for 1/2/4/8 bits, ``bits`` bytes otherwise) and units per row of ``d``
    codes (the last unit may be padded with zero codes)."""
    if 8 % bits == 0:
        return 8 // bits, -(-d * bits // 8)
    return 8, -(-d // 8)


def plane_channels(bits: int, d: int) -> np.ndarray:
    """``(per * units,)`` int32: the channel at each position of an unpacked row, -1 for padding. Rows are unpacked
    plane-major: position ``k * units + u`` holds code ``k`` of unit ``u``, channel ``u * per + k``."""
    per, units = plane_layout(bits, d)
    pos = np.arange(per * units)
    chan = (pos % units) * per + pos // units
    return np.where(chan < d, chan, -1).astype(np.int32)


def unpacked_channels(bits: int, d: int) -> np.ndarray:
    """``(positions,)`` int32: the channel at each position of a row of ``d`` codes as the kernel unpacks it, -1 for
    padding. Plane order (:func:`plane_channels`), except 2 bits on a row that :func:`vector_planes` does not take:
    channel order there (:func:`_unpack_2bit`, a table lookup per byte: byte ``u`` holds channels ``4u .. 4u+3``)."""
    if bits == 2 and not vector_planes(2, d):
        pos = np.arange(4 * plane_layout(2, d)[1])
        return np.where(pos < d, pos, -1).astype(np.int32)
    return plane_channels(bits, d)


def vector_planes(bits: int, d: int) -> bool:
    """Whether a row of ``d`` codes is unpacked eight bytes at a time in vector registers (:func:`_unpack_vec`): 2 or
    4 bits and a whole number of 8-byte runs per row (``d`` a multiple of 32 / 16)."""
    return bits in (2, 4) and plane_layout(bits, d)[1] % 8 == 0


def value_layout_ok(bits: int, d: int, group: int) -> bool:
    """True when every unit of a value row lies inside one value group (``group`` a multiple of the codes per unit,
    ``d`` a multiple of ``group``), so a unit's codes share one scale: what the kernel needs for values."""
    per, _ = plane_layout(bits, d)
    return group > 0 and d % group == 0 and group % per == 0


# --------------------------------------------------------------------------------------------------------------------
# Block pieces: each handles one block of tokens (one key group) per call
# --------------------------------------------------------------------------------------------------------------------
#
# Written for LLVM's loop vectorizer (numba runs no SLP vectorizer); every choice below was measured on a 64-channel row:
# * indices are uint64: numba wraps negative signed indices, and that select blocks vectorization (35 -> 5 ns/row);
# * one loop per bit plane with a constant shift: a variable shift, or two stores per iteration, keep a loop scalar;
# * no call with array arguments inside a per-token loop: numba increfs/decrefs (atomically) every array it hands to
#   an inlined helper, which cost more than the arithmetic; so helpers take a whole block.

_0, _1, _2, _3, _4, _5, _6, _7 = (np.uint64(i) for i in range(8))
#: tokens per block when the keys are quantized per token (per-channel keys: one key group per block)
TOKEN_BLOCK = 32
TOKEN_BLOCK_U = np.uint64(TOKEN_BLOCK)
_64, _63 = np.uint64(64), np.uint64(63)
_8, _16, _24, _32, _40, _48, _56 = (np.uint64(i) for i in range(8, 64, 8))


@njit(cache=True, inline="always")
def _aligned(n):
    """An uninitialized float32 ``(n,)`` array whose first element is 64-byte aligned (a cache line). numba aligns the
    arrays it allocates to 32 bytes only, and a sixteen-lane (64-byte) load or store that straddles two cache lines is
    split in two: the KIVI kernel with its scratch rows aligned ran ~1.2x faster than with numba's (session 32)."""
    m = uint64(n)
    buf = np.empty(m + _16, np.float32)
    skip = ((_64 - (uint64(buf.ctypes.data) & _63)) & _63) >> _2
    return buf[skip:skip + m]


@njit(cache=True, inline="always")
def _scratch(rows, cols):
    """:func:`_aligned` as ``(rows, cols)``: every row 64-byte aligned too when ``cols`` is a multiple of 16."""
    r, c = uint64(rows), uint64(cols)
    return _aligned(r * c).reshape((r, c))


@njit(cache=True, inline="always")
def _scratch3(n0, n1, n2):
    """:func:`_aligned` as ``(n0, n1, n2)``."""
    a, b, c = uint64(n0), uint64(n1), uint64(n2)
    return _aligned(a * b * c).reshape((a, b, c))


@njit(cache=True, fastmath=_FM, inline="always")
def _unpack_block(src, ta, i0, i1, bits, units, su, out):
    """``out[i] (per * units,)`` = the codes of packed row ``src[ta + i]`` (``src (n, nbytes) uint8``) for ``i0 <= i <
    i1``, plane-major (code ``k`` of unit ``u`` at ``k * units + u``), each times ``su[i, u]`` (the value scale of the
    unit; ones for keys), in scalar plane loops. 3/5/6/7 bits: ``bits`` bytes = a word of 8 codes. 2 bits here only
    for rows in plane order (:func:`vector_planes`) whose value groups the vector unpack cannot take; other 2-bit rows
    go through :func:`_unpack_2bit`."""
    if bits == 4:
        for i in range(i0, i1):
            t = ta + i
            for u in range(units):
                out[i, u] = np.float32(np.int32(src[t, u]) & 15) * su[i, u]
            for u in range(units):
                out[i, units + u] = np.float32(np.int32(src[t, u]) >> 4) * su[i, u]
    elif bits == 8:
        for i in range(i0, i1):
            t = ta + i
            for u in range(units):
                out[i, u] = np.float32(src[t, u]) * su[i, u]
    elif bits == 2:
        for i in range(i0, i1):
            t = ta + i
            for k in range(4):
                for u in range(units):
                    out[i, uint64(k) * units + u] = np.float32((np.int32(src[t, u]) >> (2 * k)) & 3) * su[i, u]
    elif bits == 1:
        for i in range(i0, i1):
            t = ta + i
            for k in range(8):
                for u in range(units):
                    out[i, uint64(k) * units + u] = np.float32((np.int32(src[t, u]) >> k) & 1) * su[i, u]
    else:  # 3, 5, 6, 7 bits: `bits` bytes hold 8 codes (the row's last word may be cut short)
        mask = (1 << bits) - 1
        nbytes, width = uint64(src.shape[1]), uint64(bits)
        for i in range(i0, i1):
            t = ta + i
            for u in range(units):
                w = np.int64(0)
                for j in range(width):
                    if u * width + j < nbytes:
                        w |= np.int64(src[t, u * width + j]) << (np.int64(j) * 8)
                f = su[i, u]
                for k in range(8):
                    out[i, uint64(k) * units + u] = np.float32((w >> (k * bits)) & mask) * f


@njit(cache=True, fastmath=_FM, inline="always")
def _unpack_vec(src, ta, nt, bits, units, scales, zeros, ngroups, run_group, out):
    """:func:`_unpack_vec16` where :data:`~.lookup.WIDE` (AVX-512) and ``units`` is a multiple of 16, else
    :func:`_unpack_vec8`."""
    if WIDE and units % _16 == 0:
        _unpack_vec16(src, ta, nt, bits, units, scales, zeros, ngroups, run_group, out)
    else:
        _unpack_vec8(src, ta, nt, bits, units, scales, zeros, ngroups, run_group, out)


@njit(cache=True, fastmath=_FM, inline="always")
def _unpack_vec16(src, ta, nt, bits, units, scales, zeros, ngroups, run_group, out):
    """:func:`_unpack_vec8` sixteen bytes at a time (``units`` a multiple of 16): plane ``k`` of bytes ``a .. a+15``
    as one sixteen-lane vector; per token the scale and zero vectors join those of the two 8-byte runs."""
    for i in range(nt):
        t = ta + i
        if ngroups == 0:
            for a in range(_0, units, _16):
                if bits == 4:
                    store16(codes16(src, t, a, 0, 15), out, i, a)
                    store16(codes16(src, t, a, 4, 15), out, i, units + a)
                else:
                    store16(codes16(src, t, a, 0, 3), out, i, a)
                    store16(codes16(src, t, a, 2, 3), out, i, units + a)
                    store16(codes16(src, t, a, 4, 3), out, i, _2 * units + a)
                    store16(codes16(src, t, a, 6, 3), out, i, _3 * units + a)
        else:
            for a in range(_0, units, _16):
                j0, j1 = i * ngroups + run_group[a >> _3], i * ngroups + run_group[(a >> _3) + _1]
                sv = join8(splat8(scales[j0]), splat8(scales[j1]))
                zv = join8(splat8(zeros[j0]), splat8(zeros[j1]))
                if bits == 4:
                    store16(fma16(codes16(src, t, a, 0, 15), sv, zv), out, i, a)
                    store16(fma16(codes16(src, t, a, 4, 15), sv, zv), out, i, units + a)
                else:
                    store16(fma16(codes16(src, t, a, 0, 3), sv, zv), out, i, a)
                    store16(fma16(codes16(src, t, a, 2, 3), sv, zv), out, i, units + a)
                    store16(fma16(codes16(src, t, a, 4, 3), sv, zv), out, i, _2 * units + a)
                    store16(fma16(codes16(src, t, a, 6, 3), sv, zv), out, i, _3 * units + a)


@njit(cache=True, fastmath=_FM, inline="always")
def _unpack_vec8(src, ta, nt, bits, units, scales, zeros, ngroups, run_group, out):
    """:func:`_unpack_block` for 2 or 4 bits with ``units`` a multiple of 8 (:func:`vector_planes`), eight bytes at a
    time in vector registers (:mod:`.simd`): plane ``k`` of bytes ``a .. a+7`` of row ``src[ta + i]`` goes to ``out[i,
    k * units + a ..]``. ``ngroups == 0``: the codes as they are (keys per channel); else (codes per token) the values
    themselves, ``code * scales[i * ngroups + j] + zeros[i * ngroups + j]``, ``j = run_group[a // 8]`` the group of
    the run of bytes (:func:`_run_groups`; a table, not a division: ~1.5x faster). ~4x faster than the scalar plane
    loops on a 4-bit row (session 16)."""
    for i in range(nt):
        t = ta + i
        if ngroups == 0:
            for a in range(_0, units, _8):
                if bits == 4:
                    store8(codes8(src, t, a, 0, 15), out, i, a)
                    store8(codes8(src, t, a, 4, 15), out, i, units + a)
                else:
                    store8(codes8(src, t, a, 0, 3), out, i, a)
                    store8(codes8(src, t, a, 2, 3), out, i, units + a)
                    store8(codes8(src, t, a, 4, 3), out, i, _2 * units + a)
                    store8(codes8(src, t, a, 6, 3), out, i, _3 * units + a)
        else:
            for a in range(_0, units, _8):
                j = i * ngroups + run_group[a >> _3]
                sv, zv = splat8(scales[j]), splat8(zeros[j])
                if bits == 4:
                    store8(fma8(codes8(src, t, a, 0, 15), sv, zv), out, i, a)
                    store8(fma8(codes8(src, t, a, 4, 15), sv, zv), out, i, units + a)
                else:
                    store8(fma8(codes8(src, t, a, 0, 3), sv, zv), out, i, a)
                    store8(fma8(codes8(src, t, a, 2, 3), sv, zv), out, i, units + a)
                    store8(fma8(codes8(src, t, a, 4, 3), sv, zv), out, i, _2 * units + a)
                    store8(fma8(codes8(src, t, a, 6, 3), sv, zv), out, i, _3 * units + a)


@njit(cache=True, inline="always")
def _run_groups(bits, units, group):
    """``(units // 8,)`` uint64: the group of ``group`` channels that each run of 8 bytes of a row lies in (for
    :func:`_unpack_vec`; ``group`` a multiple of the run's ``8 * 8 // bits`` channels)."""
    out = np.empty(units // _8, np.uint64)
    for k in range(units // _8):
        out[k] = k * _8 * _codes_per_unit(bits) // group
    return out


@njit(cache=True, inline="always")
def _vector_planes(bits, units):
    """Kernel-side twin of :func:`vector_planes` (``units``: packing units per row)."""
    return (bits == 4 or bits == 2) and units % _8 == 0


@njit(cache=True, inline="always")
def _codes_per_unit(bits):
    """Codes per packing unit (uint64): a byte's ``8 // bits`` for 1/2/4/8 bits, a word of 8 codes otherwise (the
    kernel-side twin of :func:`plane_layout`'s ``per``)."""
    return uint64(8 // bits if 8 % bits == 0 else 8)


#: byte -> its four 2-bit codes as float32, in bit order, each row read as one 16-byte complex128 (a single copy)
_LUT2 = np.array([[(b >> s) & 3 for s in (0, 2, 4, 6)] for b in range(256)], np.float32).view(np.complex128)[:, 0]


@njit(cache=True, fastmath=_FM, inline="always")
def _unpack_2bit(src, ta, nt, units, scales, ngroups, group, out):
    """``out[i, 4u .. 4u+3]`` = the four 2-bit codes of byte ``u`` of packed row ``src[ta + i]`` for ``i < nt``, in
    channel order (:func:`unpacked_channels`), one 16-byte table copy per byte; with ``ngroups > 0`` (codes quantized
    per token) each group of ``group`` channels is then multiplied by its scale ``scales[i * ngroups + j]``. ``out``
    float32 ``(>= nt, 4 * units)``. Why not planes (:func:`_unpack_block`): a 2-bit row of 64 channels is 16 bytes,
    and a 16-iteration plane loop is too short for LLVM's vectorized loop body, so the four plane loops ran scalar
    (the whole kernel took 1.3x longer at 2 bits, session 12)."""
    oc = out.view(np.complex128)
    for i in range(nt):
        t = ta + i
        for u in range(units):
            oc[i, u] = _LUT2[src[t, u]]
        for j in range(ngroups):
            s_ = scales[i * ngroups + j]
            for c in range(j * group, j * group + group):
                out[i, c] *= s_


@njit(cache=True, fastmath=_FM, inline="always")
def _unpack_per_token(src, ta, nt, bits, units, scales, ngroups, group, unit_scales, out):
    """Rows ``ta .. ta + nt`` of codes quantized per token (values; keys with ``kpt``), each group of ``group``
    channels times its scale ``scales[i * ngroups + j]``: 2 bits by :func:`_unpack_2bit` (channel order); 4 bits in two
    groups with the scale chosen per byte in the plane loops; other widths by filling ``unit_scales (>= nt, units)``
    with each packing unit's scale and :func:`_unpack_block` (plane order)."""
    if bits == 2 and not _vector_planes(bits, units):
        _unpack_2bit(src, ta, nt, units, scales, ngroups, group, out)
    elif bits == 4 and ngroups == 2:  # d = 2 * group (SmolLM2: 64 = 2 x 32): the scale is a select inside the planes
        ug = group // _2  # bytes per group; filling the unit scales took loops of ug = 16 stores, left scalar
        for i in range(nt):
            t = ta + i
            a, b = scales[_2 * i], scales[_2 * i + _1]
            for u in range(units):
                out[i, u] = np.float32(np.int32(src[t, u]) & 15) * (a if u < ug else b)
            for u in range(units):
                out[i, units + u] = np.float32(np.int32(src[t, u]) >> 4) * (a if u < ug else b)
    else:
        ug = group // _codes_per_unit(bits)  # packing units per group
        for i in range(nt):
            for j in range(ngroups):
                s_ = scales[i * ngroups + j]
                for u in range(j * ug, j * ug + ug):
                    unit_scales[i, u] = s_
        _unpack_block(src, ta, _0, nt, bits, units, unit_scales, out)


@njit(cache=True, fastmath=_FM, inline="always")
def _scores_block(qs, bias, kf, i0, i1, sc, pk):
    """``sc[r, i] = bias[r] + qs[r] . kf[i, :pk]`` for ``i0 <= i < i1``: one pass over a token's unpacked key serves
    up to four rows (independent accumulators, no serial reduction chain)."""
    rows = uint64(qs.shape[0])
    for i in range(i0, i1):
        for r0 in range(_0, rows, _4):
            nr = min(_4, rows - r0)
            r1, r2, r3 = r0 + _1, r0 + _2, r0 + _3
            if nr == 4:
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for p in range(pk):
                    x = kf[i, p]
                    s0 += qs[r0, p] * x
                    s1 += qs[r1, p] * x
                    s2 += qs[r2, p] * x
                    s3 += qs[r3, p] * x
                sc[r0, i], sc[r1, i], sc[r2, i], sc[r3, i] = s0 + bias[r0], s1 + bias[r1], s2 + bias[r2], s3 + bias[r3]
            elif nr == 3:
                s0 = s1 = s2 = np.float32(0.0)
                for p in range(pk):
                    x = kf[i, p]
                    s0 += qs[r0, p] * x
                    s1 += qs[r1, p] * x
                    s2 += qs[r2, p] * x
                sc[r0, i], sc[r1, i], sc[r2, i] = s0 + bias[r0], s1 + bias[r1], s2 + bias[r2]
            elif nr == 2:
                s0 = s1 = np.float32(0.0)
                for p in range(pk):
                    x = kf[i, p]
                    s0 += qs[r0, p] * x
                    s1 += qs[r1, p] * x
                sc[r0, i], sc[r1, i] = s0 + bias[r0], s1 + bias[r1]
            else:
                s0 = np.float32(0.0)
                for p in range(pk):
                    s0 += qs[r0, p] * kf[i, p]
                sc[r0, i] = s0 + bias[r0]


@njit(cache=True, fastmath=_FM, inline="always")
def _values_block(vf, i0, i1, sc, vze, ngv, acc, zacc, pv):
    """``acc[r, :pv] += sc[r, i] * vf[i, :pv]`` and ``zacc[r, j] += sc[r, i] * vze[i * ngv + j]`` for ``i0 <= i < i1``.
    Two tokens per pass over ``acc`` (half its loads and stores), one row at a time: a loop with one store stream
    vectorizes."""
    rows = uint64(acc.shape[0])
    i = i0
    while i + _1 < i1:
        i1_ = i + _1
        for r in range(rows):
            w0, w1 = sc[r, i], sc[r, i1_]
            for p in range(pv):
                acc[r, p] += w0 * vf[i, p] + w1 * vf[i1_, p]
        i += _2
    if i < i1:
        for r in range(rows):
            w0 = sc[r, i]
            for p in range(pv):
                acc[r, p] += w0 * vf[i, p]
    for i in range(i0, i1):
        for r in range(rows):
            w = sc[r, i]
            for j in range(ngv):
                zacc[r, j] += w * vze[i * ngv + j]


@njit(cache=True, fastmath=_FM, inline="always")
def _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i, c):
    """``q . kf[i, c:c+64]`` as one vector of partial sums (8 lanes), the 64 query values given as eight vectors."""
    s0 = fma8(q0, load8(kf, i, c), mul8(q1, load8(kf, i, c + _8)))
    s1 = fma8(q2, load8(kf, i, c + _16), mul8(q3, load8(kf, i, c + _24)))
    s0 = fma8(q4, load8(kf, i, c + _32), fma8(q5, load8(kf, i, c + _40), s0))
    s1 = fma8(q6, load8(kf, i, c + _48), fma8(q7, load8(kf, i, c + _56), s1))
    return add8(s0, s1)


@njit(cache=True, fastmath=_FM, inline="always")
def _scores_vec8(qs, bias, kf, nt, sc, pk):
    """:func:`_scores_block` for ``pk`` a multiple of 64, eight tokens at a time in vector registers (:mod:`.simd`):
    per row and 64 channels the query stays in eight registers, each token's dot product is a vector of partial sums,
    and eight tokens' vectors are reduced together into one vector of scores (:func:`hsum8x8`). The last ``nt % 8``
    tokens take :func:`_scores_block`."""
    rows = uint64(qs.shape[0])
    n8 = nt - nt % _8
    for r in range(rows):
        for c in range(_0, pk, _64):
            q0, q1, q2, q3 = load8(qs, r, c), load8(qs, r, c + _8), load8(qs, r, c + _16), load8(qs, r, c + _24)
            q4, q5, q6, q7 = load8(qs, r, c + _32), load8(qs, r, c + _40), load8(qs, r, c + _48), load8(qs, r, c + _56)
            base = splat8(bias[r])
            for i in range(_0, n8, _8):
                if c > 0:
                    base = load8(sc, r, i)
                s = hsum8x8(_dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _1, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _2, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _3, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _4, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _5, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _6, c),
                            _dot8(q0, q1, q2, q3, q4, q5, q6, q7, kf, i + _7, c))
                store8(add8(s, base), sc, r, i)
    if n8 < nt:
        _scores_block(qs, bias, kf, n8, nt, sc, pk)


@njit(cache=True, fastmath=_FM, inline="always")
def _dot16(q0, q1, q2, q3, kf, i, c):
    """``q . kf[i, c:c+64]`` as eight lanes of partial sums, the 64 query values given as four 16-lane vectors."""
    s0 = fma16(q0, load16(kf, i, c), mul16(q1, load16(kf, i, c + _16)))
    s1 = fma16(q2, load16(kf, i, c + _32), mul16(q3, load16(kf, i, c + _48)))
    return halves16(add16(s0, s1))


@njit(cache=True, fastmath=_FM, inline="always")
def _scores_vec16(qs, bias, kf, nt, sc, pk):
    """:func:`_scores_vec8` with sixteen-lane vectors (four per 64 channels): half the multiply-adds and loads of
    eight lanes, where a 512-bit operation costs what a 256-bit one does (:data:`~.lookup.WIDE`)."""
    rows = uint64(qs.shape[0])
    n8 = nt - nt % _8
    for r in range(rows):
        for c in range(_0, pk, _64):
            q0, q1, q2, q3 = load16(qs, r, c), load16(qs, r, c + _16), load16(qs, r, c + _32), load16(qs, r, c + _48)
            base = splat8(bias[r])
            for i in range(_0, n8, _8):
                if c > 0:
                    base = load8(sc, r, i)
                s = hsum8x8(_dot16(q0, q1, q2, q3, kf, i, c), _dot16(q0, q1, q2, q3, kf, i + _1, c),
                            _dot16(q0, q1, q2, q3, kf, i + _2, c), _dot16(q0, q1, q2, q3, kf, i + _3, c),
                            _dot16(q0, q1, q2, q3, kf, i + _4, c), _dot16(q0, q1, q2, q3, kf, i + _5, c),
                            _dot16(q0, q1, q2, q3, kf, i + _6, c), _dot16(q0, q1, q2, q3, kf, i + _7, c))
                store8(add8(s, base), sc, r, i)
    if n8 < nt:
        _scores_block(qs, bias, kf, n8, nt, sc, pk)


@njit(cache=True, fastmath=_FM, inline="always")
def _scores_vec(qs, bias, kf, nt, sc, pk):
    """:func:`_scores_vec16` where :data:`~.lookup.WIDE` (AVX-512), else :func:`_scores_vec8`."""
    if WIDE:
        _scores_vec16(qs, bias, kf, nt, sc, pk)
    else:
        _scores_vec8(qs, bias, kf, nt, sc, pk)


@njit(cache=True, fastmath=_FM, inline="always")
def _values_vec8(vf, nt, sc, acc, pv):
    """``acc[r, :pv] += sc[r, i] * vf[i, :pv]`` for ``i < nt``, ``pv`` a multiple of 64, in vector registers
    (:mod:`.simd`): per row and 64 channels, eight accumulators stay in registers over the block's tokens (one load
    and one store of ``acc`` per block instead of per token)."""
    rows = uint64(acc.shape[0])
    for r in range(rows):
        for c in range(_0, pv, _64):
            a0, a1, a2, a3 = load8(acc, r, c), load8(acc, r, c + _8), load8(acc, r, c + _16), load8(acc, r, c + _24)
            a4, a5 = load8(acc, r, c + _32), load8(acc, r, c + _40)
            a6, a7 = load8(acc, r, c + _48), load8(acc, r, c + _56)
            for i in range(nt):
                w = splat8(sc[r, i])
                a0, a1 = fma8(w, load8(vf, i, c), a0), fma8(w, load8(vf, i, c + _8), a1)
                a2, a3 = fma8(w, load8(vf, i, c + _16), a2), fma8(w, load8(vf, i, c + _24), a3)
                a4, a5 = fma8(w, load8(vf, i, c + _32), a4), fma8(w, load8(vf, i, c + _40), a5)
                a6, a7 = fma8(w, load8(vf, i, c + _48), a6), fma8(w, load8(vf, i, c + _56), a7)
            store8(a0, acc, r, c), store8(a1, acc, r, c + _8), store8(a2, acc, r, c + _16), store8(a3, acc, r, c + _24)
            store8(a4, acc, r, c + _32), store8(a5, acc, r, c + _40), store8(a6, acc, r, c + _48)
            store8(a7, acc, r, c + _56)


@njit(cache=True, fastmath=_FM, inline="always")
def _values_vec16(vf, nt, sc, acc, pv):
    """:func:`_values_vec8` with four sixteen-lane accumulators per 64 channels (see :func:`_scores_vec16`)."""
    rows = uint64(acc.shape[0])
    for r in range(rows):
        for c in range(_0, pv, _64):
            a0, a1, a2, a3 = load16(acc, r, c), load16(acc, r, c + _16), load16(acc, r, c + _32), load16(acc, r, c + _48)
            for i in range(nt):
                w = splat16(sc[r, i])
                a0, a1 = fma16(w, load16(vf, i, c), a0), fma16(w, load16(vf, i, c + _16), a1)
                a2, a3 = fma16(w, load16(vf, i, c + _32), a2), fma16(w, load16(vf, i, c + _48), a3)
            store16(a0, acc, r, c), store16(a1, acc, r, c + _16), store16(a2, acc, r, c + _32)
            store16(a3, acc, r, c + _48)


@njit(cache=True, fastmath=_FM, inline="always")
def _values_vec(vf, nt, sc, acc, pv):
    """:func:`_values_vec16` where :data:`~.lookup.WIDE` (AVX-512), else :func:`_values_vec8`."""
    if WIDE:
        _values_vec16(vf, nt, sc, acc, pv)
    else:
        _values_vec8(vf, nt, sc, acc, pv)


@njit(cache=True, fastmath=_FM, inline="always")
def _load4(arr, r, c):
    """``arr[r, c : c + 64]`` as four sixteen-lane vectors."""
    return load16(arr, r, c), load16(arr, r, c + _16), load16(arr, r, c + _32), load16(arr, r, c + _48)


@njit(cache=True, fastmath=_FM, inline="always")
def _store4(x0, x1, x2, x3, arr, r, c):
    """``arr[r, c : c + 64]`` = the four sixteen-lane vectors ``x0 .. x3``."""
    store16(x0, arr, r, c), store16(x1, arr, r, c + _16), store16(x2, arr, r, c + _32), store16(x3, arr, r, c + _48)


@njit(cache=True, inline="always")
def _fused_values_apply(vunits, ngv, pv):
    """Whether :func:`_values_fused` serves a value row of ``vunits`` bytes in ``ngv`` groups, unpacked to ``pv``
    positions: AVX-512 (:data:`~.lookup.WIDE`), whole 16-byte runs, at most 16 groups (:func:`~.simd.pick16`) and 64
    positions at a time. The one check of both call sites; each has already checked that the codes are 2 or 4 bits in
    vector planes (:func:`_vector_planes`)."""
    return WIDE and vunits % _16 == 0 and ngv <= _16 and pv % _64 == 0


@njit(cache=True, fastmath=_FM, inline="always")
def _values_fused(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, pv):
    """:func:`_unpack_vec16` and :func:`_values_vec16` in one pass, no scratch row: ``acc[r, :pv] += sc[r, i] *
    (code * scale + zero)`` for the tokens ``ta .. ta + nt`` of ``vp``, the codes converted in registers. For
    :data:`~.lookup.WIDE` only, 2 or 4 ``bits``, ``units`` a multiple of 16, ``pv`` of 64, ``ngroups <= 16``, and
    ``scales``/``zeros`` readable 16 entries past a token's first (:func:`~.simd.pick16`). Query rows four at a time
    (:func:`_values_rows`), so a token's codes are converted once per four rows; the accumulators (four per row and
    64 positions) stay in registers over the tokens. The same arithmetic as unpacking to a scratch row and adding
    from it (bit-identical results); the whole kernel 1.07-1.10x faster on a Zen 5 host (session 36). Each inlined copy
    costs numba ~3-5 s to compile: inline it in one place per width (see the module docstring)."""
    rows = uint64(acc.shape[0])
    for r0 in range(_0, rows, _4):
        nr = min(_4, rows - r0)
        for c in range(_0, pv, _64):
            # literal row counts: LLVM drops the unused rows' accumulators
            _values_rows_any(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, nr)


@njit(cache=True, fastmath=_FM)
def _values_fused_call(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, pv):
    """:func:`_values_fused` compiled once on its own and called, ``bits`` a value: for the general block loop of
    :func:`_attend_range` (masks, multipliers, partial blocks). Inlined there like in :func:`_whole_blocks` it
    doubled numba's compile time (session 37). Called, it measured 0.98x the inlined copy on masked blocks there, and
    0.94-0.97x in the whole-block loop, which therefore keeps its inlined copies."""
    _values_fused(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, pv)


@njit(cache=True, fastmath=_FM, inline="always")
def _values_rows_any(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, nr):
    """:func:`_values_rows` with ``nr`` (1-4, a variable) made a literal."""
    if nr == 4:
        _values_rows(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, 4)
    elif nr == 3:
        _values_rows(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, 3)
    elif nr == 2:
        _values_rows(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, 2)
    else:
        _values_rows(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, 1)


@njit(cache=True, fastmath=_FM, inline="always")
def _values_rows(vp, ta, nt, bits, units, scales, zeros, ngroups, run_group, sc, acc, r0, c, nr):
    """:func:`_values_fused` for rows ``r0 .. r0 + nr - 1`` (``nr`` <= 4, a literal) and unpacked positions ``c .. c +
    63``. Position ``p`` is code ``p // units`` (the plane) of byte ``p % units``, so each sixteen positions are one
    plane of a run of sixteen bytes; the run's two 8-byte halves take their value groups' scale and zero
    (:func:`~.simd.pick16`). Four (run, plane) pairs of any ``units``: rows of 16 or 32 bytes read one run twice or
    four times per token. Special-casing them (one load and one pick per run, session 36) tripled the copies numba
    compiles; without it the kernel measured 0.96-1.01x as fast (2-bit rows and single query rows lose most; session
    37)."""
    mask = 15 if bits == 4 else 3
    w = uint64(bits)
    a0, a1, a2, a3 = c % units, (c + _16) % units, (c + _32) % units, (c + _48) % units
    k0, k1, k2, k3 = c // units, (c + _16) // units, (c + _32) // units, (c + _48) // units
    s0, s1, s2, s3 = k0 * w, k1 * w, k2 * w, k3 * w
    g0, g1, g2, g3 = run_group[a0 >> _3], run_group[a1 >> _3], run_group[a2 >> _3], run_group[a3 >> _3]
    h0, h1 = run_group[(a0 >> _3) + _1], run_group[(a1 >> _3) + _1]
    h2, h3 = run_group[(a2 >> _3) + _1], run_group[(a3 >> _3) + _1]
    zero = splat16(np.float32(0.0))
    r1, r2, r3 = r0 + _1, r0 + _2, r0 + _3
    x00, x01, x02, x03 = _load4(acc, r0, c)
    x10 = x11 = x12 = x13 = x20 = x21 = x22 = x23 = x30 = x31 = x32 = x33 = zero
    if nr > 1:
        x10, x11, x12, x13 = _load4(acc, r1, c)
    if nr > 2:
        x20, x21, x22, x23 = _load4(acc, r2, c)
    if nr > 3:
        x30, x31, x32, x33 = _load4(acc, r3, c)
    for i in range(nt):
        t, j = ta + i, i * ngroups
        v0 = fma16(codes16(vp, t, a0, s0, mask), pick16(scales, j, g0, h0), pick16(zeros, j, g0, h0))
        v1 = fma16(codes16(vp, t, a1, s1, mask), pick16(scales, j, g1, h1), pick16(zeros, j, g1, h1))
        v2 = fma16(codes16(vp, t, a2, s2, mask), pick16(scales, j, g2, h2), pick16(zeros, j, g2, h2))
        v3 = fma16(codes16(vp, t, a3, s3, mask), pick16(scales, j, g3, h3), pick16(zeros, j, g3, h3))
        x = splat16(sc[r0, i])
        x00, x01, x02, x03 = fma16(x, v0, x00), fma16(x, v1, x01), fma16(x, v2, x02), fma16(x, v3, x03)
        if nr > 1:
            x = splat16(sc[r1, i])
            x10, x11, x12, x13 = fma16(x, v0, x10), fma16(x, v1, x11), fma16(x, v2, x12), fma16(x, v3, x13)
        if nr > 2:
            x = splat16(sc[r2, i])
            x20, x21, x22, x23 = fma16(x, v0, x20), fma16(x, v1, x21), fma16(x, v2, x22), fma16(x, v3, x23)
        if nr > 3:
            x = splat16(sc[r3, i])
            x30, x31, x32, x33 = fma16(x, v0, x30), fma16(x, v1, x31), fma16(x, v2, x32), fma16(x, v3, x33)
    _store4(x00, x01, x02, x03, acc, r0, c)
    if nr > 1:
        _store4(x10, x11, x12, x13, acc, r1, c)
    if nr > 2:
        _store4(x20, x21, x22, x23, acc, r2, c)
    if nr > 3:
        _store4(x30, x31, x32, x33, acc, r3, c)


@njit(cache=True, fastmath=_FM, inline="always")
def _value_zeros(sc, nt, vze, ngv, zacc):
    """``zacc[r, j] += sc[r, i] * vze[i * ngv + j]`` for ``i < nt``: the zero points' share, per row and value group."""
    rows = uint64(zacc.shape[0])
    for i in range(nt):
        for r in range(rows):
            w = sc[r, i]
            for j in range(ngv):
                zacc[r, j] += w * vze[i * ngv + j]


@njit(cache=True, fastmath=_FM, inline="always")
def _dense_scores(q, kr, off, i0, i1, sc):
    """``sc[r, i] = q[r] . kr[off + i - i0]`` for ``i0 <= i < i1``: keys still held as floats (the residual)."""
    rows, d = uint64(q.shape[0]), uint64(q.shape[1])
    for i in range(i0, i1):
        t = off + i - i0
        for r in range(rows):
            s = np.float32(0.0)
            for c in range(d):
                s += q[r, c] * kr[t, c]
            sc[r, i] = s


@njit(cache=True, fastmath=_FM, inline="always")
def _dense_values(vr, off, i0, i1, sc, accn):
    """``accn[r] += sc[r, i] * vr[off + i - i0]`` for ``i0 <= i < i1``: values still held as floats."""
    rows, d = uint64(accn.shape[0]), uint64(accn.shape[1])
    for i in range(i0, i1):
        t = off + i - i0
        for r in range(rows):
            w = sc[r, i]
            for c in range(d):
                accn[r, c] += w * vr[t, c]


@njit(cache=True, inline="always")
def _halves(src, start, n, bits_buf, f, out):
    """Decode the ``n`` fp16 values ``src[start:start + n]`` (given as ``uint16`` bits) into ``out[:n]`` (float32):
    sign to bit 31, exponent and mantissa shifted into place, then times 2**112 to rebias the exponent. Exact for
    normal and subnormal numbers (the statistics are finite by construction); branch-free, so it vectorizes.
    ``bits_buf``: uint32 scratch of length >= n, ``f`` the same memory viewed as float32; ``start``, ``n``: uint64."""
    for i in range(n):
        h = np.uint32(src[start + i])
        bits_buf[i] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
    for i in range(n):
        out[i] = f[i] * _TWO112


@njit(cache=True, fastmath=_FM, inline="always")
def _softmax_block(sc, nt, ok, m, l, acc, zacc, accn, ebits, scale):
    """Online softmax over the block's scores ``sc (rows, >= nt)``: mask tokens with ``ok[i] == 0``, raise ``m`` to the
    block max (rescaling ``acc``, ``zacc``, ``accn``, ``l`` only when it grows), turn ``sc`` into weights ``exp(sc -
    m) * ok`` and add them to ``l``. exp: range reduction to ``|f| <= ln2/2``, a degree-6 polynomial, the power of two
    written as bits (``ebits``: int32 scratch, ``scale`` the same memory as float32); vectorizes, relative error <
    2e-7; arguments are clamped to [-87, 0] (below -87: ~1e-38; a masked token's score may exceed the max: it gets
    exp(0) * 0)."""
    rows = uint64(sc.shape[0])
    n8 = nt - nt % _8
    ninf = splat8(np.float32(-np.inf))
    for r in range(rows):
        bv = ninf  # the block max, eight lanes at a time (a scalar max under a condition does not vectorize)
        for i in range(_0, n8, _8):
            bv = max8(where8(load8_1d(ok, i), load8(sc, r, i), ninf), bv)
        bm = hmax8(bv)
        for i in range(n8, nt):
            if ok[i] != 0.0:
                bm = max(bm, sc[r, i])
        if bm > m[r]:
            alpha = np.float32(0.0) if m[r] == -np.inf else np.float32(np.exp(m[r] - bm))
            for p in range(uint64(acc.shape[1])):
                acc[r, p] *= alpha
            for c in range(uint64(accn.shape[1])):
                accn[r, c] *= alpha
            for j in range(uint64(zacc.shape[1])):
                zacc[r, j] *= alpha
            l[r] *= alpha
            m[r] = bm
        mr = m[r]
        for i in range(nt):
            v = min(max(sc[r, i] - mr, np.float32(-87.0)), np.float32(0.0))  # <= 0 also for masked tokens
            k = np.float32(np.floor(v * _LOG2E + np.float32(0.5)))
            f = v - k * _LN2_HI - k * _LN2_LO
            p = np.float32(1.0 / 720.0)
            p = p * f + np.float32(1.0 / 120.0)
            p = p * f + np.float32(1.0 / 24.0)
            p = p * f + np.float32(1.0 / 6.0)
            p = p * f + np.float32(0.5)
            p = p * f + np.float32(1.0)
            p = p * f + np.float32(1.0)
            sc[r, i] = p * ok[i]
            ebits[i] = (np.int32(k) + 127) << 23
        total = np.float32(0.0)
        for i in range(nt):
            sc[r, i] *= scale[i]
            total += sc[r, i]
        l[r] += total


@njit(cache=True, fastmath=_FM)
def _whole_blocks(bits, q, qp, kp, ks, kz, kchan, vp, vs, vz, ngv, vrun, g0, g1, m, l, acc):
    """Blocks ``g0 <= g < g1`` of :data:`TOKEN_BLOCK` tokens, each whole, visible and held as codes: keys per channel
    (statistics per group of :data:`TOKEN_BLOCK` tokens) and values per token (``ngv`` groups, ``vrun``: their
    :func:`_run_groups`), both ``bits`` (2 or 4) wide and unpacked in vector registers, ``d`` a multiple of 64;
    ``qp (rows, pk)`` the query in the keys' unpacked order. Adds to the online softmax's ``m``, ``l`` and ``acc
    (rows, pv)`` (plane order) of :func:`_attend_range`, which calls it for a range's leading whole blocks before
    anything else is added. The same pieces as its block loop, compiled on their own, without the mask, residual,
    multiplier and per-token-key branches (~1.2x faster than the general loop, both with sixteen lanes, on an Intel
    Xeon; session 31)."""
    if bits == 4:  # a literal width: LLVM folds the width's branches out of the loops
        _whole_blocks_of(4, q, qp, kp, ks, kz, kchan, vp, vs, vz, ngv, vrun, g0, g1, m, l, acc)
    else:
        _whole_blocks_of(2, q, qp, kp, ks, kz, kchan, vp, vs, vz, ngv, vrun, g0, g1, m, l, acc)


@njit(cache=True, fastmath=_FM, inline="always")
def _whole_blocks_of(bits, q, qp, kp, ks, kz, kchan, vp, vs, vz, ngv, vrun, g0, g1, m, l, acc):
    """:func:`_whole_blocks` for a literal ``bits``."""
    rows, d = uint64(q.shape[0]), uint64(q.shape[1])
    pk, pv = uint64(kchan.shape[0]), uint64(acc.shape[1])
    kunits, vunits = uint64(kp.shape[1]), uint64(vp.shape[1])
    nt = TOKEN_BLOCK_U
    hbits = np.empty(max(d, nt * ngv), np.uint32)
    hfloat = hbits.view(np.float32)
    kstat, kzero, kscale_p = np.empty(d, np.float32), np.empty(d, np.float32), np.empty(pk, np.float32)
    qs, bias = _scratch(rows, pk), np.empty(rows, np.float32)
    kf, vf = _scratch(nt, pk), _scratch(nt, pv)
    sc, ones = _scratch(rows, nt), np.ones(nt, np.float32)
    vsc, vze = np.zeros(nt * ngv + _16, np.float32), np.zeros(nt * ngv + _16, np.float32)  # + 16: pick16
    ebits = np.empty(nt, np.int32)
    escale = ebits.view(np.float32)
    none = np.zeros((rows, 0), np.float32)  # no zero-point sums, no values held as floats yet
    krun = np.empty(0, np.uint64)
    for g in range(uint64(g0), uint64(g1)):
        ta = g * nt
        _halves(ks, g * d, d, hbits, hfloat, kstat)
        _halves(kz, g * d, d, hbits, hfloat, kzero)
        for p in range(pk):
            c = kchan[p]
            kscale_p[p] = kstat[c] if c >= 0 else np.float32(0.0)
        for r in range(rows):
            sb = np.float32(0.0)
            for c in range(d):
                sb += q[r, c] * kzero[c]
            bias[r] = sb
            for p in range(pk):
                qs[r, p] = qp[r, p] * kscale_p[p]
        _unpack_vec(kp, ta, nt, bits, kunits, kscale_p, kscale_p, _0, krun, kf)
        _scores_vec(qs, bias, kf, nt, sc, pk)
        _softmax_block(sc, nt, ones, m, l, acc, none, none, ebits, escale)
        _halves(vs, ta * ngv, nt * ngv, hbits, hfloat, vsc)
        _halves(vz, ta * ngv, nt * ngv, hbits, hfloat, vze)
        if _fused_values_apply(vunits, ngv, pv):
            _values_fused(vp, ta, nt, bits, vunits, vsc, vze, ngv, vrun, sc, acc, pv)
        else:
            _unpack_vec(vp, ta, nt, bits, vunits, vsc, vze, ngv, vrun, vf)
            _values_vec(vf, nt, sc, acc, pv)


# --------------------------------------------------------------------------------------------------------------------
# One token range of one (batch, KV head)
# --------------------------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FM)
def _attend_range(q, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                  valid, mult, t0, t1, acc_out, m_out, l_out):
    """Attention of ``q (rows, d)`` over tokens ``[t0, t1)`` (``t0`` a multiple of the token block: ``kgroup``, or
    :data:`TOKEN_BLOCK` with ``kpt``) of one (batch, KV head).

    Keys: tokens ``< nk`` from codes ``kp (>= nk, kbytes)`` uint8 with per-channel statistics ``ks``/``kz (n_groups *
    d,)`` uint16 (fp16 bits, groups of ``kgroup`` tokens, flattened) -- or, with ``kpt`` (keys per token, like the
    values), per-token statistics ``(>= nk * d / kgroup,)`` for groups of ``kgroup`` channels -- the rest from ``kr
    (*, d)`` float32 (token ``t`` at ``kr[t - nk]``). Values: tokens ``< nv`` from codes ``vp (>= nv, vbytes)`` with
    per-token statistics ``vs``/``vz (* d / vgroup,)`` (groups of ``vgroup`` channels, flattened), the rest from ``vr``
    (``vr[t - nv]``). ``kchan``/``vchan``: :func:`unpacked_channels` of the key / value bits; ``valid (n,)`` bool or empty
    (all valid); ``mult (2, n)`` float32 or ``(2, 0)`` (none): token ``t``'s key is ``mult[0, t]`` times the stored
    one and its value ``mult[1, t]`` times (MiniCache's magnitudes over its stored directions). Writes ``acc_out
    (rows, d)``, ``m_out``, ``l_out (rows,)``.
    """
    nrows, nd = q.shape
    rows, d = uint64(nrows), uint64(nd)
    pk, pv = uint64(kchan.shape[0]), uint64(vchan.shape[0])
    kper = _codes_per_unit(kbits)
    kunits = pk // kper
    vper = _codes_per_unit(vbits)
    vunits = pv // vper
    gv = uint64(vgroup)
    ngv = d // gv
    tblock = TOKEN_BLOCK if kpt else kgroup
    grp, start, stop = uint64(tblock), uint64(t0), uint64(t1)
    kcodes, vcodes = uint64(nk), uint64(nv)
    has_valid = valid.shape[0] > 0
    has_mult = mult.shape[1] > 0
    width = min(tblock, t1 - t0)
    ngk = d // uint64(kgroup) if kpt else _1  # keys per token: groups of kgroup channels
    # codes per token unpacked in vector registers come out as values (code * scale + zero): no zero-point sums
    kvec = kpt and _vector_planes(kbits, kunits) and uint64(kgroup) % (_8 * kper) == 0
    vvec = _vector_planes(vbits, vunits) and gv % (_8 * vper) == 0
    krun = _run_groups(kbits, kunits, uint64(kgroup)) if kvec else np.empty(0, np.uint64)
    vrun = _run_groups(vbits, vunits, gv) if vvec else np.empty(0, np.uint64)

    qp = _scratch(rows, pk)  # the query in the keys' unpacked order
    qp[:] = 0.0
    for r in range(rows):
        for p in range(pk):
            c = kchan[p]
            if c >= 0:
                qp[r, p] = q[r, c]
    qs = _scratch(rows, pk)  # q * key scale of the current group, plane order
    qs[:] = 0.0
    bias = np.empty(nrows, np.float32)  # q . key zero of the current group
    kstat = np.empty(nd, np.float32)
    kzero = np.empty(nd, np.float32)
    kscale_p = np.zeros(kchan.shape[0], np.float32)
    kones = np.ones((width, kunits), np.float32)
    kf = _scratch(width, pk)  # unpacked key codes of the block
    vf = _scratch(width, pv)  # unpacked value codes * scale of the block
    su = np.empty((width, vunits), np.float32)  # the value scale of each unit of each token of the block
    sc = _scratch(rows, width)  # scores, then weights, of the block
    ok = np.empty(width, np.float32)  # 1.0 where the token is visible
    ebits = np.empty(width, np.int32)
    escale = ebits.view(np.float32)
    nvs = width * (nd // vgroup)
    nks = width * (nd // kgroup) if kpt else 0
    hbits = np.empty(max(nd, nvs, nks), np.uint32)
    ksc = np.empty(nks, np.float32)  # per-token keys: the block's scales and zeros, (token, key group) flattened
    kze = np.empty(nks, np.float32)
    ku = np.empty((width if kpt else 0, kunits), np.float32)  # the key scale of each unit of each token
    qsum = np.zeros((nrows, nd // kgroup if kpt else 0), np.float32)  # per-token keys: q summed per key group
    if kpt:
        for r in range(rows):
            for c in range(d):
                qsum[r, c // uint64(kgroup)] += q[r, c]
        for r in range(rows):
            bias[r] = 0.0
    hfloat = hbits.view(np.float32)
    vsc = np.zeros(nvs + 16, np.float32)  # + 16: _values_fused reads sixteen entries from a token's first
    vze = np.zeros(nvs + 16, np.float32)
    acc = _scratch(rows, pv)  # sum of weight * scale * code, plane order
    acc[:] = 0.0
    zacc = np.zeros((nrows, nd // vgroup), np.float32)  # sum of weight * zero, per value group
    accn = _scratch(rows, d)  # sum of weight * value for values held as floats
    accn[:] = 0.0
    m = np.full(nrows, -np.inf, np.float32)
    l = np.zeros(nrows, np.float32)

    g = start // grp
    # the leading whole blocks of the common layout: one call to _whole_blocks (compiled on its own, literal sizes)
    if (not kpt and not has_valid and not has_mult and grp == TOKEN_BLOCK_U and kbits == vbits and vvec
            and _vector_planes(kbits, kunits) and pk % _64 == 0 and pv % _64 == 0
            and uint64(kp.shape[1]) == kunits and uint64(vp.shape[1]) == vunits):
        g1 = min(stop, kcodes, vcodes) // grp
        if g1 > g:
            _whole_blocks(kbits, q, qp, kp, ks, kz, kchan, vp, vs, vz, ngv, vrun, g, g1, m, l, acc)
            g = g1
    while g * grp < stop:
        ta, tb = max(g * grp, start), min(g * grp + grp, stop)
        nt = tb - ta
        seen = 0
        for i in range(nt):
            ok[i] = 1.0 if (not has_valid or valid[ta + i]) else 0.0
            seen += 1 if ok[i] > 0 else 0
        if seen == 0:
            g += _1
            continue
        # keys: the block's coded tokens [0, ik), then those held as floats [ik, nt)
        ik = min(max(kcodes, ta), tb) - ta
        if ik > 0 and kpt:  # q . (code * scale + zero) = (q . code * scale) + sum_j zero_j * (q summed over group j)
            _halves(ks, ta * ngk, ik * ngk, hbits, hfloat, ksc)
            _halves(kz, ta * ngk, ik * ngk, hbits, hfloat, kze)
            if kvec:
                _unpack_vec(kp, ta, ik, kbits, kunits, ksc, kze, ngk, krun, kf)
            else:
                _unpack_per_token(kp, ta, ik, kbits, kunits, ksc, ngk, uint64(kgroup), ku, kf)
            if pk % _64 == 0:
                _scores_vec(qp, bias, kf, ik, sc, pk)
            else:
                _scores_block(qp, bias, kf, _0, ik, sc, pk)
            if not kvec:
                for i in range(ik):
                    for r in range(rows):
                        zs = np.float32(0.0)
                        for j in range(ngk):
                            zs += qsum[r, j] * kze[i * ngk + j]
                        sc[r, i] += zs
        elif ik > 0:  # scaled query and bias of this group, then the scores of every row
            _halves(ks, g * d, d, hbits, hfloat, kstat)
            _halves(kz, g * d, d, hbits, hfloat, kzero)
            for p in range(pk):
                c = kchan[p]
                kscale_p[p] = kstat[c] if c >= 0 else np.float32(0.0)
            for r in range(rows):
                sb = np.float32(0.0)
                for c in range(d):
                    sb += q[r, c] * kzero[c]
                bias[r] = sb
                for p in range(pk):
                    qs[r, p] = qp[r, p] * kscale_p[p]
            if _vector_planes(kbits, kunits):
                if kbits == 4:
                    _unpack_vec(kp, ta, ik, 4, kunits, kscale_p, kscale_p, _0, krun, kf)
                else:
                    _unpack_vec(kp, ta, ik, 2, kunits, kscale_p, kscale_p, _0, krun, kf)
            elif kbits == 2:
                _unpack_2bit(kp, ta, ik, kunits, kscale_p, _0, _0, kf)
            else:
                _unpack_block(kp, ta, _0, ik, kbits, kunits, kones, kf)
            if pk % _64 == 0:
                _scores_vec(qs, bias, kf, ik, sc, pk)
            else:
                _scores_block(qs, bias, kf, _0, ik, sc, pk)
        if ik < nt:
            _dense_scores(q, kr, ta + ik - kcodes, ik, nt, sc)
        if has_mult:  # key multipliers scale the scores
            for r in range(rows):
                for i in range(nt):
                    sc[r, i] *= mult[0, ta + i]
        _softmax_block(sc, nt, ok, m, l, acc, zacc, accn, ebits, escale)
        if has_mult:  # value multipliers scale the weights the values are added with (l is summed already)
            for r in range(rows):
                for i in range(nt):
                    sc[r, i] *= mult[1, ta + i]
        # values: v = code * scale + zero; the scaled codes go to acc, the zeros to zacc per value group (or, unpacked
        # in vector registers, the values themselves to acc)
        iv = min(max(vcodes, ta), tb) - ta
        if iv > 0:
            _halves(vs, ta * ngv, iv * ngv, hbits, hfloat, vsc)
            _halves(vz, ta * ngv, iv * ngv, hbits, hfloat, vze)
            if vvec and _fused_values_apply(vunits, ngv, pv):  # no scratch row
                _values_fused_call(vp, ta, iv, uint64(vbits), vunits, vsc, vze, ngv, vrun, sc, acc, pv)
            elif vvec:  # vf holds the values themselves
                if vbits == 4:  # a literal width: LLVM folds the width's branches out of the loops
                    _unpack_vec(vp, ta, iv, 4, vunits, vsc, vze, ngv, vrun, vf)
                else:
                    _unpack_vec(vp, ta, iv, 2, vunits, vsc, vze, ngv, vrun, vf)
                if pv % _64 == 0:
                    _values_vec(vf, iv, sc, acc, pv)
                else:
                    _values_block(vf, _0, iv, sc, vze, _0, acc, zacc, pv)
            else:
                _unpack_per_token(vp, ta, iv, vbits, vunits, vsc, ngv, gv, su, vf)
                if pv % _64 == 0:
                    _values_vec(vf, iv, sc, acc, pv)
                    _value_zeros(sc, iv, vze, ngv, zacc)
                else:
                    _values_block(vf, _0, iv, sc, vze, ngv, acc, zacc, pv)
        if iv < nt:
            _dense_values(vr, ta + iv - vcodes, iv, nt, sc, accn)
        g += _1

    for r in range(rows):
        m_out[r] = m[r]
        l_out[r] = l[r]
        for c in range(d):
            acc_out[r, c] = accn[r, c]
        for p in range(pv):
            c = vchan[p]
            if c >= 0:
                acc_out[r, c] += acc[r, p] + zacc[r, uint64(c) // gv]


# --------------------------------------------------------------------------------------------------------------------
# Whole layer: split the context, run the ranges, merge
# --------------------------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FM)
def _run_item(item, qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
              valid, mult, n, span, pacc, pm, pl):
    """Token range ``item % splits`` of (batch, KV head) ``item // splits`` into ``pacc[item]``, ``pm``, ``pl``."""
    h = qg.shape[1]
    splits = pm.shape[0] // (qg.shape[0] * h)
    bh, si = item // splits, item % splits
    bi, hi = bh // h, bh % h
    t0, t1 = si * span, min((si + 1) * span, n)
    vmask = valid[bi, hi if valid.shape[1] > 1 else 0] if valid.shape[2] > 0 else valid[0, 0]
    mu = mult[bi, hi] if mult.shape[3] > 0 else mult[0, 0]
    _attend_range(qg[bi, hi], kp[bi, hi], ks[bi, hi], kz[bi, hi], kbits, kgroup, kpt, kchan, nk, kr[bi, hi], vp[bi, hi],
                  vs[bi, hi], vz[bi, hi], vbits, vgroup, vchan, nv, vr[bi, hi], vmask, mu, t0, t1, pacc[item], pm[item],
                  pl[item])


@njit(cache=True, fastmath=_FM)
def _merge(bh, pacc, pm, pl, acc, m, l):
    """Merge the splits of (batch, KV head) ``bh`` by log-sum-exp into ``acc[bi, hi]``, ``m``, ``l``."""
    h, rows, d = acc.shape[1], acc.shape[2], acc.shape[3]
    splits = pm.shape[0] // (acc.shape[0] * h)
    bi, hi = bh // h, bh % h
    for r in range(rows):
        mx = np.float32(-np.inf)
        for si in range(splits):
            mx = max(mx, pm[bh * splits + si, r])
        m[bi, hi, r] = mx
        l[bi, hi, r] = 0.0
        for c in range(d):
            acc[bi, hi, r, c] = 0.0
        if mx == -np.inf:
            continue
        for si in range(splits):
            it = bh * splits + si
            if pm[it, r] == -np.inf:
                continue
            w = np.float32(np.exp(pm[it, r] - mx))
            l[bi, hi, r] += w * pl[it, r]
            for c in range(d):
                acc[bi, hi, r, c] += w * pacc[it, r, c]


@njit(cache=True, parallel=True)
def kivi_layer_parallel(qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                        valid, mult, n, span, acc, m, l):
    """Every (batch, KV head, token range) item under ``prange``, then the merge per (batch, KV head).

    ``qg (b, h, rows, d)`` fp32; codes ``kp``/``vp (b, h, >= nk | nv, nbytes)`` uint8; ``ks``/``kz``/``vs``/``vz (b,
    h, *)`` uint16, the flattened fp16 statistics; ``kr``/``vr (b, h, >= n - nk | n - nv, d)`` float32, the tokens
    after the codes; ``valid (b, h | 1, n)`` bool or ``(1, 1, 0)`` (all valid); ``mult (b, h, 2, n)`` float32 key /
    value multipliers per token or ``(1, 1, 2, 0)`` (none); ``span``: tokens per range (a multiple
    of the token block); ``kpt``: keys per token (statistics ``(b, h, >= nk, d / kgroup)`` flattened, groups of
    ``kgroup`` channels); results into ``acc (b, h, rows, d)``, ``m``/``l (b, h, rows)``.
    """
    b, h, rows, d = qg.shape
    items = b * h * ((n + span - 1) // span)
    pacc = np.empty((items, rows, d), np.float32)
    pm, pl = np.empty((items, rows), np.float32), np.empty((items, rows), np.float32)
    for item in prange(items):
        _run_item(item, qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                  valid, mult, n, span, pacc, pm, pl)
    for bh in prange(b * h):
        _merge(bh, pacc, pm, pl, acc, m, l)


@njit(cache=True)
def kivi_layer_serial(qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                      valid, mult, n, span, acc, m, l):
    """:func:`kivi_layer_parallel` on the calling thread."""
    b, h, rows, d = qg.shape
    items = b * h * ((n + span - 1) // span)
    pacc = np.empty((items, rows, d), np.float32)
    pm, pl = np.empty((items, rows), np.float32), np.empty((items, rows), np.float32)
    for item in range(items):
        _run_item(item, qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                  valid, mult, n, span, pacc, pm, pl)
    for bh in range(b * h):
        _merge(bh, pacc, pm, pl, acc, m, l)


# --------------------------------------------------------------------------------------------------------------------
# A whole one-token decode step in one call
# --------------------------------------------------------------------------------------------------------------------


@njit(cache=True)
def _two_byte_floats(src, bf16, out):
    """``out`` float32 = ``src`` uint16 bits read as fp16 (:func:`_halves`) or, with ``bf16``, as bfloat16 (the upper
    half of a float32); both arrays ``(b, h, r, d)`` C-contiguous. Exact."""
    flat, dst = src.reshape(-1), out.reshape(-1)
    n = uint64(flat.shape[0])
    if bf16:
        bits = dst.view(np.uint32)
        for i in range(n):
            bits[i] = np.uint32(flat[i]) << np.uint32(16)
    else:
        scratch = np.empty(n, np.uint32)
        _halves(flat, _0, n, scratch, scratch.view(np.float32), dst)


@njit(cache=True, inline="always")
def fold_query(query, scaling, h):
    """``query (b, heads, d)`` float32 -> ``(b, h, heads // h, d)``: each query head in its KV group, times ``scaling``
    (a float32 multiply, as torch's ``* scaling`` on a float32 tensor). Not fast-math."""
    b, heads, d = query.shape
    g = heads // h
    s = np.float32(scaling)
    qg = np.empty((b, h, g, d), np.float32)
    for bi in range(b):
        for hi in range(heads):
            for c in range(d):
                qg[bi, hi // g, hi % g, c] = query[bi, hi, c] * s
    return qg


@njit(cache=True, inline="always")
def normalize_into(acc, l, out):
    """``out (b, heads, d) = acc / max(l, tiny)`` from the partials ``acc (b, h, g, d)``, ``l (b, h, g)`` of the
    folded query heads (IEEE division, as torch's)."""
    b, h, g, d = acc.shape
    tiny = np.float32(np.finfo(np.float32).tiny)
    for bi in range(b):
        for hi in range(h * g):
            den = max(l[bi, hi // g, hi % g], tiny)
            for c in range(d):
                out[bi, hi, c] = acc[bi, hi // g, hi % g, c] / den


@njit(cache=True)
def kivi_decode_step(query, scaling, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kres, vp, vs, vz, vbits, vgroup,
                     vchan, nv, vres, bf16, n, span, out):
    """One query token's attention output over ``n`` tokens, in one call: the query heads folded into their KV groups
    and scaled, the 2-byte tails decoded, the layer kernel over token ranges of ``span`` (:func:`kivi_layer_serial` for
    one range, ``span >= n``; else :func:`kivi_layer_parallel`, on numba's threads: the caller holds the pool), then
    ``acc / max(l, tiny)``. No fast-math here: the scaling and the division are the IEEE operations numpy/torch do, so
    the output equals theirs bit for bit.

    ``query (b, heads, d)`` float32 (unscaled); ``kres``/``vres (b, h, r, d)`` uint16: the tokens after the codes as
    fp16 bits (bfloat16 with ``bf16``); the other arguments as :func:`kivi_layer_parallel` (no validity, no
    multipliers); ``out (b, heads, d)`` float32."""
    b, heads, d = query.shape
    h = kres.shape[1]
    g = heads // h
    qg = fold_query(query, scaling, h)
    kr = np.empty(kres.shape, np.float32)
    vr = np.empty(vres.shape, np.float32)
    _two_byte_floats(kres, bf16, kr)
    _two_byte_floats(vres, bf16, vr)
    acc = np.empty((b, h, g, d), np.float32)
    m = np.empty((b, h, g), np.float32)
    l = np.empty((b, h, g), np.float32)
    if span < n:
        kivi_layer_parallel(qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                            np.ones((1, 1, 0), np.bool_), np.ones((1, 1, 2, 0), np.float32), n, span, acc, m, l)
    else:
        kivi_layer_serial(qg, kp, ks, kz, kbits, kgroup, kpt, kchan, nk, kr, vp, vs, vz, vbits, vgroup, vchan, nv, vr,
                          np.ones((1, 1, 0), np.bool_), np.ones((1, 1, 2, 0), np.float32), n, span, acc, m, l)
    normalize_into(acc, l, out)


# --------------------------------------------------------------------------------------------------------------------
# Scattered tokens: entries of several (batch, KV head) rows held in one list (MiniCache's retained entries)
# --------------------------------------------------------------------------------------------------------------------


@njit(cache=True)
def scattered_partials(qg, idx, keys, values, seen, acc, m, l):
    """Attention partials of ``qg (b, h, rows, d)`` float32 (scaled) over entries that each belong to one
    (batch, KV head) row: entry ``e`` is row ``idx[e] % (b * h)`` (``idx (r,)`` int32, e.g. position * b*h + row; the
    order does not matter), key ``keys[e]`` and value ``values[e]`` ``(r, d)`` float32, visible where ``seen[e]``
    (``seen (r,)`` bool, or ``(0,)``: all). Writes ``acc (b, h, rows, d)``, ``m``, ``l (b, h, rows)`` as
    :func:`kivi_layer_serial` does (a row no entry reaches: ``m = -inf``, ``l = 0``, ``acc = 0``). Exact exp."""
    b, h, rows, d = qg.shape
    nbh = b * h
    for bi in range(b):
        for hi in range(h):
            for r in range(rows):
                m[bi, hi, r] = -np.inf
                l[bi, hi, r] = 0.0
                for c in range(d):
                    acc[bi, hi, r, c] = 0.0
    has_seen = seen.shape[0] > 0
    for e in range(idx.shape[0]):
        if has_seen and not seen[e]:
            continue
        row = np.int64(idx[e]) % nbh
        bi, hi = row // h, row % h
        for r in range(rows):
            s = np.float32(0.0)
            for c in range(d):
                s += qg[bi, hi, r, c] * keys[e, c]
            mo = m[bi, hi, r]
            if s > mo:  # a new maximum: what was summed so far shrinks by exp(old - new)
                shrink = np.float32(np.exp(mo - s)) if mo > -np.inf else np.float32(0.0)
                l[bi, hi, r] *= shrink
                for c in range(d):
                    acc[bi, hi, r, c] *= shrink
                m[bi, hi, r] = s
                mo = s
            p = np.float32(np.exp(s - mo))
            l[bi, hi, r] += p
            for c in range(d):
                acc[bi, hi, r, c] += p * values[e, c]


@njit(cache=True)
def scattered_mask(idx, b, h, n, valid, out):
    """``out (b, h, n)`` bool: True except at the entries ``idx (r,)`` int32 (position * b*h + row, positions ``< n``)
    and, with ``valid (b, 1|h, n)`` bool (or ``(1, 1, 0)``: none), where that is False."""
    has_valid = valid.shape[2] > 0
    per_head = valid.shape[1] > 1
    for bi in range(b):
        for hi in range(h):
            vh = hi if per_head else 0
            for t in range(n):
                out[bi, hi, t] = valid[bi, vh, t] if has_valid else True
    nbh = b * h
    for e in range(idx.shape[0]):
        row = np.int64(idx[e]) % nbh
        out[row // h, row % h, np.int64(idx[e]) // nbh] = False

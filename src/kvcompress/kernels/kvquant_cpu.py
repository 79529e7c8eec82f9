"""Fused attention over KVQuant's codes on the CPU (numba): ``(acc, m, l)`` straight from the stored layout.

What is read per (batch row, token): the packed code planes of the key and of the value of every KV head (3 bits: a
2-bit and a 1-bit plane), the value's per-token fp16 range, the token's outliers (the CSR entries of its row) and, for
pre-RoPE keys, its position (implicit ``start + t`` or stored). Per layer: the levels (a codebook of ``2**bits``
floats) and, for per-channel keys, the fixed per-channel range. Tokens are handled a block of :data:`BLOCK` at a time,
every KV head of the batch row in the same pass (a token's position, rotation and outlier entries are read once):

* **dequantize** a block into a small scratch ``(heads, BLOCK, d)``: the bit planes are read as 64-bit words, one
  vectorized loop of 32 (16) codes per word (:func:`_levels_block`), the level looked up by ``vpermps`` 8 codes at a
  time into a register and scaled there where numba's target has AVX2, 16 at a time where it has AVX-512
  (:mod:`.lookup`, :func:`_dequant_vec`), else a
  tree of selects on the code's bits (a gather from the level table measured 2x slower), times the range plus the
  offset (per channel for keys, per token for values); then
  the block's outliers overwrite their elements (KVQuant's dense-and-sparse split: an outlier is stored exactly, in
  place of its code) in one flat loop over its entries, sixteen per masked scatter on AVX-512
  (:func:`_outliers_block`);
* **rotate** pre-RoPE keys to their positions inside the kernel, a block at a time: RoPE's pairs ``(j, j + d/2)`` are
  ``d/2`` apart, and a block of consecutive positions ``p0 .. p0 + BLOCK - 1`` is scored as ``(R(-p0) q) . (R(i) k)``:
  the query rows are turned back to the block's first position once per block, and each key by its offset ``i`` in
  the block from a table of ``BLOCK`` cos/sin rows made once per call (times the attention scaling). ``cos``/``sin``
  of ``p0 * inv_freq`` are computed exactly (float64) at a range's first block, after a jump and every
  :data:`EXACT_EVERY` tokens, and advanced in between by one rotation per block (angle addition, float64): nothing is
  held between steps (no table of every position) and the drift stays below 1e-12. A block whose stored positions
  are not consecutive turns each key to its own position (the same exact-then-advance scheme per token);
* **scores** for every query row of the KV group in one pass over the block (GQA/MQA heads and query tokens folded into
  rows), online softmax per block, then the block's values dequantized the same way and accumulated;
* **values fused** where the target has AVX-512 (:func:`_level_values`, session 38): a token's value levels are looked
  up, scaled and offset in registers and added straight into the accumulators of up to four query rows, never
  stored. The block's value outliers are scattered as before, into a scratch held at a mark (:data:`.simd.MARK`, a
  NaN pattern no fp16 value has); the fused loop takes each sixteen channels from there where they are not the mark
  (:func:`~.simd.take_marked16`) and puts the mark back. Bit for bit the dequantize-to-scratch path's output; the
  3-bit kernel at 8k 1.14x faster on a Zen 5 host;
* **keys turned as they are dequantized** there too, for per-channel pre-RoPE keys in a block of consecutive positions
  (:func:`_turned_keys`): looked up, scaled, their outliers taken from a marked scratch the same way, turned by their
  offset's cos/sin and stored once, with no second pass over the block. Bit for bit the same keys; the kernel a
  further 1.04-1.07x faster (session 39: with the width and row length as literals, 1.03-1.13x more). (Session 24
  tried this with the outliers added afterwards as turned corrections, which cost what the pass saved; the mark makes
  them an overwrite again, before the turn.)

The context of each batch row is split into token ranges run under ``numba.prange`` and merged by log-sum-exp
(flash-decoding), as for KIVI (:mod:`.cpu`, whose score, value and softmax pieces this reuses). :func:`quantize_rows`
quantizes a decode step's tokens into this layout in one call.

Against dequantize-then-attend (:meth:`kvcompress.methods.kvquant_store.QuantStream.read` + RoPE from the model's
module): equal within float rounding, except that the model rounds ``position * inv_freq`` to float32 before its
``cos``/``sin`` and the kernel does not; the reference's keys carry that rounding (up to ``position * 6e-8`` radians:
3e-5 at position 512, 5e-4 at 8k), the kernel's rotation is the exact one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types, uint64
from numba.experimental import structref

from .cpu import (_0, _1, _2, _3, _4, _8, _16, _32, _48, _64, _FM, _halves, _load4, _scratch3, _merge, _scores_block,
                  _scores_vec, _softmax_block, _store4, _two_byte_floats, _values_block, _values_vec, fold_query,
                  normalize_into)
from .lookup import PERMUTE, WIDE, levels2, levels3, levels4, levels16
from .simd import (MARK, fill16_u8, fma8, fma16, load8, load8_1d, load16, load16_1d, mul8, mul16, scatter16_cols1,
                   scatter16_cols2, splat8, splat16, store8, store16, sub8, sub16, take_marked16)

#: tokens dequantized at a time into the scratch (128: the per-block work -- the query turned, the softmax's max and
#: rescale, the accumulators loaded and stored -- cost 5-7 % more of the whole at 32 than at 64 (session 19); at 3
#: bits 128 measured 3-4 % faster than 64 alone and 7 % less attention time inside the model at 8k, the same at 4k;
#: 2 bits the same, 4 bits 3 % slower alone; 192 and 256 slower than 128: session 24). At most 256: the outlier
#: loop keeps a block's token index in a byte (:func:`_outliers_block`)
BLOCK = 128
#: pre-RoPE keys: cos/sin computed exactly at least every this many tokens (advanced by one rotation in between)
EXACT_EVERY = 2048


@njit(cache=True, inline="always")
def _sel2(c, l0, l1, l2, l3):
    """``[l0, l1, l2, l3][c & 3]`` as selects on the code's bits (vectorizes; a gather from a table does not)."""
    a = l1 if c & 1 else l0
    b = l3 if c & 1 else l2
    return b if c & 2 else a


#: the scale of an fp16 number's integer significand per exponent field ``e``: ``2**(e - 25)`` (normal: the
#: significand is ``1024 + mantissa``), ``2**-24`` for ``e = 0`` (subnormal: the mantissa alone), inf for ``e = 31``
_HALF_SCALE = np.array([2.0**-24] + [2.0 ** (e - 25) for e in range(1, 31)] + [np.inf], np.float32)


@njit(cache=True, inline="always")
def _f16(h):
    """The fp16 number whose bits are ``h`` (uint16), as float32 (exact; inf/NaN kept). Selects, no branches (the
    outliers' values are decoded in the hot loop)."""
    x = np.int32(h)
    e, mant = (x >> 10) & 31, x & 1023
    v = np.float32((1024 if e > 0 else 0) + mant) * _HALF_SCALE[e]
    v = np.float32(np.nan) if e == 31 and mant != 0 else v
    return -v if x & 0x8000 else v


@njit(cache=True, inline="always")
def _small(raw, i):
    """Entry ``i`` of a held array of small non-negative integers read as its little-endian bytes ``raw (..., width)``
    uint8 (the store keeps counts and columns as uint8, int16 or int32 by the layer's width; the kernel reads them in
    place, one signature for all)."""
    w = raw.shape[-1]
    if w == 1:
        return np.int64(raw[i, 0])
    if w == 2:
        return np.int64(raw[i, 0]) | (np.int64(raw[i, 1]) << 8)
    return np.int64(raw[i, 0]) | (np.int64(raw[i, 1]) << 8) | (np.int64(raw[i, 2]) << 16) | (np.int64(raw[i, 3]) << 24)


@njit(cache=True, inline="always")
def _entries_between(counts, a, z):
    """Outlier entries of tokens ``[a, z)`` of one batch row (``counts (1, 1, >= z, width)``, :func:`_small`): from ``a = 0``, the CSR offset
    of token ``z``. 0 without outliers or for several batch rows (they read row pointers instead: the offset is not
    carried, :func:`_outliers_block`)."""
    e = np.int64(0)
    if counts.shape[2] == 0 or counts.shape[0] != 1:
        return e
    row = counts[0, 0]
    for u in range(a, z):
        e += _small(row, u)
    return e


@njit(cache=True, fastmath=_FM, inline="always")
def _levels_block(bits, p0, p1, w0, w1, lev, ta, nt, out):
    """``out[i, c] = lev[code of channel c]`` for tokens ``ta + i`` (``i < nt``), channels in order. Codes: 2 or 4
    bits in plane ``p0``; 3 bits: the low 2 bits in ``p0``, the high bit in the 1-bit plane ``p1`` (rows ``(cap,
    bytes)`` uint8, :func:`kvcompress.quant.pack_bits`). When ``w0`` has words (``d`` a multiple of 64), the same
    planes read as little-endian 64-bit words (``w0``/``w1 (cap, words)`` uint64: channel ``c`` of a ``b``-bit plane
    at bits ``b*c`` of the row), one loop of 32 (16) codes per word with a variable shift: it vectorizes, where loops
    over bytes did not (measured 13 vs 80 ns per 3-bit row of 64); else byte by byte. ``lev`` padded to 16 levels; the
    level is a tree of selects on the code's bits (a gather from the table measured 2x slower). Where numba's target
    has AVX2 and the planes have words, the kernel takes :func:`_dequant_vec` instead (``vpermps``)."""
    l0, l1, l2, l3, l4, l5, l6, l7 = lev[0], lev[1], lev[2], lev[3], lev[4], lev[5], lev[6], lev[7]
    l8, l9, l10, l11, l12, l13, l14, l15 = lev[8], lev[9], lev[10], lev[11], lev[12], lev[13], lev[14], lev[15]
    d = out.shape[1]
    if w0.shape[1] > 0:
        nw = w0.shape[1]
        for i in range(nt):
            t = ta + i
            if bits == 2:
                for k in range(nw):
                    w = w0[t, k]
                    for c in range(32):
                        code = np.int64((w >> uint64(2 * c)) & uint64(3))
                        out[i, 32 * k + c] = _sel2(code, l0, l1, l2, l3)
            elif bits == 3:
                for k in range(nw):
                    w = w0[t, k]
                    hw = w1[t, k >> 1] >> uint64(32 * (k & 1))
                    for c in range(32):
                        code = np.int64((w >> uint64(2 * c)) & uint64(3))
                        code |= np.int64((hw >> uint64(c)) & uint64(1)) << 2
                        a = _sel2(code, l0, l1, l2, l3)
                        b = _sel2(code, l4, l5, l6, l7)
                        out[i, 32 * k + c] = b if code & 4 else a
            else:
                for k in range(nw):
                    w = w0[t, k]
                    for c in range(16):
                        code = np.int64((w >> uint64(4 * c)) & uint64(15))
                        a = _sel2(code, l0, l1, l2, l3)
                        b = _sel2(code, l4, l5, l6, l7)
                        e = _sel2(code, l8, l9, l10, l11)
                        f = _sel2(code, l12, l13, l14, l15)
                        g = b if code & 4 else a
                        h = f if code & 4 else e
                        out[i, 16 * k + c] = h if code & 8 else g
        return
    for i in range(nt):
        t = ta + i
        for c in range(d):
            if bits == 4:
                code = (np.int64(p0[t, c >> 1]) >> (4 * (c & 1))) & 15
            else:
                code = (np.int64(p0[t, c >> 2]) >> (2 * (c & 3))) & 3
                if bits == 3:
                    code |= ((np.int64(p1[t, c >> 3]) >> (c & 7)) & 1) << 2
            a = _sel2(code, l0, l1, l2, l3)
            b = _sel2(code, l4, l5, l6, l7)
            e = _sel2(code, l8, l9, l10, l11)
            f = _sel2(code, l12, l13, l14, l15)
            g = b if code & 4 else a
            h = f if code & 4 else e
            out[i, c] = h if code & 8 else g


@njit(cache=True, fastmath=_FM, inline="always")
def _dequant_block(bits, p0, p1, w0, w1, lev, per_channel, cs, co, ts, to, ta, nt, out):
    """``out[i, :d]`` = token ``ta + i`` (``i < nt``) dequantized, outliers aside: ``lev[code]`` (:func:`_levels_block`)
    times the range plus the offset (``per_channel``: ``cs``/``co (d,)``; else ``ts``/``to (cap,)`` per token)."""
    d = uint64(out.shape[1])
    _levels_block(bits, p0, p1, w0, w1, lev, ta, nt, out)
    for i in range(nt):
        if per_channel:
            for p in range(d):
                out[i, p] = out[i, p] * cs[p] + co[p]
        else:
            s, o = _f16(ts[ta + i]), _f16(to[ta + i])
            for p in range(d):
                out[i, p] = out[i, p] * s + o


@njit(cache=True, fastmath=_FM, inline="always")
def _put_levels(x, per_channel, cs, co, s, o, out, i, c):
    """``out[i, c : c + 8]`` = the levels ``x`` times the range plus the offset: per channel from ``cs``/``co`` at
    ``c``, else the token's ``s``/``o`` (vectors)."""
    if per_channel:
        store8(fma8(x, load8_1d(cs, c), load8_1d(co, c)), out, i, c)
    else:
        store8(fma8(x, s, o), out, i, c)


@njit(cache=True, fastmath=_FM, inline="always")
def _put_levels16(x, per_channel, cs, co, s, o, out, i, c):
    """:func:`_put_levels` for sixteen lanes: ``out[i, c : c + 16]``."""
    if per_channel:
        store16(fma16(x, load16_1d(cs, c), load16_1d(co, c)), out, i, c)
    else:
        store16(fma16(x, s, o), out, i, c)


@njit(cache=True, fastmath=_FM, inline="always")
def _dequant_vec(bits, w0, w1, lo, hi, tab, per_channel, cs, co, ts, to, ta, nt, out, hbuf, hf, tsf, tof):
    """:func:`_dequant_block` in vector registers, for ``d`` a multiple of 64 where numba's target has AVX2: each word
    of codes read once, its 8-code groups looked up by ``vpermps`` into a register (:mod:`.lookup`; ``lo``/``hi``
    the levels 0-7 / 8-15), scaled and offset there, stored once. Per-token ranges are decoded for the block first
    (:func:`kvcompress.kernels.cpu._halves`: branch-free; the stored ranges are finite) into ``tsf``/``tof
    (>= nt,)`` float32 (``hbuf``/``hf``: uint32 scratch and its float32 view). Where :data:`~.lookup.WIDE`, sixteen
    codes at a time (:func:`~.lookup.levels16`; ``tab`` the levels repeated to sixteen lanes)."""
    nw = w0.shape[1]
    s = o = splat8(np.float32(0.0))
    if not per_channel:
        _halves(ts, uint64(ta), uint64(nt), hbuf, hf, tsf)
        _halves(to, uint64(ta), uint64(nt), hbuf, hf, tof)
    if WIDE:
        s16 = o16 = splat16(np.float32(0.0))
        d = uint64(out.shape[1])
        for i in range(nt):
            t = ta + i
            if not per_channel:
                s16, o16 = splat16(tsf[i]), splat16(tof[i])
            for c in range(_0, d, _16):
                _put_levels16(levels16(bits, tab, w0, w1, t, c), per_channel, cs, co, s16, o16, out, i, c)
        return
    for i in range(nt):
        t = ta + i
        if not per_channel:
            s, o = splat8(tsf[i]), splat8(tof[i])
        if bits == 2:
            for k in range(nw):
                for g in range(4):
                    _put_levels(levels2(lo, hi, w0, w1, t, k, g), per_channel, cs, co, s, o, out, i, 32 * k + 8 * g)
        elif bits == 3:
            for k in range(nw):
                for g in range(4):
                    _put_levels(levels3(lo, hi, w0, w1, t, k, g), per_channel, cs, co, s, o, out, i, 32 * k + 8 * g)
        else:
            for k in range(nw):
                for g in range(2):
                    _put_levels(levels4(lo, hi, w0, w1, t, k, g), per_channel, cs, co, s, o, out, i, 16 * k + 8 * g)


@njit(cache=True, fastmath=_FM, inline="always")
def _level_rows(bits, w0, w1, tab, tsf, tof, ta, nt, sc, acc, held, outliers, reset, r0, c, nr):
    """:func:`_level_values` for query rows ``r0 .. r0 + nr - 1`` (``nr`` <= 4, a literal: LLVM drops the unused
    rows' accumulators) and channels ``c .. c + 63``: per token, the four sixteen-channel runs looked up
    (:func:`~.lookup.levels16`), scaled and offset in registers, the outliers taken from ``held`` (with ``outliers``;
    the mark put back with ``reset``), then added with each row's weight; the accumulators stay in registers over the
    tokens."""
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
        t = ta + i
        l0, l1 = levels16(bits, tab, w0, w1, t, c), levels16(bits, tab, w0, w1, t, c + _16)
        l2, l3 = levels16(bits, tab, w0, w1, t, c + _32), levels16(bits, tab, w0, w1, t, c + _48)
        s, o = splat16(tsf[i]), splat16(tof[i])
        v0, v1, v2, v3 = fma16(l0, s, o), fma16(l1, s, o), fma16(l2, s, o), fma16(l3, s, o)
        if outliers:  # the block's outliers in place of their channels' levels
            v0, v1 = take_marked16(held, i, c, v0, reset), take_marked16(held, i, c + _16, v1, reset)
            v2, v3 = take_marked16(held, i, c + _32, v2, reset), take_marked16(held, i, c + _48, v3, reset)
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


@njit(cache=True, fastmath=_FM)
def _level_values(bits, w0, w1, tab16, tsf, tof, ta, nt, sc, acc, held, outliers):
    """``acc[r, :d] += sc[r, i] * v[i]`` for tokens ``ta + i`` (``i < nt``) of one KV head's values, ``v = lev[code] *
    tsf[i] + tof[i]`` (planes as words ``w0``/``w1 (cap, words)``, :func:`_levels_block`) except where ``held (>= nt,
    d)`` holds an outlier (with ``outliers``: the block's outliers scattered into a scratch otherwise at
    :data:`~.simd.MARK`, which the last pass over the tokens puts back; :func:`~.simd.take_marked16`). The values are
    never stored: :func:`_dequant_vec` and :func:`kvcompress.kernels.cpu._values_vec16` in one pass, the same
    arithmetic. ``tab16 (16,)`` the levels repeated to sixteen lanes, ``tsf``/``tof (>= nt,)`` the tokens' ranges
    decoded, ``sc (rows, >= nt)`` the weights, ``acc (rows, d)``; ``d`` a multiple of 64, AVX-512 only
    (:data:`~.lookup.WIDE`).
    Compiled on its own and called once per block and head (its four row counts inlined here, not into the kernel:
    numba's compile time grows with every inlined copy, see :mod:`.cpu`)."""
    rows, d = uint64(acc.shape[0]), uint64(acc.shape[1])
    tab = load16_1d(tab16, 0)
    for r0 in range(_0, rows, _4):
        nr = min(_4, rows - r0)
        last = r0 + _4 >= rows  # the last pass over the tokens puts the marks back
        for c in range(_0, d, _64):
            if nr == 4:
                _level_rows(bits, w0, w1, tab, tsf, tof, ta, nt, sc, acc, held, outliers, last, r0, c, 4)
            elif nr == 3:
                _level_rows(bits, w0, w1, tab, tsf, tof, ta, nt, sc, acc, held, outliers, last, r0, c, 3)
            elif nr == 2:
                _level_rows(bits, w0, w1, tab, tsf, tof, ta, nt, sc, acc, held, outliers, last, r0, c, 2)
            else:
                _level_rows(bits, w0, w1, tab, tsf, tof, ta, nt, sc, acc, held, outliers, last, r0, c, 1)


@njit(cache=True, fastmath=_FM)
def _turned_keys(bits, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, outliers, kf):
    """``kf[i, :d]`` = token ``ta + i``'s key (``i < nt``) dequantized per channel and turned by RoPE in one pass:
    ``lev[code] * cs + co`` (planes as words ``w0``/``w1 (cap, words)``, :func:`_levels_block`; ``cs``/``co (d,)``),
    the block's outliers in place (``held (>= nt, d)``: the marked scratch they were scattered into, read and marked
    again by :func:`~.simd.take_marked16` when ``outliers``), then each pair ``(j, j + d/2)`` turned by row ``i`` of
    ``tc``/``ts (>= nt, d/2)`` (:func:`_rotate_vec`'s arithmetic) and stored once: no second pass over the block. ``d``
    a multiple of 64, AVX-512 only (:data:`~.lookup.WIDE`); ``tab16 (16,)`` the levels repeated to sixteen lanes.

    The width, ``outliers`` and, for ``d`` 64 or 128, the row length reach :func:`_turned_rows` as literals: LLVM then
    drops the width's and the flag's branches from the token loop and unrolls the channel loop with every word offset
    and shift a constant (it had not taken the branches out, and the channel loop ran two iterations per token for
    ``d = 64``). Eighteen copies of a small body: ~3 s more to compile."""
    if bits == 3:
        _turned_width(3, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, outliers, kf)
    elif bits == 2:
        _turned_width(2, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, outliers, kf)
    else:
        _turned_width(4, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, outliers, kf)


@njit(cache=True, fastmath=_FM, inline="always")
def _turned_width(bits, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, outliers, kf):
    """:func:`_turned_keys` for a literal ``bits``: ``outliers`` and, where ``d`` is 64 or 128, the half row length
    as literals too (with the flag read in the loop, its two branches per token cost 5 % of the 3-bit kernel at 8k:
    session 40)."""
    half = uint64(kf.shape[1]) // _2
    if half == 32:
        if outliers:
            _turned_rows(bits, 32, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, True, kf)
        else:
            _turned_rows(bits, 32, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, False, kf)
    elif half == 64:
        if outliers:
            _turned_rows(bits, 64, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, True, kf)
        else:
            _turned_rows(bits, 64, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, False, kf)
    elif outliers:
        _turned_rows(bits, half, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, True, kf)
    else:
        _turned_rows(bits, half, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, False, kf)


@njit(cache=True, fastmath=_FM, inline="always")
def _turned_rows(bits, half, w0, w1, tab16, cs, co, ta, nt, tc, ts, held, outliers, kf):
    """:func:`_turned_keys`' loop over the tokens, ``half = d / 2``."""
    tab = load16_1d(tab16, 0)
    for i in range(nt):
        t = ta + i
        for c in range(_0, uint64(half), _16):
            e = c + uint64(half)
            la, lb = levels16(bits, tab, w0, w1, t, c), levels16(bits, tab, w0, w1, t, e)
            a = fma16(la, load16_1d(cs, c), load16_1d(co, c))
            b = fma16(lb, load16_1d(cs, e), load16_1d(co, e))
            if outliers:
                a, b = take_marked16(held, i, c, a, True), take_marked16(held, i, e, b, True)
            cc, ss = load16(tc, i, c), load16(ts, i, c)
            store16(sub16(mul16(a, cc), mul16(b, ss)), kf, i, c)
            store16(fma16(a, ss, mul16(b, cc)), kf, i, e)


@njit(cache=True, fastmath=_FM, inline="always")
def _rotate_vec(kf, i, tc, ts, row, half):
    """Row ``i`` of ``kf (width, d)`` turned by RoPE in vector registers: pairs ``(j, j + half)``, ``half`` a multiple
    of 8; ``tc[row]``/``ts[row] (half,)`` float32, the cos/sin to turn by (tables ``(*, half)``: no array is sliced in
    the caller's per-token loop)."""
    for j in range(0, half, 8):
        a, b = load8(kf, i, j), load8(kf, i, j + half)
        c, s = load8(tc, row, j), load8(ts, row, j)
        store8(sub8(mul8(a, c), mul8(b, s)), kf, i, j)
        store8(fma8(a, s, mul8(b, c)), kf, i, j + half)


@njit(cache=True, fastmath=_FM, inline="always")
def _turn_key(kf, i, tc, ts, row, half, vec):
    """Row ``i`` of ``kf (width, d)`` turned by RoPE by ``tc[row]``/``ts[row] (half,)``: :func:`_rotate_vec` with
    ``vec``, else a scalar loop."""
    if vec:
        _rotate_vec(kf, i, tc, ts, row, half)
        return
    uh = uint64(half)  # unsigned indices: no wrap-around check per element
    for j in range(uh):
        x, y = kf[i, j], kf[i, j + uh]
        kf[i, j] = x * tc[row, j] - y * ts[row, j]
        kf[i, j + uh] = y * tc[row, j] + x * ts[row, j]


@njit(cache=True, inline="always")
def _angles_at(cur_c, cur_s, step_c, step_s, inv64, pos, exact):
    """``cur_c``/``cur_s (half,)`` float64 set to cos/sin of ``pos * inv64``: computed (``exact``), or advanced from
    the angles they hold by one step of ``step_c``/``step_s`` (angle addition)."""
    if exact:
        for j in range(cur_c.shape[0]):
            ang = np.float64(pos) * inv64[j]
            cur_c[j] = np.cos(ang)
            cur_s[j] = np.sin(ang)
        return
    for j in range(cur_c.shape[0]):
        c, s = cur_c[j], cur_s[j]
        cur_c[j] = c * step_c[j] - s * step_s[j]
        cur_s[j] = s * step_c[j] + c * step_s[j]


@njit(cache=True, inline="always")
def _scatter_layout(out, cols):
    """``(shift, gap)`` of :func:`kvcompress.kernels.simd.scatter16_cols1` for a block scratch ``out (h, width, d)``:
    ``d = 2**shift``, ``gap = (width - 1) * d``; ``shift = -1`` where the masked scatter is not taken (no AVX-512 in
    numba's target, columns wider than two bytes, ``d`` not a power of two, a scratch past 32-bit offsets)."""
    d = np.int64(out.shape[2])
    if not WIDE or cols.shape[1] > 2 or d & (d - 1) != 0 or out.size >= np.int64(1) << 31:  # 32-bit offsets
        return np.int64(-1), np.int64(0)
    shift = np.int64(0)
    while (np.int64(1) << shift) < d:
        shift += 1
    return shift, (np.int64(out.shape[1]) - 1) * d


@njit(cache=True, inline="always")
def _scatter16(outflat, cols, vals, tok, e, j, count, shift, gap, d):
    """:func:`kvcompress.kernels.simd.scatter16_cols1` or ``scatter16_cols2`` by the columns' width."""
    if cols.shape[1] == 1:
        scatter16_cols1(outflat, cols, vals, tok, e, j, count, shift, gap, d)
    else:
        scatter16_cols2(outflat, cols, vals, tok, e, j, count, shift, gap, d)


@njit(cache=True, inline="always")
def _outliers_block(counts, rp, e, cols, vals, posmap, cflat, bi, ta, nt, out, outflat, tok, obits, of, oval):
    """Write the outliers of batch row ``bi``'s tokens ``ta + i`` (``i < nt``) into ``out (h, BLOCK, d)`` (rows
    token-major, ``counts (nb, 1, >= n, width)`` entries each; ``cols (>= nnz, width)`` in ``[0, h*d)``, both read by
    :func:`_small`; ``vals`` fp16 bits). Column ``col`` goes to KV head ``posmap[0, col]``, position ``posmap[1,
    col]`` (tables: no division per entry). Several batch rows: ``rp`` the row pointers (:func:`_row_pointers`).

    One batch row: ``e`` is the CSR offset of token ``ta``, carried from block to block (returned for ``ta + nt``),
    nothing made per step. The block's entries are written in one flat loop: each entry's token comes from ``tok``
    (uint8 scratch of ``>= nt*h*d + 16``), filled with sixteen slots per token by one store and no branch taken below
    17 entries (a loop over each token's few entries mispredicts its exit at nearly every token; four slots and a loop
    for the rest, before session 27, mispredicted at the ~35 % of tokens with more than four at 2 % outliers). Where
    the target has AVX-512, columns of one or two bytes and ``d`` a power of two, sixteen entries at a time are
    converted from fp16 and scattered by one masked ``vscatterdps``
    (:func:`kvcompress.kernels.simd.scatter16_cols1`; 2.3x faster than the loop below at 2 % outliers, session 27).
    Else its values are decoded from fp16 for the whole block first (:func:`kvcompress.kernels.cpu._halves` into
    ``oval``, with ``obits``/``of`` its scratch; one ``inf``/``NaN`` among them and the block takes the exact
    :func:`_f16` per entry), and each lands at ``outflat[cflat[col] + token * d]`` (``outflat``: ``out`` flattened,
    ``cflat (h*d,)`` uint64 the offset of each column's head and channel). Several batch rows: each token's entries
    one after the other, by the same masked scatter where it is taken (``tok`` then zeroed: every lane the token's
    own row of ``outflat``), else one at a time."""
    if counts.shape[0] == 1:
        row = counts[0, 0]
        k = np.int64(0)
        for i in range(nt):
            c = _small(row, ta + i)
            ti = np.uint8(i)
            fill16_u8(tok, k, ti)  # sixteen slots at once; the next token's overwrite the unused ones
            if c > 16:
                for j in range(k + 16, k + c):
                    tok[j] = ti
            k += c
        d = uint64(out.shape[2])
        shift, gap = _scatter_layout(out, cols)
        if shift >= 0:  # sixteen entries per masked scatter
            for j in range(0, k, 16):
                _scatter16(outflat, cols, vals, tok, e, j, min(16, k - j), shift, gap, d)
            return e + k
        special = np.uint16(0)
        for j in range(k):
            special |= np.uint16(0x7C00) if (vals[e + j] & np.uint16(0x7C00)) == np.uint16(0x7C00) else np.uint16(0)
        if special:
            for j in range(k):
                oval[j] = _f16(vals[e + j])
        else:
            _halves(vals, uint64(e), uint64(k), obits, of, oval)
        for j in range(k):
            outflat[cflat[_small(cols, e + j)] + uint64(tok[j]) * d] = oval[j]
        return e + k
    nb = counts.shape[0]
    shift, gap = _scatter_layout(out, cols)
    if shift >= 0:  # each token's entries (contiguous in the CSR) by masked scatters, its row of ``outflat`` the base
        d = uint64(out.shape[2])
        for z in range(16):
            tok[z] = 0
        for i in range(nt):
            row = (ta + i) * nb + bi
            k0, c = rp[row], rp[row + 1] - rp[row]
            if c:
                base = outflat[uint64(i) * d :]
                for j in range(0, c, 16):
                    _scatter16(base, cols, vals, tok, k0 + j, 0, min(16, c - j), shift, gap, d)
        return e
    for i in range(nt):
        row = (ta + i) * nb + bi
        for k in range(rp[row], rp[row + 1]):
            col = _small(cols, k)
            out[posmap[0, col], i, posmap[1, col]] = _f16(vals[k])
    return e


@njit(cache=True)
def _row_pointers(counts, n):
    """``(n*nb + 1,)`` int64 CSR row pointers of outlier counts ``(nb, 1, >= n, width)`` per (batch row, token), rows
    token-major, for several batch rows (empty for one, or without outliers: offsets are carried instead)."""
    nb = counts.shape[0]
    if counts.shape[2] == 0 or nb == 1:
        return np.zeros(0, np.int64)
    rp = np.empty(n * nb + 1, np.int64)
    rp[0] = 0
    for t in range(n):
        for bi in range(nb):
            r = t * nb + bi
            rp[r + 1] = rp[r] + _small(counts[bi, 0], t)
    return rp


@njit(cache=True, fastmath=_FM)
def _attend_range(q, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, krp, kcols, kvals,
                  vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vrp, vcols, vvals, colmap,
                  bi, inv_freq, rope_scale, pos_start, positions, valid, t0, t1, acc_out, m_out, l_out):
    """Attention of ``q (h, rows, d)`` over tokens ``[t0, t1)`` of batch row ``bi``, every KV head in one pass over the
    tokens (a token's position, rotation and outlier entries are read once for all its heads). Codes ``*p0``/``*p1 (h,
    cap, bytes)`` (and as words ``*w0``/``*w1``, see :func:`_levels_block`); keys per channel (``kcs``/``kco (h*d,)``
    fp16 bits) or per token (``kts``/``kto (1|h, cap)``), values per token (``vts``/``vto``), as in
    :func:`_dequant_block`; outliers: :func:`_outliers_block` (``*counts (nb, 1, >= n, width)`` of every batch row, ``colmap``
    the same table for keys and values). ``inv_freq (d/2,)`` float32 (the angles are computed in float64; empty: keys
    are not rotated; pairs ``(p, p + d/2)``), ``rope_scale`` the rotary module's attention scaling, positions
    ``pos_start + t`` (``pos_start >= 0``) or ``positions[t]``; ``valid (1|h, n)`` bool or ``(1, 0)``. Writes ``acc_out
    (h, rows, d)``, ``m_out``/``l_out (h, rows)``."""
    h, nrows, nd = q.shape
    d = uint64(nd)
    half = nd // 2
    uhalf = uint64(half)
    rope = inv_freq.shape[0] > 0
    inv64 = inv_freq.astype(np.float64)
    klev16, vlev16 = np.zeros(16, np.float32), np.zeros(16, np.float32)  # the codebooks padded to 16 levels
    klev16[: klev.shape[0]] = klev
    vlev16[: vlev.shape[0]] = vlev
    # d a multiple of 64 with vpermps: dequantization and rotation in vector registers
    vec = PERMUTE and nd % 64 == 0 and kw0.shape[2] > 0 and vw0.shape[2] > 0
    fused_values = vec and WIDE  # sixteen lanes: values added from their levels in registers (_level_values)
    fused_keys = fused_values and kper_channel and rope  # ... and keys turned as they are dequantized (_turned_keys)
    klo, khi, vlo, vhi = load8_1d(klev16, 0), load8_1d(klev16, 8), load8_1d(vlev16, 0), load8_1d(vlev16, 8)
    ktab16, vtab16 = np.empty(16, np.float32), np.empty(16, np.float32)  # the levels repeated to sixteen lanes
    for i in range(16):
        ktab16[i], vtab16[i] = klev16[i % klev.shape[0]], vlev16[i % vlev.shape[0]]
    ktab, vtab = load16_1d(ktab16, 0), load16_1d(vtab16, 0)
    cs = np.zeros(h * nd, np.float32)  # the per-channel key range, decoded once
    co = np.zeros(h * nd, np.float32)
    if kper_channel:
        for c in range(h * nd):
            cs[c], co[c] = _f16(kcs[c]), _f16(kco[c])
    has_valid = valid.shape[1] > 0
    per_head_valid = valid.shape[0] > 1
    width = min(BLOCK, t1 - t0)
    kf = _scratch3(h, width, nd)  # 64-byte aligned scratch: see cpu._aligned
    vf = _scratch3(h, width, nd)
    sc = _scratch3(h, nrows, width)
    ok = np.ones((h, width), np.float32)
    # a block's outlier entries: token, value (decoded; with its scratch), and where each column lands in kf / vf
    tok = np.empty(width * h * nd + 16, np.uint8)
    obits = np.empty(width * h * nd, np.uint32)
    of = obits.view(np.float32)
    oval = np.empty(width * h * nd, np.float32)
    cflat = np.empty(h * nd, np.uint64)
    for c in range(h * nd):
        cflat[c] = uint64(colmap[0, c]) * uint64(width * nd) + uint64(colmap[1, c])
    kflat, vflat = kf.reshape(h * width * nd), vf.reshape(h * width * nd)
    vmarks = vflat.view(np.uint32)
    if fused_values:  # vf holds only the outliers of a block, every other entry the mark (_level_values)
        vmarks[:] = MARK
    kheld = _scratch3(h if fused_keys else 0, width, nd)  # the same for the keys (_turned_keys)
    kheldflat = kheld.reshape(kheld.size)
    kheldflat.view(np.uint32)[:] = MARK
    seen = np.zeros(h, np.int64)
    ebits = np.empty(width, np.int32)
    escale = ebits.view(np.float32)
    hbuf = np.empty(width, np.uint32)  # the vector path's per-token ranges of a block, decoded (and scratch)
    hf = hbuf.view(np.float32)
    tsf, tof = np.empty(width, np.float32), np.empty(width, np.float32)
    bias = np.zeros(nrows, np.float32)
    empty = np.zeros((nrows, 0), np.float32)
    acc = _scratch3(h, nrows, nd)
    acc[:] = 0.0
    m = np.full((h, nrows), -np.inf, np.float32)
    l = np.zeros((h, nrows), np.float32)
    # rotation state: cos/sin of the current position (float64), the one-step rotation, the values used (float32)
    cur_c = np.empty(half, np.float64)
    cur_s = np.empty(half, np.float64)
    step_c = np.cos(inv64)
    step_s = np.sin(inv64)
    use_c = np.empty(half, np.float32)
    use_s = np.empty(half, np.float32)
    tok_c = np.empty((1, half), np.float32)  # one token's cos/sin times the scaling (a jump inside a block)
    tok_s = np.empty((1, half), np.float32)
    prev, since = np.int64(-2), EXACT_EVERY
    # the block path: cos/sin of a block's first position (float64), the jump to the next block's, the query turned
    # there, and cos/sin of offsets 0 .. BLOCK-1 times the attention scaling (float32; one step at a time in float64)
    base_c = np.empty(half, np.float64)
    base_s = np.empty(half, np.float64)
    jump_c = np.cos(inv64 * BLOCK)
    jump_s = np.sin(inv64 * BLOCK)
    prev0, blocks_since = np.int64(-(1 << 62)), 0
    qturn = _scratch3(h, nrows, nd)
    off_c = np.empty((BLOCK, half), np.float32)
    off_s = np.empty((BLOCK, half), np.float32)
    if rope:
        for i in range(BLOCK):
            _angles_at(cur_c, cur_s, step_c, step_s, inv64, 0, i == 0)
            for j in range(half):
                off_c[i, j] = np.float32(cur_c[j] * rope_scale)
                off_s[i, j] = np.float32(cur_s[j] * rope_scale)
    # CSR offsets of row (ta, 0): carried from block to block
    ke, ve = _entries_between(kcounts, 0, t0), _entries_between(vcounts, 0, t0)

    ta = t0
    while ta < t1:
        nt = min(BLOCK, t1 - ta)
        any_seen = 0
        for hh in range(h):
            seen[hh] = nt
            if has_valid:
                vh = hh if per_head_valid else 0
                cnt = 0
                for i in range(nt):
                    ok[hh, i] = 1.0 if valid[vh, ta + i] else 0.0
                    cnt += 1 if valid[vh, ta + i] else 0
                seen[hh] = cnt
            any_seen += seen[hh]
        if any_seen == 0:
            ke += _entries_between(kcounts, ta, ta + nt)
            ve += _entries_between(vcounts, ta, ta + nt)
            ta += nt
            continue
        steady, pos0 = False, np.int64(0)
        if rope:
            pos0 = pos_start + ta if pos_start >= 0 else np.int64(positions[ta])
            steady = pos_start >= 0
            if not steady:  # stored positions: the block path needs them consecutive
                steady = True
                for i in range(nt):
                    steady = steady and np.int64(positions[ta + i]) == pos0 + i
        qb = q
        if rope and steady:
            # score = (R(-pos0) q) . (R(i) k): the query turned once per block to its first position, each key by its
            # offset i from the table
            exact = not (pos0 == prev0 + BLOCK and blocks_since < EXACT_EVERY // BLOCK)
            _angles_at(base_c, base_s, jump_c, jump_s, inv64, pos0, exact)
            blocks_since = 0 if exact else blocks_since + 1
            prev0 = pos0
            for j in range(half):
                use_c[j] = np.float32(base_c[j])
                use_s[j] = np.float32(base_s[j])
            for hh in range(h):
                for r in range(nrows):
                    for j in range(uhalf):
                        x, y = q[hh, r, j], q[hh, r, j + uhalf]
                        qturn[hh, r, j] = x * use_c[j] + y * use_s[j]
                        qturn[hh, r, j + uhalf] = y * use_c[j] - x * use_s[j]
            qb = qturn
        turned = fused_keys and steady  # keys turned by their offsets as they are dequantized (_turned_keys)
        if turned:
            koutliers = kcounts.shape[2] > 0
            if koutliers:
                ke = _outliers_block(kcounts, krp, ke, kcols, kvals, colmap, cflat, bi, ta, nt, kheld, kheldflat, tok,
                                     obits, of, oval)
            for hh in range(h):  # each head scored right after its keys are made (its rows still in L1)
                _turned_keys(kbits, kw0[hh], kw1[hh], ktab16, cs[hh * nd : hh * nd + nd], co[hh * nd : hh * nd + nd],
                             ta, nt, off_c, off_s, kheld[hh], koutliers, kf[hh])
                if seen[hh] > 0:
                    _scores_vec(qb[hh], bias, kf[hh], uint64(nt), sc[hh], d)
                    _softmax_block(sc[hh], nt, ok[hh], m[hh], l[hh], acc[hh], empty, empty, ebits, escale)
        else:
            for hh in range(h):
                ksel = hh if kts.shape[0] > 1 else 0
                if vec:
                    _dequant_vec(kbits, kw0[hh], kw1[hh], klo, khi, ktab, kper_channel, cs[hh * nd : hh * nd + nd],
                                 co[hh * nd : hh * nd + nd], kts[ksel], kto[ksel], ta, nt, kf[hh], hbuf, hf, tsf, tof)
                else:
                    _dequant_block(kbits, kp0[hh], kp1[hh], kw0[hh], kw1[hh], klev16, kper_channel,
                                   cs[hh * nd : hh * nd + nd], co[hh * nd : hh * nd + nd], kts[ksel], kto[ksel], ta,
                                   nt, kf[hh])
            if kcounts.shape[2] > 0:
                ke = _outliers_block(kcounts, krp, ke, kcols, kvals, colmap, cflat, bi, ta, nt, kf, kflat, tok, obits,
                                     of, oval)
            if rope and steady:  # each key turned by its offset in the block
                for i in range(nt):
                    for hh in range(h):
                        _turn_key(kf[hh], i, off_c, off_s, i, half, vec)
            elif rope:  # a jump inside the block: every key turned to its own position (exact cos/sin, or one step on)
                prev0 = np.int64(-(1 << 62))
                for i in range(nt):
                    pos = np.int64(positions[ta + i])
                    exact = not (pos == prev + 1 and since < EXACT_EVERY)
                    _angles_at(cur_c, cur_s, step_c, step_s, inv64, pos, exact)
                    since = 0 if exact else since + 1
                    prev = pos
                    for j in range(half):
                        tok_c[0, j] = np.float32(cur_c[j] * rope_scale)
                        tok_s[0, j] = np.float32(cur_s[j] * rope_scale)
                    for hh in range(h):
                        _turn_key(kf[hh], i, tok_c, tok_s, 0, half, vec)
            for hh in range(h):
                if seen[hh] == 0:
                    continue
                if d % 64 == 0:  # in vector registers (eight tokens' dot products reduced at once)
                    _scores_vec(qb[hh], bias, kf[hh], uint64(nt), sc[hh], d)
                else:
                    _scores_block(qb[hh], bias, kf[hh], uint64(0), uint64(nt), sc[hh], d)
                _softmax_block(sc[hh], nt, ok[hh], m[hh], l[hh], acc[hh], empty, empty, ebits, escale)
        if fused_values:  # the values never stored: their levels added from registers, the outliers read from vf
            outliers = vcounts.shape[2] > 0
            if outliers:
                ve = _outliers_block(vcounts, vrp, ve, vcols, vvals, colmap, cflat, bi, ta, nt, vf, vflat, tok, obits,
                                     of, oval)
            for hh in range(h):
                if seen[hh] == 0:  # nothing read: the head's outliers of this block cleared for the next
                    if outliers:
                        for j in range(hh * width * nd, (hh * width + nt) * nd):
                            vmarks[j] = MARK
                    continue
                vsel = hh if vts.shape[0] > 1 else 0
                _halves(vts[vsel], uint64(ta), uint64(nt), hbuf, hf, tsf)
                _halves(vto[vsel], uint64(ta), uint64(nt), hbuf, hf, tof)
                _level_values(vbits, vw0[hh], vw1[hh], vtab16, tsf, tof, ta, nt, sc[hh], acc[hh], vf[hh], outliers)
            ta += nt
            continue
        for hh in range(h):
            vsel = hh if vts.shape[0] > 1 else 0
            if vec:
                _dequant_vec(vbits, vw0[hh], vw1[hh], vlo, vhi, vtab, False, cs[:nd], co[:nd], vts[vsel], vto[vsel], ta,
                             nt, vf[hh], hbuf, hf, tsf, tof)
            else:
                _dequant_block(vbits, vp0[hh], vp1[hh], vw0[hh], vw1[hh], vlev16, False, cs[:nd], co[:nd], vts[vsel],
                               vto[vsel], ta, nt, vf[hh])
        if vcounts.shape[2] > 0:
            ve = _outliers_block(vcounts, vrp, ve, vcols, vvals, colmap, cflat, bi, ta, nt, vf, vflat, tok, obits, of,
                                oval)
        for hh in range(h):
            if seen[hh] == 0:
                continue
            if d % 64 == 0:  # accumulators in vector registers over the block
                _values_vec(vf[hh], uint64(nt), sc[hh], acc[hh], d)
            else:
                _values_block(vf[hh], uint64(0), uint64(nt), sc[hh], bias, uint64(0), acc[hh], empty, d)
        ta += nt

    for hh in range(h):
        for r in range(nrows):
            m_out[hh, r] = m[hh, r]
            l_out[hh, r] = l[hh, r]
            for c in range(nd):
                acc_out[hh, r, c] = acc[hh, r, c]


@njit(cache=True, fastmath=_FM)
def _run_item(item, qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, krp, kcols,
              kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vrp, vcols, vvals, colmap, inv_freq,
              rope_scale, pos_start, positions, valid, n, span, pacc, pm, pl):
    """Token range ``item % splits`` of batch row ``item // splits`` (all its KV heads) into ``pacc[bi, :, si]``,
    ``pm``, ``pl`` (``(b, h, splits, rows[, d])``: the layout :func:`kvcompress.kernels.cpu._merge` reads)."""
    splits = pm.shape[2]
    bi, si = item // splits, item % splits
    t0, t1 = si * span, min((si + 1) * span, n)
    vmask = valid[bi] if valid.shape[2] > 0 else valid[0]
    kr = min(bi, kcs.shape[0] - 1)
    pr = min(bi, positions.shape[0] - 1)
    _attend_range(qg[bi], kbits, kp0[bi], kp1[bi], kw0[bi], kw1[bi], klev, kper_channel, kcs[kr], kco[kr], kts[bi],
                  kto[bi], kcounts, krp, kcols, kvals, vbits, vp0[bi], vp1[bi], vw0[bi], vw1[bi], vlev, vts[bi],
                  vto[bi], vcounts, vrp, vcols, vvals, colmap, bi, inv_freq, rope_scale, pos_start, positions[pr],
                  vmask, t0, t1, pacc[bi, :, si], pm[bi, :, si], pl[bi, :, si])


@njit(cache=True, fastmath=_FM)
def _absorb_tail(q, tk, tv, acc, m, l):
    """Fold dense tokens ``tk``/``tv (h, nt, d)`` float32, seen by every query row, into one batch row's partials
    ``acc (h, rows, d)``, ``m``/``l (h, rows)`` (online softmax; ``q (h, rows, d)`` scaled): a decode step's few
    full-precision tokens (KVQuant's sink, recent window and the new token) join the kernel's result in the same call
    instead of a dense softmax and a log-sum-exp merge in torch."""
    h, rows, d = q.shape
    nt = tk.shape[1]
    if nt == 0:
        return
    s = np.empty(nt, np.float32)
    for hh in range(h):
        for r in range(rows):
            mx = m[hh, r]
            for j in range(nt):
                x = np.float32(0.0)
                for c in range(d):
                    x += q[hh, r, c] * tk[hh, j, c]
                s[j] = x
                mx = max(mx, x)
            alpha = np.float32(np.exp(m[hh, r] - mx)) if m[hh, r] > -np.inf else np.float32(0.0)
            total = l[hh, r] * alpha
            for c in range(d):
                acc[hh, r, c] *= alpha
            for j in range(nt):
                p = np.float32(np.exp(s[j] - mx))
                total += p
                for c in range(d):
                    acc[hh, r, c] += p * tv[hh, j, c]
            m[hh, r] = mx
            l[hh, r] = total


@njit(cache=True, inline="always")
def _partials(qg, n, span):
    """What both twins set up: the number of (batch row, token range) items and the per-range partials ``pacc (b, h,
    splits, rows, d)``, ``pm``/``pl (b, h, splits, rows)``."""
    b, h, rows, d = qg.shape
    splits = (n + span - 1) // span
    pacc = np.empty((b, h, splits, rows, d), np.float32)
    pm, pl = np.empty((b, h, splits, rows), np.float32), np.empty((b, h, splits, rows), np.float32)
    return b * splits, pacc, pm, pl


@njit(cache=True, parallel=True)
def kvquant_layer_parallel(qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, kcols,
                           kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vcols, vvals, colmap, inv_freq,
                           rope_scale, pos_start, positions, valid, n, span, tk, tv, acc, m, l):
    """Every (batch row, token range) under ``prange``, then the merge per (batch row, KV head)
    (:func:`kvcompress.kernels.cpu._merge`, as for KIVI).

    ``qg (b, h, rows, d)`` fp32; ``*bits`` 2/3/4; planes ``*p0``/``*p1 (b, h, >= n, bytes)``
    uint8 (``*p1``: the high bits of 3-bit codes, else 0 tokens); ``*lev (2**bits,)`` float32 levels; keys per
    channel (``kper_channel``: ``kcs``/``kco (1|b, h*d)``, fp16 bits as uint16) or per token (``kts``/``kto (b,
    1|h, >= n)``, fp16 bits as uint16); values per token ``vts``/``vto``; outliers as counts ``kcounts``/``vcounts (b,
    1, >= n, width)`` per (batch row, token) (``(b, 1, 0, 1)``: none) and ``*cols (>= nnz, width)`` -- the held
    integers as their bytes (:func:`_small`) -- and ``*vals`` (fp16 bits) in token-major CSR
    order, ``colmap (2, h*d)`` column -> (KV head, channel); ``*w0``/``*w1``: the planes as
    64-bit words ``(b, h, >= n, words)`` or ``(b, h, 1, 0)`` (bytes are read); ``inv_freq (d/2,)`` float32 (empty: no
    rotation); ``positions (1|b, >= n)`` int (``pos_start < 0``); ``valid (b, h|1,
    n)`` bool or ``(1, 1, 0)``; ``tk``/``tv (b, h, nt, d)`` float32: dense tokens every row sees, folded in after the
    merge (:func:`_absorb_tail`; ``nt = 0``: none); results into ``acc (b, h, rows, d)``, ``m``/``l (b, h, rows)``."""
    b, h, rows, d = qg.shape
    items, pacc, pm, pl = _partials(qg, n, span)
    krp, vrp = _row_pointers(kcounts, n), _row_pointers(vcounts, n)
    for item in prange(items):
        _run_item(item, qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, krp, kcols,
                  kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vrp, vcols, vvals, colmap, inv_freq,
              rope_scale,
                  pos_start, positions, valid, n, span, pacc, pm, pl)
    splits = pm.shape[2]
    flat_acc, flat_m, flat_l = (pacc.reshape(b * h * splits, rows, d), pm.reshape(b * h * splits, rows),
                                pl.reshape(b * h * splits, rows))
    for bh in prange(b * h):
        _merge(bh, flat_acc, flat_m, flat_l, acc, m, l)
    if tk.shape[2] > 0:
        for bi in prange(b):
            _absorb_tail(qg[bi], tk[bi], tv[bi], acc[bi], m[bi], l[bi])


@njit(cache=True)
def kvquant_layer_serial(qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, kcols,
                         kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vcols, vvals, colmap, inv_freq,
                         rope_scale, pos_start, positions, valid, n, span, tk, tv, acc, m, l):
    """:func:`kvquant_layer_parallel` on the calling thread."""
    b, h, rows, d = qg.shape
    items, pacc, pm, pl = _partials(qg, n, span)
    krp, vrp = _row_pointers(kcounts, n), _row_pointers(vcounts, n)
    for item in range(items):
        _run_item(item, qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, krp, kcols,
                  kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vrp, vcols, vvals, colmap, inv_freq,
              rope_scale,
                  pos_start, positions, valid, n, span, pacc, pm, pl)
    splits = pm.shape[2]
    flat_acc, flat_m, flat_l = (pacc.reshape(b * h * splits, rows, d), pm.reshape(b * h * splits, rows),
                                pl.reshape(b * h * splits, rows))
    for bh in range(b * h):
        _merge(bh, flat_acc, flat_m, flat_l, acc, m, l)
    if tk.shape[2] > 0:
        for bi in range(b):
            _absorb_tail(qg[bi], tk[bi], tv[bi], acc[bi], m[bi], l[bi])


# --------------------------------------------------------------------------------------------------------------------
# Quantizing a decode step's tokens (one call instead of ~60 small torch ops per stream)
# --------------------------------------------------------------------------------------------------------------------


#: adding then subtracting 1.5 * 2**23 rounds a float32 in [0, 2**22) to an integer, ties to even (what
#: ``torch.round`` does; ``np.rint`` in numba returns float64, which keeps a loop from vectorizing as float32). Only
#: in functions compiled without fast-math (reassociation would fold the two operations away).
_ROUNDER = np.float32(12582912.0)


@njit(cache=True, inline="always")
def _half_bits(v):
    """The fp16 bits (uint16) of float32 ``v`` rounded to the nearest fp16, ties to even (numpy's and torch's cast:
    beyond the range inf, the sign of zero kept, a NaN a quiet NaN with its sign), by integer operations on its bits;
    selects, no branches (a loop over statistics vectorizes). ``_f16(_half_bits(v))`` is ``v`` rounded to fp16."""
    u = np.float32(v).view(np.uint32)
    sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
    a = np.uint32(u & np.uint32(0x7FFFFFFF))
    special = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)  # NaN; inf (65520 and up too)
    # below 2**-14: an fp16 subnormal, a multiple of 2**-24 (exact scaling, then ties to even)
    tiny = np.uint32((min(abs(np.float32(v)), np.float32(6.103515625e-05)) * np.float32(16777216.0) + _ROUNDER)
                     - _ROUNDER)
    rounded = np.uint32(a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1)))  # 13 bits dropped, ties to even
    normal = np.uint32((rounded >> np.uint32(13)) - np.uint32(0x1C000))  # the exponent rebased from 127 to 15
    body = tiny if a < np.uint32(0x38800000) else normal
    return np.uint16(sign | (special if a >= np.uint32(0x477FF000) else body))


_KEY_MAX = np.int32(2**31 - 1)
_KEY_MIN = np.int32(-(2**31))


@njit(cache=True, inline="always")
def _key(bits):
    """float32 bits (int32) <-> an int32 that orders as the floats do (-0.0 before +0.0; a NaN beyond the infinity
    of its sign); its own inverse. Integer min/max reductions vectorize, float ones (NaN-aware) do not."""
    return bits ^ ((bits >> 31) & _KEY_MAX)


@njit(cache=True, inline="always")
def _float_keys(keys):
    """:func:`_key` of every element of ``keys`` (int32, in place); its own inverse."""
    for c in range(uint64(keys.shape[0])):
        keys[c] = _key(keys[c])


@njit(cache=True, inline="always")
def _order_stats(row, m, pair):
    """``(lo, hi, fast)``: the ``m+1``-th smallest and largest value of ``row`` (float32, counted with repeats: what
    :func:`quantize_rows`' insertion finds), by a few integer passes over the row that vectorize -- a min/max pass,
    then per round the count of the current candidate and the next one above/below it (``m = 1``: two passes). The
    row's bits are ordered as int32 keys meanwhile (:func:`_float_keys`) and restored. ``fast`` False where the row
    holds a NaN or ``lo``/``hi`` is zero (a zero's sign can differ): the caller takes the scalar insertion there.
    ``pair``: float32 scratch of two elements."""
    w = uint64(row.shape[0])
    keys = row.view(np.int32)
    nan = 0
    for c in range(w):
        nan += 1 if row[c] != row[c] else 0
    _float_keys(keys)
    lo_k, hi_k = _KEY_MAX, _KEY_MIN
    for c in range(w):
        lo_k = min(lo_k, keys[c])
        hi_k = max(hi_k, keys[c])
    need_lo = need_hi = m + 1
    for _ in range(w):  # (each round takes at least one element: the keys count w in all)
        if need_lo <= 0 and need_hi <= 0:
            break
        n_lo = n_hi = 0
        next_lo, next_hi = _KEY_MAX, _KEY_MIN
        for c in range(w):
            k = keys[c]
            n_lo += 1 if k == lo_k else 0
            n_hi += 1 if k == hi_k else 0
            next_lo = min(next_lo, k if k > lo_k else _KEY_MAX)
            next_hi = max(next_hi, k if k < hi_k else _KEY_MIN)
        if need_lo > 0:
            need_lo -= n_lo
            if need_lo > 0:
                lo_k = next_lo
        if need_hi > 0:
            need_hi -= n_hi
            if need_hi > 0:
                hi_k = next_hi
    _float_keys(keys)
    both = pair.view(np.int32)
    both[0], both[1] = lo_k, hi_k
    _float_keys(both)
    lo, hi = pair[0], pair[1]
    return lo, hi, nan == 0 and lo != 0 and hi != 0


@njit(cache=True, inline="always")
def _gather_flagged(row, flag, cols, vals, e):
    """Append ``(c, row[c])`` for every ``c`` with ``flag[c]`` (uint8 0/1, zero-padded to whole 8-byte words) to
    ``cols``/``vals`` from entry ``e`` (room for every channel after it); returns the new end. Eight flags are tested as
    one word (a token's few outliers cost a branch each, the rest one test per eight channels); a flagged word's
    entries are written branch-free."""
    words = flag.view(np.uint64)
    w = uint64(row.shape[0])
    for j in range(words.shape[0]):
        if words[j] != 0:
            for c in range(uint64(j) * _8, min(uint64(j) * _8 + _8, w)):
                cols[e] = c
                vals[e] = row[c]
                e += flag[c]
    return e


# error_model="numpy": a division without numba's zero-divisor check (which raised where numpy gives inf/NaN, and
# kept every loop with a division scalar: the un-rotation and the normalization ran ~5x slower)
@njit(cache=True, error_model="numpy")
def quantize_rows(x, bits, mids, per_channel, ch_off, ch_scale, m, planes0, planes1, t0, ranges, counts, cols, vals,
                  cos, sin):
    """KVQuant's quantization of the tokens ``x (b, h, q, d)`` float32, written in place (the arithmetic of
    :meth:`kvcompress.methods.kvquant_store.QuantStream.append`, operation for operation), token by token over rows of
    ``w = h*d`` channels.

    ``per_channel``: thresholds ``ch_off -/+ ch_scale (1|b, w)`` (fp16 bits, uint16), values beyond them are outliers,
    the rest clamped and normalized by the channel's range; else one range per token over the row: thresholds the
    ``m+1``-th smallest and largest values (``m = 0``: none; ``m < 0``: no outliers), offset/scale the fp16-rounded
    mid-range/half-range of the clamped row (``ranges (2, b, q)``: scale, offset; a row with a NaN is an error, as on
    the torch path). Codes = nearest level (``mids``: the sorted levels' midpoints), packed into tokens ``t0 .. t0 +
    q`` of ``planes0 (b, h, cap, bytes)`` (2/4 bits, or the low 2 bits of 3) and ``planes1`` (3 bits: the high bit):
    the stream's own buffers, written in place. Outliers (``m >= 0`` or per channel with ``counts``): ``counts (q,
    b)``, ``cols``/``vals (>= q*b*w)`` filled token-major. ``cos``/``sin (1|b, q, d)`` float32 (``(1, 0, 0)``: none):
    each head's row is first un-rotated from these, as :func:`kvcompress.rope.unapply_rope` does (the same float32
    operations: pre-RoPE keys from the model's post-RoPE ones). Returns ``(nnz, ok)``: ``ok`` False when a range is not
    finite in fp16. Indices are uint64 where a loop should vectorize (numba wraps negative signed indices: a select
    per access)."""
    b, h, q, d = x.shape
    w = h * d
    W, D, H, T0 = uint64(w), uint64(d), uint64(h), uint64(t0)
    track = counts.shape[0] > 0
    nnz = 0
    ok = True
    row = np.empty(w, np.float32)
    flag = np.zeros(w + 8, np.uint8)  # outlier flags (zero past w: whole 8-byte words)
    los = np.empty(max(m + 1, 1), np.float32)
    his = np.empty(max(m + 1, 1), np.float32)
    codes = np.empty(w, np.int32)
    scratch = np.empty(2, np.float32)
    nm = uint64(mids.shape[0])
    # the per-channel range decoded once, not per token: offset, thresholds offset -/+ scale, divisor (scale or 1)
    offs = np.empty(ch_off.shape, np.float32)
    lows = np.empty(ch_off.shape, np.float32)
    highs = np.empty(ch_off.shape, np.float32)
    divs = np.empty(ch_off.shape, np.float32)
    for r in range(ch_off.shape[0]):
        for c in range(ch_off.shape[1]):
            o, sc = _f16(ch_off[r, c]), _f16(ch_scale[r, c])
            offs[r, c], lows[r, c], highs[r, c] = o, o - sc, o + sc
            divs[r, c] = sc if sc > 0 else np.float32(1.0)
    unrotate = cos.shape[1] > 0
    half = D // _2
    for t_ in range(q):
        t = uint64(t_)
        for b_ in range(b):
            bi = uint64(b_)
            if unrotate:  # y*cos - rotate_half(y)*sin, over cos*cos + sin*sin (rotate_half(y) = [-y2, y1])
                cr = uint64(min(b_, cos.shape[0] - 1))
                for hh in range(H):
                    o = hh * D
                    for c in range(half):
                        cc, ss = cos[cr, t, c], sin[cr, t, c]
                        row[o + c] = (x[bi, hh, t, c] * cc + x[bi, hh, t, c + half] * ss) / (cc * cc + ss * ss)
                    for c in range(half, D):
                        cc, ss = cos[cr, t, c], sin[cr, t, c]
                        row[o + c] = (x[bi, hh, t, c] * cc - x[bi, hh, t, c - half] * ss) / (cc * cc + ss * ss)
            else:
                for hh in range(H):
                    o = hh * D
                    for c in range(D):
                        row[o + c] = x[bi, hh, t, c]
            cnt = 0
            # loops without stores that depend on the data (outliers are flagged, then gathered) vectorize
            if per_channel:
                cr = uint64(min(b_, ch_off.shape[0] - 1))
                if track:
                    for c in range(W):
                        v = row[c]
                        flag[c] = 1 if (v > highs[cr, c]) | (v < lows[cr, c]) else 0
                    e = _gather_flagged(row, flag, cols, vals, nnz)
                    cnt, nnz = e - nnz, e
                for c in range(W):
                    v = min(max(row[c], lows[cr, c]), highs[cr, c])
                    vn = (v - offs[cr, c]) / divs[cr, c]
                    row[c] = min(max(vn, np.float32(-1.0)), np.float32(1.0))
            else:
                fast = False
                if m >= 0:
                    lo, hi, fast = _order_stats(row, m, scratch)
                    if not fast:  # a NaN or a zero threshold: the scalar insertion of the m+1 extremes
                        for j in range(m + 1):
                            los[j] = np.float32(np.inf)
                            his[j] = np.float32(-np.inf)
                        for c in range(W):
                            v = row[c]
                            if v < los[m]:
                                j = m
                                while j > 0 and los[j - 1] > v:
                                    los[j] = los[j - 1]
                                    j -= 1
                                los[j] = v
                            if v > his[m]:
                                j = m
                                while j > 0 and his[j - 1] < v:
                                    his[j] = his[j - 1]
                                    j -= 1
                                his[j] = v
                        lo, hi = los[m], his[m]
                    for c in range(W):
                        v = row[c]
                        flag[c] = 1 if (v > hi) | (v < lo) else 0
                    e = _gather_flagged(row, flag, cols, vals, nnz)
                    cnt, nnz = e - nnz, e
                    for c in range(W):
                        row[c] = min(max(row[c], lo), hi)
                if fast:  # the clamped row's min/max are the thresholds themselves (nonzero: the same bits)
                    mn, mx = lo, hi
                else:
                    nan = 0
                    mn, mx = row[0], row[0]
                    for c in range(W):
                        nan += 1 if row[c] != row[c] else 0
                        mn = min(mn, row[c])
                        mx = max(mx, row[c])
                    if nan:  # the torch path's min/max would be NaN: not finite
                        ok = False
                off = _f16(_half_bits((mx + mn) / np.float32(2.0)))
                sc = _f16(_half_bits((mx - mn) / np.float32(2.0)))
                if not (abs(off) < np.inf and abs(sc) < np.inf):
                    ok = False
                ranges[0, b_, t_] = sc
                ranges[1, b_, t_] = off
                div = sc if sc > 0 else np.float32(1.0)
                for c in range(W):
                    row[c] = (row[c] - off) / div
            if track:
                counts[t_, b_] = cnt
            # nearest level = the number of midpoints strictly below (torch.bucketize), a level at a time over the row
            for c in range(W):
                codes[c] = 0
            for j in range(nm):
                mj = mids[j]
                for c in range(W):
                    codes[c] += 1 if mj < row[c] else 0
            for hh in range(H):
                o = hh * D
                if bits == 4:
                    for u in range(D // _2):
                        planes0[bi, hh, T0 + t, u] = codes[o + _2 * u] | (codes[o + _2 * u + _1] << 4)
                else:
                    for u in range(D // _4):
                        planes0[bi, hh, T0 + t, u] = ((codes[o + _4 * u] & 3) | ((codes[o + _4 * u + _1] & 3) << 2)
                                                      | ((codes[o + _4 * u + _2] & 3) << 4)
                                                      | ((codes[o + _4 * u + _3] & 3) << 6))
                    if bits == 3:
                        for u in range(D // _8):
                            byte = 0
                            for k in range(8):
                                byte |= (codes[o + _8 * u + uint64(k)] >> 2) << k
                            planes1[bi, hh, T0 + t, u] = byte
    return nnz, ok


# --------------------------------------------------------------------------------------------------------------------
# A whole decode step in as few calls as possible (each torch / numpy call inside a forward costs ~0.1 ms: the
# model's matmuls have just flushed the caches)
# --------------------------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _put_small(raw, i, value):
    """Entry ``i`` of a held array of small non-negative integers seen as its little-endian bytes ``raw (..., width)``
    (:func:`_small`'s layout) set to ``value``."""
    for k in range(raw.shape[-1]):
        raw[i, k] = (value >> (8 * k)) & 255


@njit(cache=True)
def quantize_into(x, bits, mids, per_channel, ch_off, ch_scale, m, planes0, planes1, t0, scale_bits,
                  offset_bits, has_sparse, counts, cols, vals, e0, cos, sin):
    """:func:`quantize_rows` of ``x (b, h, q, d)`` float32 (the model's layout, read in place) with everything
    written straight into the stream's buffers: codes into ``planes0``/``planes1`` at tokens ``t0 .. t0 + q``;
    per-token ranges (not ``per_channel``) as fp16 bits into ``scale_bits``/``offset_bits (b, 1, cap)``; with
    ``has_sparse`` the outlier count of each (token, batch row) into ``counts (b, 1, cap, width)`` and, when they fit
    in the room after entry ``e0`` of ``cols (1, 1, cap, width)`` / ``vals (1, 1, cap)`` (fp16 bits), the entries
    themselves (``counts``/``cols``: the held integers as bytes, :func:`_small`). Returns ``(nnz, ok, in_place, cols
    (nnz,) int32, vals (nnz,) float32)``: the entries are also returned for the caller to place when they did not fit
    (``in_place`` False; nothing written there); ``ok`` False when a range is not finite in fp16 (then nothing is
    meant to be committed)."""
    b, h, q, d = x.shape
    w = h * d
    ranges = np.empty((2, b, q), np.float32)
    n_counts = np.empty((q, b) if has_sparse else (0, 0), np.int32)
    n_cols = np.empty(q * b * w if has_sparse else 0, np.int32)
    n_vals = np.empty(n_cols.shape[0], np.float32)
    nnz, ok = quantize_rows(x, bits, mids, per_channel, ch_off, ch_scale, m, planes0, planes1, t0, ranges,
                            n_counts, n_cols, n_vals, cos, sin)
    in_place = False
    if not ok:
        return nnz, ok, in_place, n_cols[:nnz], n_vals[:nnz]
    if not per_channel:
        for bi in range(b):
            for t in range(q):
                scale_bits[bi, 0, t0 + t] = _half_bits(ranges[0, bi, t])
                offset_bits[bi, 0, t0 + t] = _half_bits(ranges[1, bi, t])
    if has_sparse:
        for t in range(q):
            for bi in range(b):
                _put_small(counts[bi, 0], t0 + t, n_counts[t, bi])
        if nnz <= vals.shape[2] - e0:
            for k in range(nnz):
                _put_small(cols[0, 0], e0 + k, n_cols[k])
                vals[0, 0, e0 + k] = _half_bits(n_vals[k])
            in_place = True
    return nnz, ok, in_place, n_cols[:nnz], n_vals[:nnz]


@njit(cache=True)
def kvquant_decode_step(query, scaling, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts,
                        kcols, kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vcols, vvals, colmap,
                        inv_freq, rope_scale, pos_start, positions, held_k, held_v, bf16, new_k, new_v, n, span, out):
    """One query token's attention output over ``n`` tokens of codes then dense tokens, in one call: the query heads
    folded into their KV groups and scaled, the held 2-byte tokens (the sink and the recent window: ``held_k``/``held_v
    (b, h, r, d)`` uint16 fp16 bits, bfloat16 with ``bf16``) decoded and followed by the step's ``new_k``/``new_v (b, h,
    nq, d)`` float32 as the dense tail, the layer kernel over token ranges of ``span`` (:func:`kvquant_layer_serial`
    for one range, ``span >= n``; else :func:`kvquant_layer_parallel`, on numba's threads), then ``acc / l``
    (:func:`normalize_into`). No fast-math here: the scaling, the decoding and the division are the IEEE operations
    torch does on the general path, so the output is the same bit for bit. ``query (b, heads, d)`` float32
    (unscaled); the code arguments as :func:`kvquant_layer_parallel` (no validity); ``out (b, heads, d)`` float32."""
    b, heads, d = query.shape
    h = new_k.shape[1]
    g = heads // h
    qg = fold_query(query, scaling, h)
    r, nq = held_k.shape[2], new_k.shape[2]
    hk = np.empty(held_k.shape, np.float32)
    hv = np.empty(held_v.shape, np.float32)
    _two_byte_floats(held_k, bf16, hk)
    _two_byte_floats(held_v, bf16, hv)
    tk = np.empty((b, h, r + nq, d), np.float32)
    tv = np.empty((b, h, r + nq, d), np.float32)
    for bi in range(b):
        for hh in range(h):
            for j in range(r + nq):
                for c in range(d):
                    if j < r:
                        tk[bi, hh, j, c] = hk[bi, hh, j, c]
                        tv[bi, hh, j, c] = hv[bi, hh, j, c]
                    else:
                        tk[bi, hh, j, c] = new_k[bi, hh, j - r, c]
                        tv[bi, hh, j, c] = new_v[bi, hh, j - r, c]
    acc = np.empty((b, h, g, d), np.float32)
    m = np.empty((b, h, g), np.float32)
    l = np.empty((b, h, g), np.float32)
    if span < n:  # more than one token range: the threaded twin (the caller holds numba's pool for it)
        kvquant_layer_parallel(qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, kcols,
                               kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vcols, vvals, colmap, inv_freq,
                               rope_scale, pos_start, positions, np.ones((1, 1, 0), np.bool_), n, span, tk, tv, acc, m,
                               l)
    else:
        kvquant_layer_serial(qg, kbits, kp0, kp1, kw0, kw1, klev, kper_channel, kcs, kco, kts, kto, kcounts, kcols,
                             kvals, vbits, vp0, vp1, vw0, vw1, vlev, vts, vto, vcounts, vcols, vvals, colmap, inv_freq,
                             rope_scale, pos_start, positions, np.ones((1, 1, 0), np.bool_), n, span, tk, tv, acc, m, l)
    normalize_into(acc, l, out)  # l >= 1 (the tail's newest token scores exp(0) or more): acc / l


@structref.register
class DecodePlanType(types.StructRef):
    """numba's type of a :class:`DecodePlan` (its fields' types, literals widened)."""

    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(t)) for name, t in fields)


class DecodePlan(structref.StructRefProxy):
    """What :func:`kvquant_decode_append` reads unchanged from step to step, as one object: ``streams``/``rotation``/
    ``held``, :func:`kvquant_decode_step`'s code, rotation and held-token arguments as tuples in its order, ``colmap``
    its column map; ``khead``/``ktail``/``vhead``/``vtail``, :func:`quantize_into`'s arguments before and after the
    first token's index for keys and values; ``plain``, an empty ``(cos, sin)`` (values are not un-rotated). numba
    unboxes it as one pointer where the same ~46 arrays passed in tuples cost ~36 us of dispatch per call inside the
    model (9 us this way, session 26). Made by :func:`decode_plan`; it holds views of the buffers it was made from, so
    whoever keeps it drops it with them."""


structref.define_proxy(DecodePlan, DecodePlanType,
                       ["streams", "colmap", "rotation", "held", "khead", "ktail", "vhead", "vtail", "plain"])


@njit(cache=True)
def decode_plan(streams, colmap, rotation, held, khead, ktail, vhead, vtail, plain):
    """A :class:`DecodePlan` of these fields (compiled and cached like the kernels; the proxy's own constructor is
    compiled anew in every process)."""
    return DecodePlan(streams, colmap, rotation, held, khead, ktail, vhead, vtail, plain)


@njit(cache=True)
def kvquant_decode_append(query, scaling, plan, new_k, new_v, n, span, out, kt0, ke0, vt0, ve0, unrotate_cos,
                          unrotate_sin):
    """:func:`kvquant_decode_step` of a decode step (its fixed arguments in ``plan``, a :class:`DecodePlan`; ``span``
    its token ranges: threaded below ``n``), then the step's ``new_k``/``new_v (b, h, 1, d)`` quantized into the
    streams' buffers by :func:`quantize_into` -- from token index ``kt0``/``vt0`` and outlier entry ``ke0``/``ve0``;
    the keys un-rotated with ``(unrotate_cos, unrotate_sin)`` (empty: none) -- in one call (each call from Python
    between the model's matmuls costs microseconds). The attention reads tokens ``[0, n)`` only, so the new tokens
    written after them change nothing it sees. Returns the two :func:`quantize_into` results (keys, values); nothing
    is committed here."""
    kvquant_decode_step(query, scaling, *plan.streams, plan.colmap, *plan.rotation, *plan.held, new_k, new_v, n, span,
                        out)
    kres = quantize_into(new_k, *plan.khead, kt0, *plan.ktail, ke0, unrotate_cos, unrotate_sin)
    vres = quantize_into(new_v, *plan.vhead, vt0, *plan.vtail, ve0, plan.plain[0], plan.plain[1])
    return kres, vres

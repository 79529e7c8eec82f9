"""Fused attention over KVQuant's codes on the CPU (numba): ``(acc, m, l)`` straight from the stored layout.

What is read per (batch row, KV head, token): the packed code planes of the key and of the value (3 bits: a 2-bit and
a 1-bit plane), the value's per-token fp16 range, the token's outliers (CSR entries of its row), and, for pre-RoPE
keys, the token's position (implicit ``start + t`` or stored). Per layer: the decode levels (a codebook of ``2**bits``
floats) and, for per-channel keys, the fixed per-channel range. Tokens are handled a block of :data:`BLOCK` at a time:

* **dequantize** a block of keys into a small scratch ``(BLOCK, d)``: codes unpacked through a byte -> codes lookup
  table, ``level[code] * scale + offset`` (per channel for keys, per token for values), then the token's outliers
  overwrite their channels (KVQuant's dense-and-sparse split: an outlier is stored exactly, in place of its code);
* **rotate** pre-RoPE keys to their positions inside the kernel: ``cos``/``sin`` of ``position * inv_freq`` computed
  exactly (float64) at the first token of a range, after a jump in positions and every :data:`EXACT_EVERY` tokens, and
  advanced in between by one rotation per token (angle addition, float64): nothing is held between steps (no table of
  every position), and the drift stays below 1e-12;
* **scores** for every query row of the KV group in one pass over the block (GQA/MQA heads and query tokens folded into
  rows), online softmax per block, then the values of the block dequantized the same way and accumulated.

The context of each (batch row, KV head) is split into token ranges run under ``numba.prange`` and merged by
log-sum-exp (flash-decoding), as for KIVI (:mod:`.cpu`, whose softmax/score/merge pieces this reuses).

Against dequantize-then-attend (:meth:`kvcompress.methods.kvquant_store.QuantStream.read` + RoPE from the model's
module): equal within float rounding, except that the model rounds ``position * inv_freq`` to float32 before its
``cos``/``sin`` and the kernel does not; the reference's keys carry that rounding (up to ``position * 6e-8`` radians:
3e-5 at position 512, 5e-4 at 8k), the kernel's rotation is the exact one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from .cpu import _FM, _merge, _scores_block, _softmax_block, _values_block

#: tokens dequantized at a time into the scratch
BLOCK = 32
#: pre-RoPE keys: cos/sin computed exactly at least every this many tokens (advanced by one rotation in between)
EXACT_EVERY = 256


@njit(cache=True, inline="always")
def _sel2(c, l0, l1, l2, l3):
    """``[l0, l1, l2, l3][c & 3]`` as selects on the code's bits (vectorizes; a gather from a table does not)."""
    a = l1 if c & 1 else l0
    b = l3 if c & 1 else l2
    return b if c & 2 else a


@njit(cache=True, fastmath=_FM, inline="always")
def _levels_block(bits, p0, p1, lev, ta, nt, out):
    """``out[i, p] = lev[code]`` for tokens ``ta + i`` (``i < nt``), positions ``p`` in plane order
    (:func:`kvcompress.quant.plane_position` of the ``p0`` plane's bits): 2 bits (``p0``), 4 bits (``p0``), 3 bits
    (2-bit ``p0`` low bits, 1-bit ``p1`` high bits in :func:`kvcompress.quant.high_plane_order`). ``lev`` padded to 16
    levels. Each plane is one loop with a constant shift over the row's bytes, the level a tree of selects."""
    l0, l1, l2, l3, l4, l5, l6, l7 = lev[0], lev[1], lev[2], lev[3], lev[4], lev[5], lev[6], lev[7]
    l8, l9, l10, l11, l12, l13, l14, l15 = lev[8], lev[9], lev[10], lev[11], lev[12], lev[13], lev[14], lev[15]
    d = uint64(out.shape[1])
    if bits == 2:
        units = d // uint64(4)
        for i in range(nt):
            t = ta + i
            for k in range(4):
                sh, base = np.int32(2 * k), uint64(k) * units
                for u in range(units):
                    c = (np.int32(p0[t, u]) >> sh) & 3
                    out[i, base + u] = _sel2(c, l0, l1, l2, l3)
    elif bits == 3:
        units = d // uint64(4)
        hu = units // uint64(2)
        for i in range(nt):
            t = ta + i
            for k in range(4):
                sh = np.int32(2 * k)
                for half in range(2):
                    hsh = np.int32(2 * k + half)
                    base, lo0 = uint64(k) * units + uint64(half) * hu, uint64(half) * hu
                    for u in range(hu):
                        c = ((np.int32(p0[t, lo0 + u]) >> sh) & 3) | (((np.int32(p1[t, u]) >> hsh) & 1) << 2)
                        a = _sel2(c, l0, l1, l2, l3)
                        b = _sel2(c, l4, l5, l6, l7)
                        out[i, base + u] = b if c & 4 else a
    else:  # 4 bits
        units = d // uint64(2)
        for i in range(nt):
            t = ta + i
            for k in range(2):
                sh, base = np.int32(4 * k), uint64(k) * units
                for u in range(units):
                    c = (np.int32(p0[t, u]) >> sh) & 15
                    a = _sel2(c, l0, l1, l2, l3)
                    b = _sel2(c, l4, l5, l6, l7)
                    e = _sel2(c, l8, l9, l10, l11)
                    f = _sel2(c, l12, l13, l14, l15)
                    g = b if c & 4 else a
                    h = f if c & 4 else e
                    out[i, base + u] = h if c & 8 else g


@njit(cache=True, fastmath=_FM, inline="always")
def _dequant_block(bits, p0, p1, lev, per_channel, cs, co, ts, to, rp, cols, vals, posmap, nb, bi, col0, ta, nt,
                   out):
    """``out[i, :d]`` = token ``ta + i`` (``i < nt``) dequantized in plane order: ``lev[code]`` (:func:`_levels_block`)
    times the range plus the offset (``per_channel``: ``cs``/``co (d,)`` in plane order; else ``ts``/``to (cap,)``
    per token), then the outliers of row ``(ta + i) * nb + bi`` (``rp`` row pointers, ``cols`` in ``[0, h*d)``,
    ``vals``) that fall in columns ``[col0, col0 + d)`` written in place, at ``posmap[col - col0]``."""
    d = uint64(out.shape[1])
    _levels_block(bits, p0, p1, lev, ta, nt, out)
    for i in range(nt):
        if per_channel:
            for p in range(d):
                out[i, p] = out[i, p] * cs[p] + co[p]
        else:
            s, o = ts[ta + i], to[ta + i]
            for p in range(d):
                out[i, p] = out[i, p] * s + o
    if rp.shape[0] > 0:
        for i in range(nt):
            row = (ta + i) * nb + bi
            for e in range(rp[row], rp[row + 1]):
                col = np.int64(cols[e]) - col0
                if 0 <= col < d:
                    out[i, posmap[col]] = vals[e]


@njit(cache=True, fastmath=_FM)
def _attend_range(q, kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos,
                  vbits, vp0, vp1, vlev, vts, vto, vrp, vcols, vvals, vpos,
                  nb, bi, col0, inv_freq, rope_scale, pos_start, positions, valid, t0, t1, acc_out, m_out, l_out):
    """Attention of ``q (rows, d)`` (in the keys' plane order) over tokens ``[t0, t1)`` of one (batch row ``bi``, KV
    head at columns ``col0``). Keys and values as in :func:`_dequant_block` (values per token); ``kpos``/``vpos``:
    channel -> plane position. ``inv_freq (d/2,)`` float64 in the keys' plane order of the first halves (empty: keys
    are not rotated; pairs ``(p, p + units/2)`` of each plane), ``rope_scale`` the rotary module's attention scaling,
    positions ``pos_start + t`` (``pos_start >= 0``) or ``positions[t]``; ``valid (n,)`` bool or empty. Writes
    ``acc_out (rows, d)`` (values' plane order), ``m_out``, ``l_out``."""
    nrows, nd = q.shape
    d = uint64(nd)
    half = nd // 2
    kunits = uint64(nd // (2 if kbits == 4 else 4))
    khu = kunits // uint64(2)
    kper = d // kunits
    rope = inv_freq.shape[0] > 0
    has_valid = valid.shape[0] > 0
    width = min(BLOCK, t1 - t0)
    kf = np.empty((width, nd), np.float32)
    vf = np.empty((width, nd), np.float32)
    sc = np.empty((nrows, width), np.float32)
    ok = np.empty(width, np.float32)
    ebits = np.empty(width, np.int32)
    escale = ebits.view(np.float32)
    bias = np.zeros(nrows, np.float32)
    empty = np.zeros((nrows, 0), np.float32)
    acc = np.zeros((nrows, nd), np.float32)
    m = np.full(nrows, -np.inf, np.float32)
    l = np.zeros(nrows, np.float32)
    # rotation state: cos/sin of the current position (float64), the one-step rotation, the values used (float32)
    cur_c = np.empty(half, np.float64)
    cur_s = np.empty(half, np.float64)
    step_c = np.cos(inv_freq)
    step_s = np.sin(inv_freq)
    use_c = np.empty(half, np.float32)
    use_s = np.empty(half, np.float32)
    prev, since = np.int64(-2), EXACT_EVERY

    ta = t0
    while ta < t1:
        nt = min(BLOCK, t1 - ta)
        seen = 0
        for i in range(nt):
            ok[i] = 1.0 if (not has_valid or valid[ta + i]) else 0.0
            seen += 1 if ok[i] > 0 else 0
        if seen == 0:
            ta += nt
            continue
        _dequant_block(kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos, nb, bi, col0,
                       ta, nt, kf)
        if rope:
            for i in range(nt):
                pos = pos_start + ta + i if pos_start >= 0 else np.int64(positions[ta + i])
                if pos == prev + 1 and since < EXACT_EVERY:
                    for j in range(half):
                        c, s = cur_c[j], cur_s[j]
                        cur_c[j] = c * step_c[j] - s * step_s[j]
                        cur_s[j] = s * step_c[j] + c * step_s[j]
                    since += 1
                else:
                    for j in range(half):
                        ang = np.float64(pos) * inv_freq[j]
                        cur_c[j] = np.cos(ang)
                        cur_s[j] = np.sin(ang)
                    since = 0
                prev = pos
                for j in range(half):
                    use_c[j] = np.float32(cur_c[j] * rope_scale)
                    use_s[j] = np.float32(cur_s[j] * rope_scale)
                for k in range(kper):
                    pa, pj = k * kunits, k * khu
                    for u in range(khu):
                        a, b = kf[i, pa + u], kf[i, pa + khu + u]
                        kf[i, pa + u] = a * use_c[pj + u] - b * use_s[pj + u]
                        kf[i, pa + khu + u] = b * use_c[pj + u] + a * use_s[pj + u]
        if d == 64:  # a constant trip count lets LLVM drop the loop's runtime checks
            _scores_block(q, bias, kf, uint64(0), uint64(nt), sc, uint64(64))
        elif d == 128:
            _scores_block(q, bias, kf, uint64(0), uint64(nt), sc, uint64(128))
        else:
            _scores_block(q, bias, kf, uint64(0), uint64(nt), sc, d)
        _softmax_block(sc, nt, ok, m, l, acc, empty, empty, ebits, escale)
        _dequant_block(vbits, vp0, vp1, vlev, False, kcs, kco, vts, vto, vrp, vcols, vvals, vpos, nb, bi, col0,
                       ta, nt, vf)
        if d == 64:
            _values_block(vf, uint64(0), uint64(nt), sc, vts, uint64(0), acc, empty, uint64(64))
        elif d == 128:
            _values_block(vf, uint64(0), uint64(nt), sc, vts, uint64(0), acc, empty, uint64(128))
        else:
            _values_block(vf, uint64(0), uint64(nt), sc, vts, uint64(0), acc, empty, d)
        ta += nt

    for r in range(nrows):
        m_out[r] = m[r]
        l_out[r] = l[r]
        for c in range(nd):
            acc_out[r, c] = acc[r, c]


@njit(cache=True, fastmath=_FM)
def _run_item(item, qg, kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos, vbits, vp0,
              vp1, vlev, vts, vto, vrp, vcols, vvals, vpos, inv_freq, rope_scale, pos_start, positions, valid, n, span,
              pacc, pm, pl):
    """Token range ``item % splits`` of (batch row, KV head) ``item // splits`` into ``pacc[item]``, ``pm``, ``pl``."""
    b, h, _, d = qg.shape
    splits = pm.shape[0] // (b * h)
    bh, si = item // splits, item % splits
    bi, hi = bh // h, bh % h
    t0, t1 = si * span, min((si + 1) * span, n)
    vmask = valid[bi, hi if valid.shape[1] > 1 else 0] if valid.shape[2] > 0 else valid[0, 0]
    kr = min(bi, kcs.shape[0] - 1)
    khs, vhs = hi if kts.shape[1] > 1 else 0, hi if vts.shape[1] > 1 else 0
    pr = min(bi, positions.shape[0] - 1)
    _attend_range(qg[bi, hi], kbits, kp0[bi, hi], kp1[bi, hi], klev, kper_channel, kcs[kr, hi * d : hi * d + d],
                  kco[kr, hi * d : hi * d + d], kts[bi, khs], kto[bi, khs], krp, kcols, kvals, kpos, vbits,
                  vp0[bi, hi], vp1[bi, hi], vlev, vts[bi, vhs], vto[bi, vhs], vrp, vcols, vvals, vpos, b, bi, hi * d,
                  inv_freq, rope_scale, pos_start, positions[pr], vmask, t0, t1, pacc[item], pm[item], pl[item])


@njit(cache=True, parallel=True)
def kvquant_layer_parallel(qg, kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos,
                           vbits, vp0, vp1, vlev, vts, vto, vrp, vcols, vvals, vpos, inv_freq, rope_scale, pos_start,
                           positions, valid, n, span, acc, m, l):
    """Every (batch row, KV head, token range) under ``prange``, then the merge per (batch row, KV head).

    ``qg (b, h, rows, d)`` fp32 in the keys' plane order; ``*bits`` 2/3/4; planes ``*p0``/``*p1 (b, h, >= n, bytes)``
    uint8 (``*p1``: the high bits of 3-bit codes, else 0 tokens); ``*lev (16,)`` float32 levels (padded); keys per
    channel (``kper_channel``: ``kcs``/``kco (1|b, h*d)`` in plane order per head) or per token (``kts``/``kto (b,
    1|h, >= n)``); values per token ``vts``/``vto``; outliers as row pointers ``krp``/``vrp (n*b + 1,)`` int64
    (empty: none), ``*cols`` and ``*vals`` float32, ``*pos (d,)`` channel -> plane position; ``inv_freq (d/2,)``
    float64 in plane order (empty: no rotation); ``positions (1|b, >= n)`` int (``pos_start < 0``); ``valid (b, h|1,
    n)`` bool or ``(1, 1, 0)``; results into ``acc (b, h, rows, d)`` (values' plane order), ``m``/``l (b, h, rows)``."""
    b, h, rows, d = qg.shape
    items = b * h * ((n + span - 1) // span)
    pacc = np.empty((items, rows, d), np.float32)
    pm, pl = np.empty((items, rows), np.float32), np.empty((items, rows), np.float32)
    for item in prange(items):
        _run_item(item, qg, kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos, vbits,
                  vp0, vp1, vlev, vts, vto, vrp, vcols, vvals, vpos, inv_freq, rope_scale, pos_start, positions, valid,
                  n, span, pacc, pm, pl)
    for bh in prange(b * h):
        _merge(bh, pacc, pm, pl, acc, m, l)


@njit(cache=True)
def kvquant_layer_serial(qg, kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos,
                         vbits, vp0, vp1, vlev, vts, vto, vrp, vcols, vvals, vpos, inv_freq, rope_scale, pos_start,
                         positions, valid, n, span, acc, m, l):
    """:func:`kvquant_layer_parallel` on the calling thread."""
    b, h, rows, d = qg.shape
    items = b * h * ((n + span - 1) // span)
    pacc = np.empty((items, rows, d), np.float32)
    pm, pl = np.empty((items, rows), np.float32), np.empty((items, rows), np.float32)
    for item in range(items):
        _run_item(item, qg, kbits, kp0, kp1, klev, kper_channel, kcs, kco, kts, kto, krp, kcols, kvals, kpos, vbits,
                  vp0, vp1, vlev, vts, vto, vrp, vcols, vvals, vpos, inv_freq, rope_scale, pos_start, positions, valid,
                  n, span, pacc, pm, pl)
    for bh in range(b * h):
        _merge(bh, pacc, pm, pl, acc, m, l)

"""Fused attention over KVQuant's stored layout in Triton: the ``(acc, m, l)`` contract of
:func:`kvcompress.kernels.kvquant_attention` for CUDA tensors (and, under ``TRITON_INTERPRET=1``, for CPU tensors: how
the tests run it).

Only ever run in Triton's interpreter (no GPU was available where it was written): correctness is tested there (fp32
and fp16 inputs; the interpreter has no bf16), it has never been compiled for a GPU, and its speed is not measured.

One program takes one (batch row, KV head), one range of tokens and one block of query rows (the GQA/MQA heads of the
KV group and the query tokens folded into rows), as :mod:`.gpu` does for KIVI. Every tile is held as two halves of
the head dimension, channels ``j`` and ``j + d/2`` (the pairs rotate-half RoPE turns together: a rotation needs no
shuffle of a tile's columns, and scores are ``q1 . k1 + q2 . k2``). Per block of ``BLOCK_N`` tokens it

* unpacks the key codes of each channel from the planes (:func:`kvcompress.quant.pack_bits`, channels in natural
  order: 2 and 4 bits one plane; 3 bits the 2-bit plane of low bits plus the 1-bit plane of high bits, channel ``c``'s
  high bit at index ``c`` -- read through a ``(d,)`` index table, an identity since the planes went back to channel
  order);
* decodes ``levels[code]`` (a gather from the ``2**bits`` levels) times the range plus the offset (keys: per channel,
  loaded once per program, or per token; values per token);
* writes the outliers in place (KVQuant's dense-and-sparse split): for each token of the block, the CSR entries of
  its row ``token * b + batch_row`` (row pointers: one cumsum of ``counts`` in torch per call, ``n*b + 1`` int64),
  the ``k``-th entry of every token at once, for ``k`` up to the block's largest row; an entry whose column falls in
  this KV head replaces its element (a compare-and-select over the tile). Cost: per token block, as many passes over
  the ``(BLOCK_N, d)`` tile as the longest row of the block has entries, and the entries of every KV head of the row
  are read (a row is ``h*d`` wide; the kernel skips the other heads' columns but reads their ``cols``);
* rotates pre-RoPE keys to their positions (``start + t`` or ``positions[row, t]``): the angle in turns,
  ``position * inv_freq / 2pi``, is formed and reduced mod 1 in float64 (so it stays exact to ~1e-16 turns at any
  position), then ``cos``/``sin`` of the reduced angle in fp32, times ``scaling``. No table is held. float64 is a
  few operations per (token, pair) -- slow on GPUs with little fp64 throughput; not measured;
* scores the rows against the block (``tl.dot``, fp32 inputs at ``input_precision="ieee"``), masks padding
  (``valid``), runs the online softmax, then adds ``p @ v`` over the values dequantized the same way.

When the grid would leave the GPU idle (few batch x KV heads), the context is split into ranges merged by log-sum-exp
in torch (:func:`kvcompress.kernels.gpu.merge_splits`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .gpu import _pow2, launch_layout, merge_splits, online_softmax, valid_arg

#: tokens per block of the inner loop
BLOCK_N = 32
#: at most this many query rows per program (more rows: more programs along the grid's third axis)
MAX_BLOCK_R = 64


@triton.jit
def _codes(P0, sp0_t, P1, sp1_t, t64, tm, ch, cm, hinv, BITS: tl.constexpr):
    """Codes ``(BLOCK_N, BLOCK_H)`` int32 of tokens ``t64`` (mask ``tm``), channels ``ch`` (mask ``cm``, natural
    order) from the planes of one (batch row, KV head); ``hinv``: where a channel's high bit lies in a 3-bit code's
    1-bit plane."""
    m = tm[:, None] & cm[None, :]
    if BITS == 3:
        lo = tl.load(P0 + t64[:, None] * sp0_t + (ch // 4)[None, :], mask=m, other=0).to(tl.int32)
        hb = tl.load(P1 + t64[:, None] * sp1_t + (hinv // 8)[None, :], mask=m, other=0).to(tl.int32)
        code = ((lo >> (2 * (ch % 4))[None, :]) & 3) | (((hb >> (hinv % 8)[None, :]) & 1) << 2)
    else:
        per: tl.constexpr = 8 // BITS
        by = tl.load(P0 + t64[:, None] * sp0_t + (ch // per)[None, :], mask=m, other=0).to(tl.int32)
        code = (by >> ((ch % per) * BITS)[None, :]) & ((1 << BITS) - 1)
    return code


@triton.jit
def _dequant(P0, sp0_t, P1, sp1_t, LEV, scale, offset, t64, tm, ch, cm, hinv, BITS: tl.constexpr):
    """``levels[code] * scale + offset`` of a ``(BLOCK_N, BLOCK_H)`` tile (``scale``/``offset`` broadcastable)."""
    code = _codes(P0, sp0_t, P1, sp1_t, t64, tm, ch, cm, hinv, BITS)
    lev = tl.load(LEV + code)
    return lev * scale + offset


@triton.jit
def _outliers(x1, x2, RP, COLS, VALS, B, bi, col0, t64, tm, j, D):
    """The CSR outliers of rows ``t * B + bi`` (tokens ``t64``, mask ``tm``) written into the halves ``x1``
    (channels ``j``) and ``x2`` (``j + D/2``) of the tile where their column lies in ``[col0, col0 + D)``."""
    row = t64 * B + bi
    first = tl.load(RP + row, mask=tm, other=0)
    cnt = tl.load(RP + row + 1, mask=tm, other=0) - first
    kmax = tl.max(cnt, axis=0)
    half = D // 2
    for k in range(0, kmax):
        em = k < cnt
        col = tl.load(COLS + first + k, mask=em, other=0).to(tl.int64) - col0
        col = tl.where(em, col, -1)
        val = tl.load(VALS + first + k, mask=em, other=0.0).to(tl.float32)
        x1 = tl.where(col[:, None] == j[None, :], val[:, None], x1)
        x2 = tl.where(col[:, None] == (j + half)[None, :], val[:, None], x2)
    return x1, x2


@triton.jit
def _kvquant_partials(
    Q, sq_b, sq_h, sq_r,  # (b, h, rows, d) fp32, already scaled
    KP0, skp0_b, skp0_h, skp0_t, KP1, skp1_b, skp1_h, skp1_t,  # key planes (b, h, >= n, bytes) uint8
    KLEV, KS, KO, sks_b, sks_h, sks_t,  # key levels (2**bits,) fp32; ranges (see KPER)
    KRP, KCOLS, KVALS,  # key outliers: row pointers (n*b + 1,) int64, cols, vals fp16
    VP0, svp0_b, svp0_h, svp0_t, VP1, svp1_b, svp1_h, svp1_t,  # value planes
    VLEV, VS, VO, svs_b, svs_h, svs_t,  # value levels, per-token ranges (b, 1|h, >= n, 1) fp16
    VRP, VCOLS, VVALS,  # value outliers
    HINV,  # (d,) int32: channel -> index in a 3-bit code's 1-bit plane
    TURNS, POS, spos_b, POS_START, RSCALE,  # rope: inv_freq / 2pi (d/2,) fp64, positions (1|b, >= n), start, scaling
    VALID, sva_b, sva_h,  # (b, h | 1, n) uint8, unused without HAS_VALID
    PACC, PM, PL,  # partials (b * h, splits, rows, d), (b * h, splits, rows) fp32
    B, H, ROWS, D, N, SPAN,
    KBITS: tl.constexpr, VBITS: tl.constexpr, KPER: tl.constexpr, KOUT: tl.constexpr, VOUT: tl.constexpr,
    ROPE: tl.constexpr, EXPLICIT: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    splits = tl.num_programs(1)
    bi = (pid_bh // H).to(tl.int64)
    hi = (pid_bh % H).to(tl.int64)
    half = D // 2
    col0 = hi * D

    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_H)  # first-half channels; the second half is j + D/2
    rmask = r < ROWS
    jmask = j < half
    j2 = j + half
    qrow = Q + bi * sq_b + hi * sq_h + r[:, None] * sq_r
    qm = rmask[:, None] & jmask[None, :]
    q1 = tl.load(qrow + j[None, :], mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(qrow + j2[None, :], mask=qm, other=0.0).to(tl.float32)
    hinv1 = tl.load(HINV + j, mask=jmask, other=0)
    hinv2 = tl.load(HINV + j2, mask=jmask, other=0)

    kp0 = KP0 + bi * skp0_b + hi * skp0_h
    kp1 = KP1 + bi * skp1_b + hi * skp1_h
    vp0 = VP0 + bi * svp0_b + hi * svp0_h
    vp1 = VP1 + bi * svp1_b + hi * svp1_h
    if KPER:  # one range per channel: (1|b, h*d), row stride sks_b (0 when shared)
        ks1 = tl.load(KS + bi * sks_b + col0 + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        ks2 = tl.load(KS + bi * sks_b + col0 + j2, mask=jmask, other=0.0).to(tl.float32)[None, :]
        ko1 = tl.load(KO + bi * sks_b + col0 + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        ko2 = tl.load(KO + bi * sks_b + col0 + j2, mask=jmask, other=0.0).to(tl.float32)[None, :]
    ksrow = bi * sks_b + hi * sks_h
    vsrow = bi * svs_b + hi * svs_h
    if ROPE:
        turns = tl.load(TURNS + j, mask=jmask, other=0.0)  # fp64

    t_start = pid_s * SPAN
    t_end = tl.minimum(t_start + SPAN, N)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)

    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tin = t < t_end
        t64 = t.to(tl.int64)

        # keys: levels, range, outliers, rotation
        if KPER:
            k1 = _dequant(kp0, skp0_t, kp1, skp1_t, KLEV, ks1, ko1, t64, tin, j, jmask, hinv1, KBITS)
            k2 = _dequant(kp0, skp0_t, kp1, skp1_t, KLEV, ks2, ko2, t64, tin, j2, jmask, hinv2, KBITS)
        else:
            ts = tl.load(KS + ksrow + t64 * sks_t, mask=tin, other=0.0).to(tl.float32)[:, None]
            to = tl.load(KO + ksrow + t64 * sks_t, mask=tin, other=0.0).to(tl.float32)[:, None]
            k1 = _dequant(kp0, skp0_t, kp1, skp1_t, KLEV, ts, to, t64, tin, j, jmask, hinv1, KBITS)
            k2 = _dequant(kp0, skp0_t, kp1, skp1_t, KLEV, ts, to, t64, tin, j2, jmask, hinv2, KBITS)
        if KOUT:
            k1, k2 = _outliers(k1, k2, KRP, KCOLS, KVALS, B, bi, col0, t64, tin, j, D)
        if ROPE:
            if EXPLICIT:
                pos = tl.load(POS + bi * spos_b + t64, mask=tin, other=0).to(tl.float64)
            else:
                pos = (t64 + POS_START).to(tl.float64)
            a = pos[:, None] * turns[None, :]  # turns, float64
            a = a - tl.floor(a)
            ang = a.to(tl.float32) * 6.283185307179586
            c = tl.cos(ang) * RSCALE
            s = tl.sin(ang) * RSCALE
            k1, k2 = k1 * c - k2 * s, k2 * c + k1 * s

        sc = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        sc = tl.dot(q2, tl.trans(k2), acc=sc, input_precision=PRECISION)  # (BLOCK_R, BLOCK_N)
        visible = tin
        if HAS_VALID:
            ok = tl.load(VALID + bi * sva_b + hi * sva_h + t64, mask=tin, other=0)
            visible = visible & (ok != 0)
        p, alpha, m_new, l_i = online_softmax(sc, visible, m_i, l_i)

        # values: per-token ranges, outliers
        vs = tl.load(VS + vsrow + t64 * svs_t, mask=tin, other=0.0).to(tl.float32)[:, None]
        vo = tl.load(VO + vsrow + t64 * svs_t, mask=tin, other=0.0).to(tl.float32)[:, None]
        v1 = _dequant(vp0, svp0_t, vp1, svp1_t, VLEV, vs, vo, t64, tin, j, jmask, hinv1, VBITS)
        v2 = _dequant(vp0, svp0_t, vp1, svp1_t, VLEV, vs, vo, t64, tin, j2, jmask, hinv2, VBITS)
        if VOUT:
            v1, v2 = _outliers(v1, v2, VRP, VCOLS, VVALS, B, bi, col0, t64, tin, j, D)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)
        acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=PRECISION)
        m_i = m_new

    item = pid_bh.to(tl.int64) * splits + pid_s
    out = item * ROWS + r
    om = rmask[:, None] & jmask[None, :]
    tl.store(PACC + out[:, None] * D + j[None, :], acc1, mask=om)
    tl.store(PACC + out[:, None] * D + j2[None, :], acc2, mask=om)
    tl.store(PM + out, m_i, mask=rmask)
    tl.store(PL + out, l_i, mask=rmask)


@lru_cache(maxsize=32)
def _high_index(d: int, device: torch.device) -> torch.Tensor:
    """``(d,)`` int32: for channel ``c``, the index in a 3-bit code's 1-bit plane that holds its high bit (channel order:
    the identity; kept as a table so a permuted plane layout needs no kernel change)."""
    return torch.arange(d, dtype=torch.int32, device=device)


def _plane(t: torch.Tensor | None, dummy: torch.Tensor):
    """A plane ``(b, h, >= n, bytes)`` with a unit last stride and its first three strides (dummy: zeros)."""
    if t is None:
        return dummy, 0, 0, 0
    if t.stride(-1) != 1:
        t = t.contiguous()
    s = t.stride()
    return t, s[0], s[1], s[2]


def _token_ranges(scale: torch.Tensor, offset: torch.Tensor):
    """Per-token ``(b, 1|h, >= n, 1)`` fp16 ranges with equal strides: ``(scale, offset, s_b, s_h, s_t)`` (head
    stride 0 when shared by all heads)."""
    if scale.stride() != offset.stride():
        scale, offset = scale.contiguous(), offset.contiguous()
    s = scale.stride()
    return scale, offset, s[0], (s[1] if scale.shape[1] > 1 else 0), s[2]


def _csr(codes, n: int, b: int, dev: torch.device, dummy_i: torch.Tensor, dummy_h: torch.Tensor):
    """``(has outliers, row pointers (n*b + 1,) int64, cols, vals)``: row ``t * b + bi`` holds entries
    ``[rp[row], rp[row + 1])``. One cumsum in torch, no synchronization."""
    if codes.counts is None or codes.cols is None or codes.vals is None or n == 0:
        return False, dummy_i, dummy_i, dummy_h
    counts = codes.counts[:, 0, :n].t().reshape(-1)
    rp = torch.zeros(n * b + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, dtype=torch.int64, out=rp[1:])
    cols, vals = codes.cols, codes.vals
    if cols.numel() == 0:
        return False, dummy_i, dummy_i, dummy_h
    return True, rp, cols.contiguous(), vals.contiguous()


def kvquant_attention(qg: torch.Tensor, n: int, keys, values, rope=None, valid: torch.Tensor | None = None,
                      splits: int | None = None, precision: str = "ieee"):
    """Same arguments and results as :func:`kvcompress.kernels.kvquant_attention`: ``qg (b, kv_heads, rows, d)`` fp32
    scaled queries; ``keys``/``values``: :class:`kvcompress.kernels.CodebookCodes` of the same ``n`` tokens (2, 3 or 4
    bits, values per token, ``d`` a multiple of 8); ``rope``: :class:`kvcompress.kernels.RotaryPositions` or None;
    ``valid (b, kv_heads | 1, n)`` bool or None. Returns fp32 ``acc (b, kv_heads, rows, d)``, ``m``, ``l (b,
    kv_heads, rows)``.

    ``splits``: token ranges per (batch row, KV head) (None: :func:`kvcompress.kernels.gpu.default_splits`);
    ``precision``: ``tl.dot``'s input precision ("ieee"; "tf32" trades ~1e-3 relative error for tensor cores).
    """
    b, h, rows, d = qg.shape
    dev = qg.device
    if n == 0 or rows == 0:
        return (qg.new_zeros(b, h, rows, d, dtype=torch.float32), qg.new_full((b, h, rows), float("-inf"),
                dtype=torch.float32), qg.new_zeros(b, h, rows, dtype=torch.float32))
    if d % 8 or keys.bits not in (2, 3, 4) or values.bits not in (2, 3, 4) or values.per_channel:
        raise ValueError("the KVQuant Triton kernel needs 2/3/4-bit codes, head_dim % 8 == 0, values per token")
    q = qg if qg.dtype == torch.float32 else qg.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    dummy8 = torch.zeros(1, dtype=torch.uint8, device=dev)
    dummy16 = torch.zeros(1, dtype=torch.float16, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int64, device=dev)
    dummyd = torch.zeros(1, dtype=torch.float64, device=dev)
    kp0, kp1 = _plane(keys.planes[0], dummy8), _plane(keys.planes[1] if keys.bits == 3 else None, dummy8)
    vp0, vp1 = _plane(values.planes[0], dummy8), _plane(values.planes[1] if values.bits == 3 else None, dummy8)
    klev, vlev = (c.levels.to(device=dev, dtype=torch.float32).contiguous() for c in (keys, values))
    if keys.per_channel:  # (1|b, h*d)
        ks, ko = keys.scale.contiguous(), keys.offset.contiguous()
        sks = (ks.stride(0) if ks.shape[0] > 1 else 0, 0, 0)
    else:
        ks, ko, *sks = _token_ranges(keys.scale, keys.offset)
    vs, vo, *svs = _token_ranges(values.scale, values.offset)
    kout, krp, kcols, kvals = _csr(keys, n, b, dev, dummy_i, dummy16)
    vout, vrp, vcols, vvals = _csr(values, n, b, dev, dummy_i, dummy16)
    hinv = _high_index(d, dev)
    explicit = False
    turns, pos, spos, start, rscale = dummyd, dummy_i, 0, 0, 1.0
    if rope is not None:
        turns = (rope.inv_freq.to(dev).double() / (2 * math.pi)).contiguous()
        rscale = float(rope.scaling)
        if rope.positions is not None:
            explicit = True
            pos = rope.positions if rope.positions.stride(-1) == 1 else rope.positions.contiguous()
            spos = pos.stride(0) if pos.shape[0] > 1 else 0
        else:
            start = int(rope.start)
    va, sva = valid_arg(valid, dummy8)
    block_r, span, pacc, pm, pl, grid = launch_layout(dev, b, h, rows, d, n, splits, BLOCK_N, MAX_BLOCK_R)
    splits = grid[1]
    _kvquant_partials[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        *kp0, *kp1, klev, ks, ko, *sks, krp, kcols, kvals,
        *vp0, *vp1, vlev, vs, vo, *svs, vrp, vcols, vvals,
        hinv, turns, pos, spos, start, rscale,
        va, *sva,
        pacc, pm, pl,
        b, h, rows, d, n, span,
        KBITS=keys.bits, VBITS=values.bits, KPER=bool(keys.per_channel), KOUT=kout, VOUT=vout,
        ROPE=rope is not None, EXPLICIT=explicit, HAS_VALID=valid is not None,
        BLOCK_R=block_r, BLOCK_H=_pow2(d // 2), BLOCK_N=BLOCK_N, PRECISION=precision,
    )
    pacc, pm, pl = pacc.view(b, h, splits, rows, d), pm.view(b, h, splits, rows), pl.view(b, h, splits, rows)
    if splits == 1:
        return pacc[:, :, 0], pm[:, :, 0], pl[:, :, 0]
    return merge_splits(pacc, pm, pl)

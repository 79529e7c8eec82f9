"""Fused attention over KIVI's packed codes in Triton: the ``(acc, m, l)`` contract of :func:`kvcompress.kernels.
kivi_attention` for CUDA tensors (and, under ``TRITON_INTERPRET=1``, for CPU tensors: how the tests run it).

One program takes one (batch, KV head), one range of tokens and one block of query rows (the GQA/MQA heads of the
KV group and the query tokens folded into rows: one pass over a token's codes serves all of them). Per block of
``BLOCK_N`` tokens it

* unpacks the key codes of every channel: code ``c`` of a row lies at bits ``[c*bits, (c+1)*bits)`` of the row's
  little-endian byte stream, for every width 1..8 (:func:`kvcompress.quant.pack_bits`: whole bytes for 1/2/4/8 bits,
  words of ``bits`` bytes for 3/5/6/7), so a code is cut from the byte that holds its first bit and, for widths that
  do not divide 8, the next one;
* dequantizes keys with the fp16 scale/zero of their group (``token // G``, per channel) and takes the tokens after
  the first ``nk`` from the float key tail (KIVI's residual), likewise values (per token, scale/zero per ``Gv``
  channels) after ``nv`` from the value tail;
* scores the rows against the block (``tl.dot``, fp32 inputs at ``input_precision="ieee"``: no TF32 rounding),
  masks padding (``valid``) and runs the online softmax (running max, rescale, sum), then adds ``p @ v``.

When the grid would leave the GPU idle (few batch x KV heads), the context is split into ranges whose partials are
merged by log-sum-exp afterwards (flash-decoding), in torch.

Only run in Triton's interpreter so far (no GPU was available where it was written): correctness is tested there,
speed on a GPU is not measured.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

#: tokens per block of the inner loop
BLOCK_N = 64
#: at most this many query rows per program (more rows: more programs along the grid's third axis)
MAX_BLOCK_R = 64


@triton.jit
def online_softmax(s, visible, m_i, l_i):
    """One block of the online softmax: scores ``s (BLOCK_R, BLOCK_N)`` with invisible tokens (``visible``:
    ``(BLOCK_N,)``) at -inf; returns ``(p, alpha, m_new, l_new)``: the block's weights ``exp(s - m_new)``, the factor
    that rescales what was accumulated before, the new row max and sum. A row that has seen nothing yet keeps
    ``m = -inf`` and weights 0."""
    s = tl.where(visible[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _kivi_partials(
    Q, sq_b, sq_h, sq_r,  # (b, h, rows, d) fp32, already scaled
    KP, skp_b, skp_h, skp_t,  # (b, h, >= nk, kbytes) uint8 key codes
    KS, sks_b, sks_h, sks_g,  # (b, h, >= ceil(nk / G), d) fp16 key scales; KEY_PER_TOKEN: (b, h, >= nk, d // G)
    KZ, skz_b, skz_h, skz_g,  # same, zeros
    KT, skt_b, skt_h, skt_t,  # (b, h, n - nk, d) float key tail
    VP, svp_b, svp_h, svp_t,  # (b, h, >= nv, vbytes) uint8 value codes
    VS, svs_b, svs_h, svs_t,  # (b, h, >= nv, d // Gv) fp16 value scales
    VZ, svz_b, svz_h, svz_t,  # same, zeros
    VT, svt_b, svt_h, svt_t,  # (b, h, n - nv, d) float value tail
    VALID, sva_b, sva_h,  # (b, h | 1, n) uint8 (head stride 0 when shared), unused without HAS_VALID
    MULT, smu_b, smu_h, smu_k,  # (b, h, 2, n) fp32 key / value multipliers per token, unused without HAS_MULT
    PACC, PM, PL,  # partials (b * h, splits, rows, d), (b * h, splits, rows) fp32
    H, ROWS, D, N, NK, NV, SPAN,  # runtime sizes: KV heads, query rows, head_dim, tokens, coded keys / values, range
    KBITS: tl.constexpr, KBYTES: tl.constexpr, KGROUP: tl.constexpr, KEY_PER_TOKEN: tl.constexpr,
    VBITS: tl.constexpr, VBYTES: tl.constexpr, VGROUP: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_MULT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    splits = tl.num_programs(1)
    bi = (pid_bh // H).to(tl.int64)
    hi = (pid_bh % H).to(tl.int64)

    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    rmask = r < ROWS
    cmask = c < D
    q = tl.load(Q + bi * sq_b + hi * sq_h + r[:, None] * sq_r + c[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0)

    # where channel c's code lies in a packed row: byte, shift, and whether a second byte holds its high bits
    kbit = c * KBITS
    kbyte = kbit // 8
    kshift = kbit % 8
    vbit = c * VBITS
    vbyte = vbit // 8
    vshift = vbit % 8
    vgrp = c // VGROUP
    kgrp = c // KGROUP  # keys per token: the channel's group

    t_start = pid_s * SPAN
    t_end = tl.minimum(t_start + SPAN, N)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

    kp_row = KP + bi * skp_b + hi * skp_h
    ks_row = KS + bi * sks_b + hi * sks_h
    kz_row = KZ + bi * skz_b + hi * skz_h
    kt_row = KT + bi * skt_b + hi * skt_h
    vp_row = VP + bi * svp_b + hi * svp_h
    vs_row = VS + bi * svs_b + hi * svs_h
    vz_row = VZ + bi * svz_b + hi * svz_h
    vt_row = VT + bi * svt_b + hi * svt_h
    mu_row = MULT + bi * smu_b + hi * smu_h

    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tin = t < t_end
        t64 = t.to(tl.int64)

        # keys: codes for t < NK, the float tail after
        kcoded = tin & (t < NK)
        km = kcoded[:, None] & cmask[None, :]
        lo = tl.load(kp_row + t64[:, None] * skp_t + kbyte[None, :], mask=km, other=0).to(tl.int32)
        if 8 % KBITS != 0:  # 3/5/6/7 bits: a code may continue in the next byte
            hi_ok = km & ((kbyte + 1) < KBYTES)[None, :]
            hb = tl.load(kp_row + t64[:, None] * skp_t + (kbyte + 1)[None, :], mask=hi_ok, other=0).to(tl.int32)
            lo = lo | (hb << 8)
        kcode = ((lo >> kshift[None, :]) & ((1 << KBITS) - 1)).to(tl.float32)
        if KEY_PER_TOKEN:  # one scale/zero per token and group of KGROUP channels, like the values
            kscale = tl.load(ks_row + t64[:, None] * sks_g + kgrp[None, :], mask=km, other=0.0).to(tl.float32)
            kzero = tl.load(kz_row + t64[:, None] * skz_g + kgrp[None, :], mask=km, other=0.0).to(tl.float32)
        else:  # one per channel and group of KGROUP tokens
            g = (t // KGROUP).to(tl.int64)
            kscale = tl.load(ks_row + g[:, None] * sks_g + c[None, :], mask=km, other=0.0).to(tl.float32)
            kzero = tl.load(kz_row + g[:, None] * skz_g + c[None, :], mask=km, other=0.0).to(tl.float32)
        ktm = (tin & (t >= NK))[:, None] & cmask[None, :]
        ktail = tl.load(kt_row + (t64 - NK)[:, None] * skt_t + c[None, :], mask=ktm, other=0.0).to(tl.float32)
        keys = tl.where(kcoded[:, None], kcode * kscale + kzero, ktail)

        s = tl.dot(q, tl.trans(keys), input_precision=PRECISION)  # (BLOCK_R, BLOCK_N)
        if HAS_MULT:  # token t's key is MULT[.., 0, t] times the stored one
            s = s * tl.load(mu_row + t64, mask=tin, other=0.0)[None, :]
        visible = tin
        if HAS_VALID:
            ok = tl.load(VALID + bi * sva_b + hi * sva_h + t64, mask=tin, other=0)
            visible = visible & (ok != 0)
        p, alpha, m_new, l_i = online_softmax(s, visible, m_i, l_i)

        # values: codes for t < NV (scale/zero per token and group of VGROUP channels), the float tail after
        vcoded = tin & (t < NV)
        vm = vcoded[:, None] & cmask[None, :]
        lo = tl.load(vp_row + t64[:, None] * svp_t + vbyte[None, :], mask=vm, other=0).to(tl.int32)
        if 8 % VBITS != 0:
            hi_ok = vm & ((vbyte + 1) < VBYTES)[None, :]
            hb = tl.load(vp_row + t64[:, None] * svp_t + (vbyte + 1)[None, :], mask=hi_ok, other=0).to(tl.int32)
            lo = lo | (hb << 8)
        vcode = ((lo >> vshift[None, :]) & ((1 << VBITS) - 1)).to(tl.float32)
        vscale = tl.load(vs_row + t64[:, None] * svs_t + vgrp[None, :], mask=vm, other=0.0).to(tl.float32)
        vzero = tl.load(vz_row + t64[:, None] * svz_t + vgrp[None, :], mask=vm, other=0.0).to(tl.float32)
        vtm = (tin & (t >= NV))[:, None] & cmask[None, :]
        vtail = tl.load(vt_row + (t64 - NV)[:, None] * svt_t + c[None, :], mask=vtm, other=0.0).to(tl.float32)
        values = tl.where(vcoded[:, None], vcode * vscale + vzero, vtail)
        if HAS_MULT:  # and its value MULT[.., 1, t] times
            values = values * tl.load(mu_row + smu_k + t64, mask=tin, other=0.0)[:, None]

        acc = acc * alpha[:, None] + tl.dot(p, values, input_precision=PRECISION)
        m_i = m_new

    item = pid_bh.to(tl.int64) * splits + pid_s
    out = (item * ROWS + r)
    tl.store(PACC + out[:, None] * D + c[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    tl.store(PM + out, m_i, mask=rmask)
    tl.store(PL + out, l_i, mask=rmask)


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


def _strides(t: torch.Tensor, inner: int) -> tuple[torch.Tensor, int, int, int]:
    """``t (b, h, n, inner)`` with a unit last stride (copied only if needed) and its first three strides."""
    if t.shape[-1] == inner and t.stride(-1) != 1 and t.numel():
        t = t.contiguous()
    s = t.stride()
    return t, s[0], s[1], s[2]


@lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_splits(device: torch.device, work_items: int, n: int) -> int:
    """Token ranges per (batch, KV head, row block): enough programs for about two per streaming multiprocessor, at
    least ``BLOCK_N`` tokens each; 1 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-2 * sms // max(work_items, 1))
    return max(1, min(want, -(-n // BLOCK_N)))


def valid_arg(valid: torch.Tensor | None, dummy8: torch.Tensor):
    """``(uint8 view, (batch stride, head stride))`` of a validity ``(b, h|1, n)`` for a kernel (head stride 0 when
    shared by the heads), or the dummy and zero strides when there is none."""
    if valid is None:
        return dummy8, (0, 0)
    va = valid if valid.dtype == torch.bool else valid.bool()
    if va.stride(-1) != 1:
        va = va.contiguous()
    return va.view(torch.uint8), (va.stride(0), va.stride(1) if va.shape[1] > 1 else 0)


def launch_layout(dev, b: int, h: int, rows: int, d: int, n: int, splits, block_n: int, max_block_r: int):
    """How a partials kernel is launched: ``(rows per program, tokens per range (a multiple of block_n), pacc, pm, pl
    (the per-range partials, fp32), grid (b*h, ranges, row blocks))``; ``splits`` None: :func:`default_splits`."""
    block_r = min(_pow2(rows), max_block_r)
    row_blocks = -(-rows // block_r)
    if splits is None:
        splits = default_splits(dev, b * h * row_blocks, n)
    splits = max(1, min(int(splits), max(1, -(-n // block_n))))
    span = -(-(-(-n // splits)) // block_n) * block_n
    splits = max(1, -(-n // span))
    pacc = torch.empty(b * h, splits, rows, d, dtype=torch.float32, device=dev)
    pm = torch.empty(b * h, splits, rows, dtype=torch.float32, device=dev)
    pl = torch.empty(b * h, splits, rows, dtype=torch.float32, device=dev)
    return block_r, span, pacc, pm, pl, (b * h, splits, row_blocks)


def kivi_attention(qg: torch.Tensor, n: int, k_packed, k_scale, k_zero, k_bits: int, k_group: int, v_packed,
                   v_scale, v_zero, v_bits: int, v_group: int, valid: torch.Tensor | None = None,
                   k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None, splits: int | None = None,
                   precision: str = "ieee", k_per_token: bool = False, mult: torch.Tensor | None = None):
    """Same arguments and results as :func:`kvcompress.kernels.kivi_attention` (shapes there): ``qg (b, kv_heads,
    rows, d)`` fp32 scaled queries; key codes ``(b, kv_heads, >= nk, ceil(d*k_bits/8))`` uint8 with fp16
    ``k_scale``/``k_zero (b, kv_heads, >= ceil(nk/k_group), d)``; value codes ``(b, kv_heads, >= nv,
    ceil(d*v_bits/8))`` with fp16 ``v_scale``/``v_zero (b, kv_heads, >= nv, d // v_group)``; float tails ``(b,
    kv_heads, n - nk | n - nv, d)`` or None; ``valid (b, kv_heads | 1, n)`` bool or None. Returns fp32 ``acc (b,
    kv_heads, rows, d)``, ``m``, ``l (b, kv_heads, rows)``.

    Any code width 1..8 and any ``v_group`` dividing ``d`` (no packing-unit constraint, unlike the CPU kernel).
    ``k_per_token``: keys quantized per token like the values (``k_scale``/``k_zero (b, kv_heads, >= nk, d //
    k_group)``). ``mult (b, kv_heads, 2, n)`` or None: per-token key / value multipliers.
    ``splits``: token ranges per (batch, KV head) (None: :func:`default_splits`); ``precision``: ``tl.dot``'s input
    precision for fp32 ("ieee"; "tf32" trades ~1e-3 relative error in the scores for tensor cores).
    """
    b, h, rows, d = qg.shape
    dev = qg.device
    if n == 0 or rows == 0:
        return (qg.new_zeros(b, h, rows, d, dtype=torch.float32), qg.new_full((b, h, rows), float("-inf"),
                dtype=torch.float32), qg.new_zeros(b, h, rows, dtype=torch.float32))
    q = qg if qg.dtype == torch.float32 else qg.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    nk = n - (0 if k_tail is None else k_tail.shape[2])
    nv = n - (0 if v_tail is None else v_tail.shape[2])
    kbytes, vbytes = (d * k_bits + 7) // 8, (d * v_bits + 7) // 8
    dummy8 = torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=dev)
    dummy16 = torch.zeros(1, 1, 1, 1, dtype=torch.float16, device=dev)
    dummyf = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev)
    kp, *skp = _strides(k_packed if k_packed is not None and nk else dummy8, kbytes)
    kstat = d // k_group if k_per_token else d
    ks, *sks = _strides(k_scale if k_scale is not None and nk else dummy16, kstat)
    kz, *skz = _strides(k_zero if k_zero is not None and nk else dummy16, kstat)
    kt, *skt = _strides(k_tail if k_tail is not None and n - nk else dummyf, d)
    vp, *svp = _strides(v_packed if v_packed is not None and nv else dummy8, vbytes)
    vs, *svs = _strides(v_scale if v_scale is not None and nv else dummy16, d // v_group)
    vz, *svz = _strides(v_zero if v_zero is not None and nv else dummy16, d // v_group)
    vt, *svt = _strides(v_tail if v_tail is not None and n - nv else dummyf, d)
    va, sva = valid_arg(valid, dummy8)
    mu, *smu = _strides(dummyf if mult is None else mult.float(), n)
    block_r, span, pacc, pm, pl, grid = launch_layout(dev, b, h, rows, d, n, splits, BLOCK_N, MAX_BLOCK_R)
    splits = grid[1]
    _kivi_partials[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        kp, *skp, ks, *sks, kz, *skz, kt, *skt,
        vp, *svp, vs, *svs, vz, *svz, vt, *svt,
        va, *sva,
        mu, *smu,
        pacc, pm, pl,
        h, rows, d, n, nk, nv, span,
        KBITS=k_bits, KBYTES=kbytes, KGROUP=k_group, KEY_PER_TOKEN=bool(k_per_token),
        VBITS=v_bits, VBYTES=vbytes, VGROUP=v_group,
        HAS_VALID=valid is not None, HAS_MULT=mult is not None, BLOCK_R=block_r, BLOCK_D=_pow2(d), BLOCK_N=BLOCK_N,
        PRECISION=precision,
    )
    pacc, pm, pl = pacc.view(b, h, splits, rows, d), pm.view(b, h, splits, rows), pl.view(b, h, splits, rows)
    if splits == 1:
        return pacc[:, :, 0], pm[:, :, 0], pl[:, :, 0]
    return merge_splits(pacc, pm, pl)


def merge_splits(pacc: torch.Tensor, pm: torch.Tensor, pl: torch.Tensor):
    """Log-sum-exp merge of the ranges: ``pacc (b, h, splits, rows, d)``, ``pm``/``pl (b, h, splits, rows)`` ->
    ``acc (b, h, rows, d)``, ``m``, ``l (b, h, rows)`` (a row no range saw: ``m = -inf``, ``l = 0``, ``acc = 0``)."""
    m = pm.amax(dim=2)
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(pm - safe.unsqueeze(2))  # 0 for a range that saw nothing (pm = -inf)
    return (pacc * w.unsqueeze(-1)).sum(dim=2), m, (pl * w).sum(dim=2)

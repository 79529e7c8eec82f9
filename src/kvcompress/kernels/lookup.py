"""Codebook lookup by a permute instruction: eight levels held in one vector register, eight codes looked up at once.

KVQuant's levels are an arbitrary codebook, so a code cannot be turned into its level by arithmetic. In numba's own
terms the fastest form is a tree of selects on the code's bits (:func:`kvcompress.kernels.kvquant_cpu._levels_block`;
a gather measured 2x slower); AVX2's ``vpermps`` does the same for 8 codes in one instruction (a 3-bit row of 64
channels: ~12 vs ~22 ns on the session 15 host, bit-identical). numba exposes no vector type, so the functions below
are numba ``@intrinsic``\\ s that write the LLVM IR for 8 codes of a plane's row: broadcast the 32-bit word that
holds them to eight lanes straight from memory, shift (rotate) every lane to its code, permute the table by the codes,
and hand the 8 levels back in a register (:mod:`.simd`'s ``f32x8``: the caller scales them there before its one
store). Reading the words from memory instead of cutting them out of a loaded 64-bit word took the 3-bit loop over 32
codes from 61 to 44 instructions, the kernel at 8k to 0.88x of its time (session 22). Where the target has no AVX2
(another architecture, or ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` naming a CPU without it) the same intrinsics emit
a portable lowering (one load per lane), and the kernels do not call them: :data:`PERMUTE` is False there.

Where the target has AVX-512 (:data:`WIDE`), :func:`levels16` (the width a value) looks sixteen codes up at
once: one ``vpermps`` on a 512-bit register whose sixteen entries hold the levels repeated (3 bits: the eight levels
twice), so a code's bits above its own width may be left as they are, and a 4-bit codebook needs no second table and
select. The decode loop then takes about half the instructions: the 3-bit kernel at 8k measured 4-5 % faster (session
25; the scores, the value accumulation and RoPE in sixteen lanes measured no faster, so they stay at eight).
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import _I32, _I64, _V8F, _V8I, _V16F, _V16I, _llvm_intrinsic, _row_start, _splat, f32x8, f32x16


def _target_has(feature: str) -> bool:
    """Whether numba compiles for a CPU with ``feature`` (LLVM's name, e.g. ``"avx2"``; its
    ``NUMBA_CPU_FEATURES``/``NUMBA_CPU_NAME`` override the host)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from numba.core import config
        import llvmlite.binding as llvm

        if config.CPU_FEATURES is not None:
            features = config.CPU_FEATURES
        elif config.CPU_NAME is not None:
            return False  # a named CPU without its features: do not assume any
        else:
            features = llvm.get_host_cpu_features().flatten()
    except Exception:  # noqa: BLE001 -- any doubt: the portable selects
        return False
    return f"+{feature}" in features.split(",")


#: the kernels look levels up with ``vpermps`` (else by selects)
PERMUTE = _target_has("avx2")
#: ... and sixteen at a time, with every vector operation of their decode loops sixteen lanes wide (AVX-512)
WIDE = PERMUTE and _target_has("avx512f")


def _permute(builder, table, idx):
    """``table[idx]`` lane by lane: ``<8 x float>`` by ``<8 x i32>`` indices in 0..7."""
    if PERMUTE:
        return builder.call(_llvm_intrinsic(builder, "llvm.x86.avx2.permps", _V8F, [_V8F, _V8I]), [table, idx])
    out = ir.Constant(_V8F, None)
    for lane in range(8):
        i = builder.extract_element(idx, ir.Constant(_I32, lane))
        out = builder.insert_element(out, builder.extract_element(table, i), ir.Constant(_I32, lane))
    return out


def _row_word(context, builder, arrty, arr, row, idx):
    """The 32-bit word ``idx`` of row ``row`` of the 2-D array ``arr`` (any element type, little-endian), loaded (an
    i32; LLVM folds the load into the broadcast that takes it)."""
    start = _row_start(context, builder, arrty, arr, row)
    return builder.load(builder.gep(builder.bitcast(start, _I32.as_pointer()), [idx], inbounds=True), align=4)


def _codes(context, builder, sig, bits, w0, w1, t, k, g):
    """``<8 x i32>`` codes ``8*g .. 8*g + 7`` of the 64-bit word ``k`` of row ``t`` of a ``bits``-bit plane ``w0``
    (3 bits: the high bits from the 1-bit plane ``w1``); ``t``/``k``/``g`` i64.

    The plane is read as 32-bit words straight from memory: the word that holds the group (for 2/3 bits, two groups
    per word) is broadcast to the eight lanes (a load, no move from a general register) and each lane shifted to its
    own code; for 3 bits the 1-bit plane's word of the same 32 channels is broadcast too and rotated per lane, bit
    ``8g + c`` to bit 2, then merged with the low two bits. Each group loads its words again: the caller's stores may
    alias the planes, so LLVM does not merge the loads, and a broadcast from memory costs only a load. Bits above the
    code are left where ``vpermps`` reads the table (it reads the index's low 3 bits only)."""
    g32 = builder.trunc(g, _I32)
    if bits == 4:  # eight codes per 32-bit word
        word = _row_word(context, builder, sig.args[2], w0, t, builder.add(builder.mul(k, ir.Constant(_I64, 2)), g))
        code = builder.lshr(_splat(builder, word, _V8I), ir.Constant(_V8I, [4 * c for c in range(8)]))
        return builder.and_(code, ir.Constant(_V8I, [15] * 8))
    word = _row_word(context, builder, sig.args[2], w0, t,
                     builder.add(builder.mul(k, ir.Constant(_I64, 2)), builder.lshr(g, ir.Constant(_I64, 1))))
    group_shift = _splat(builder, builder.mul(builder.and_(g32, ir.Constant(_I32, 1)), ir.Constant(_I32, 16)), _V8I)
    low = builder.lshr(_splat(builder, word, _V8I),
                       builder.add(group_shift, ir.Constant(_V8I, [2 * c for c in range(8)])))
    if bits == 2:
        return builder.and_(low, ir.Constant(_V8I, [3] * 8))
    high = _splat(builder, _row_word(context, builder, sig.args[3], w1, t, k), _V8I)
    amount = builder.add(_splat(builder, builder.mul(g32, ir.Constant(_I32, 8)), _V8I),
                         ir.Constant(_V8I, [c - 2 for c in range(8)]))
    amount = builder.and_(amount, ir.Constant(_V8I, [31] * 8))
    fshr = _llvm_intrinsic(builder, "llvm.fshr.v8i32", _V8I, [_V8I, _V8I, _V8I])
    hb = builder.call(fshr, [high, high, amount])  # rotate right by 8g + c - 2 (mod 32): bit 8g + c to bit 2
    code = builder.xor(hb, builder.and_(builder.xor(hb, low), ir.Constant(_V8I, [3] * 8)))  # bits 0-1 from low
    if not PERMUTE:
        code = builder.and_(code, ir.Constant(_V8I, [7] * 8))
    return code


def _table_lookup(builder, bits, lo, hi, code):
    """The levels of ``<8 x i32>`` codes: ``lo[code]`` (levels 0-7), for 4 bits ``hi[code - 8]`` where ``code >= 8``."""
    if bits != 4:
        return _permute(builder, lo, code)
    low = builder.and_(code, ir.Constant(_V8I, [7] * 8))
    upper = builder.icmp_unsigned("!=", builder.and_(code, ir.Constant(_V8I, [8] * 8)), ir.Constant(_V8I, [0] * 8))
    return builder.select(upper, _permute(builder, hi, low), _permute(builder, lo, low))


def _levels(bits):
    """An intrinsic ``(table_lo, table_hi, w0, w1, t, k, g) -> f32x8``: the levels of codes ``8*g .. 8*g + 7`` of the
    64-bit word ``k`` of token ``t``'s row of a ``bits``-bit plane ``w0 (cap, words)`` (channel ``c`` at bits
    ``bits*c`` of the row; 3 bits: ``w0`` the 2-bit plane and ``w1 (cap, words)`` the 1-bit plane of the same
    channels), the codebook in two vectors (levels 0-7 and 8-15; the second is read for 4 bits only). The result
    stays in a register for the caller to scale and store (:func:`_codes`). The planes' rows must be contiguous;
    nothing is bounds-checked."""

    @intrinsic
    def levels(typingctx, table_lo, table_hi, w0, w1, t, k, g):
        if table_lo != f32x8 or table_hi != f32x8:
            return None
        if not all(isinstance(a, types.Array) and a.ndim == 2 for a in (w0, w1)):
            return None
        sig = f32x8(table_lo, table_hi, w0, w1, t, k, g)

        def codegen(context, builder, signature, args):
            lo, hi, w0_v, w1_v = args[:4]
            t_v, k_v, g_v = (context.cast(builder, v, ty, types.int64) for v, ty in zip(args[4:], signature.args[4:]))
            return _table_lookup(builder, bits, lo, hi, _codes(context, builder, signature, bits, w0_v, w1_v, t_v, k_v,
                                                               g_v))

        return sig, codegen

    return levels


#: eight codes of a row to their levels, in a register (see :func:`_levels`)
levels2 = _levels(2)
levels3 = _levels(3)
levels4 = _levels(4)


def _permute16(builder, table, idx):
    """``table[idx & 15]`` lane by lane: ``<16 x float>`` by ``<16 x i32>`` indices (``vpermps`` on a 512-bit register
    where :data:`WIDE`, else one lane at a time: the kernels do not take this path there)."""
    if WIDE:
        return builder.call(_llvm_intrinsic(builder, "llvm.x86.avx512.permvar.sf.512", _V16F, [_V16F, _V16I]),
                            [table, idx])
    idx = builder.and_(idx, ir.Constant(_V16I, [15] * 16))
    out = ir.Constant(_V16F, None)
    for lane in range(16):
        i = builder.extract_element(idx, ir.Constant(_I32, lane))
        out = builder.insert_element(out, builder.extract_element(table, i), ir.Constant(_I32, lane))
    return out


def _codes16(context, builder, w0ty, w1ty, bits, w0, w1, t, k, g):
    """``<16 x i32>`` indices into a 16-entry table for codes ``16*g .. 16*g + 15`` of the 64-bit word ``k`` of row
    ``t`` (2 and 3 bits: ``g`` 0 or 1; 4 bits: ``g`` 0, the word's sixteen codes); ``w0ty``/``w1ty`` the planes'
    numba types. Only the low 4 bits of a lane count, and for 2 and 3 bits only the code's own bits are set right
    above garbage: the table holds the levels repeated (:func:`levels16`), so the garbage bits pick the same level.
    As :func:`_codes`, words are read from memory and broadcast."""
    if bits == 4:  # the two 32-bit halves of the word: lanes 0-7 from the low one, 8-15 from the high one
        lo = _row_word(context, builder, w0ty, w0, t, builder.mul(k, ir.Constant(_I64, 2)))
        hi = _row_word(context, builder, w0ty, w0, t,
                       builder.add(builder.mul(k, ir.Constant(_I64, 2)), ir.Constant(_I64, 1)))
        pair = builder.insert_element(builder.insert_element(ir.Constant(_V16I, None), lo, ir.Constant(_I32, 0)), hi,
                                      ir.Constant(_I32, 1))
        both = builder.shuffle_vector(pair, ir.Constant(_V16I, None), ir.Constant(_V16I, [0] * 8 + [1] * 8))
        return builder.lshr(both, ir.Constant(_V16I, [4 * c for c in range(8)] * 2))
    word = _row_word(context, builder, w0ty, w0, t, builder.add(builder.mul(k, ir.Constant(_I64, 2)), g))
    low = builder.lshr(_splat(builder, word, _V16I), ir.Constant(_V16I, [2 * c for c in range(16)]))
    if bits == 2:
        return low
    high = _splat(builder, _row_word(context, builder, w1ty, w1, t, k), _V16I)
    amount = builder.add(_splat(builder, builder.mul(builder.trunc(g, _I32), ir.Constant(_I32, 16)), _V16I),
                         ir.Constant(_V16I, [c - 2 for c in range(16)]))
    amount = builder.and_(amount, ir.Constant(_V16I, [31] * 16))
    fshr = _llvm_intrinsic(builder, "llvm.fshr.v16i32", _V16I, [_V16I, _V16I, _V16I])
    hb = builder.call(fshr, [high, high, amount])  # rotate right by 16g + c - 2 (mod 32): bit 16g + c to bit 2
    if WIDE:  # bits 0-1 from low, the rest from hb: one vpternlogd (LLVM's own lowering took an AND more: the
        # 3-bit lookup loop measured 8-10 % faster with it, session 25)
        ternary = _llvm_intrinsic(builder, "llvm.x86.avx512.pternlog.d.512", _V16I, [_V16I, _V16I, _V16I, _I32])
        return builder.call(ternary, [hb, low, ir.Constant(_V16I, [3] * 16), ir.Constant(_I32, 0xD8)])  # c ? b : a
    return builder.xor(hb, builder.and_(builder.xor(hb, low), ir.Constant(_V16I, [3] * 16)))


@intrinsic
def levels16(typingctx, bits, table, w0, w1, t, c):
    """``(bits, table, w0, w1, t, c) -> f32x16``: the levels of channels ``c .. c + 15`` (``c`` a multiple of 16) of
    token ``t``'s row of ``bits``-bit codes (2, 3 or 4; planes as :func:`_levels`: ``w0 (cap, words)``, for 3 bits the
    1-bit plane ``w1``), ``table`` the ``2**bits`` levels repeated to sixteen lanes (``table[i] = levels[i %
    2**bits]``), looked up by one ``vpermps`` (:func:`_codes16`).

    ``bits`` is a value: the three widths are three branches joined by a phi, so the kernels write one call where they
    wrote a branch per width (outputs and speed unchanged, session 39). LLVM leaves the branch inside a loop even where
    ``bits`` does not change (so did the kernels' own branches); a caller that needs it gone passes a literal width,
    which folds it (``kvquant_cpu._turned_width``). 2 and 3 bits: channel ``c`` is in the 64-bit word ``c // 32``,
    half ``(c // 16) % 2``; 4 bits: word ``c // 16``. Nothing is bounds-checked."""
    if table != f32x16 or not all(isinstance(a, types.Array) and a.ndim == 2 for a in (w0, w1)):
        return None
    if not all(isinstance(a, types.Integer) for a in (bits, t, c)):
        return None
    sig = f32x16(bits, table, w0, w1, t, c)

    def codegen(context, builder, signature, args):
        width, t_v, c_v = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (0, 4, 5))
        w0ty, w1ty = signature.args[2], signature.args[3]
        run16 = builder.lshr(c_v, ir.Constant(_I64, 4))  # the sixteen-channel run
        in_word32 = (builder.lshr(c_v, ir.Constant(_I64, 5)), builder.and_(run16, ir.Constant(_I64, 1)))
        where = {2: in_word32, 3: in_word32, 4: (run16, ir.Constant(_I64, 0))}  # (64-bit word, half of it)
        done = builder.append_basic_block("levels16.done")
        cases = {b: builder.append_basic_block(f"levels16.bits{b}") for b in (2, 3, 4)}
        switch = builder.switch(width, cases[4])  # anything but 2 or 3 is 4 bits (the callers check the width)
        switch.add_case(ir.Constant(_I64, 2), cases[2])
        switch.add_case(ir.Constant(_I64, 3), cases[3])
        got = []
        for b, block in cases.items():
            builder.position_at_end(block)
            k, g = where[b]
            got.append((_permute16(builder, args[1], _codes16(context, builder, w0ty, w1ty, b, args[2], args[3], t_v,
                                                              k, g)), builder.block))
            builder.branch(done)
        builder.position_at_end(done)
        levels = builder.phi(_V16F)
        for value, block in got:
            levels.add_incoming(value, block)
        return levels

    return sig, codegen

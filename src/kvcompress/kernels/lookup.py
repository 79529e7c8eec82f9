"""Codebook lookup by a permute instruction: eight levels held in one vector register, eight codes looked up at once.

KVQuant's levels are an arbitrary codebook, so a code cannot be turned into its level by arithmetic. In numba's own
terms the fastest form is a tree of selects on the code's bits (:func:`kvcompress.kernels.kvquant_cpu._levels_block`;
a gather measured 2x slower); AVX2's ``vpermps`` does the same for 8 codes in one instruction (a 3-bit row of 64
channels: ~12 vs ~22 ns on the session 15 host, bit-identical). numba exposes no vector type, so the functions below are
numba ``@intrinsic``\\ s that write the LLVM IR for 8 codes of a 64-bit word: cut their bits out of the word,
broadcast them to 32-bit lanes, shift every lane to its code, permute the table by the codes, and hand the 8 levels
back in a register (:mod:`.simd`'s ``f32x8``: the caller scales them there before its one store). Where the target has no AVX2 (another architecture, or
``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` naming a CPU without it) the same intrinsics emit a portable lowering (one
load per lane), and the kernels do not call them: :data:`PERMUTE` is False there.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import _I32, _V8F, _V8I, _splat, f32x8

_I64 = ir.IntType(64)


def _target_has_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2 (its ``NUMBA_CPU_FEATURES``/``NUMBA_CPU_NAME`` override the host)."""
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
    return "+avx2" in features.split(",")


#: the kernels look levels up with ``vpermps`` (else by selects)
PERMUTE = _target_has_avx2()


def _permute(builder, table, idx):
    """``table[idx]`` lane by lane: ``<8 x float>`` by ``<8 x i32>`` indices in 0..7."""
    if PERMUTE:
        mod = builder.module
        fn = mod.globals.get("llvm.x86.avx2.permps") or ir.Function(
            mod, ir.FunctionType(_V8F, [_V8F, _V8I]), "llvm.x86.avx2.permps")
        return builder.call(fn, [table, idx])
    out = ir.Constant(_V8F, None)
    for lane in range(8):
        i = builder.extract_element(idx, ir.Constant(_I32, lane))
        out = builder.insert_element(out, builder.extract_element(table, i), ir.Constant(_I32, lane))
    return out


def _codes_of_group(builder, bits, w_v, hw_v, g_v):
    """``<8 x i32>`` codes ``8*g .. 8*g + 7`` of one 64-bit word ``w_v`` of a ``bits``-bit plane (3 bits: the high bits
    from ``hw_v``'s low 32 bits); ``g_v`` an i64. The group's ``8*width`` bits are cut out of the word as one scalar
    and broadcast to 32-bit lanes (64-bit lanes take twice the instructions)."""
    width = 4 if bits == 4 else 2
    part = builder.trunc(builder.lshr(w_v, builder.mul(g_v, ir.Constant(_I64, 8 * width))), _I32)
    code = builder.lshr(_splat(builder, part, _V8I), ir.Constant(_V8I, [width * c for c in range(8)]))
    code = builder.and_(code, ir.Constant(_V8I, [(1 << width) - 1] * 8))
    if bits == 3:  # bit c of the high byte, moved to bit 2: (byte << 2) >> c, masked with 4
        high = builder.trunc(builder.lshr(hw_v, builder.mul(g_v, ir.Constant(_I64, 8))), _I32)
        high = builder.shl(builder.and_(high, ir.Constant(_I32, 255)), ir.Constant(_I32, 2))
        hb = builder.and_(builder.lshr(_splat(builder, high, _V8I), ir.Constant(_V8I, list(range(8)))),
                          ir.Constant(_V8I, [4] * 8))
        code = builder.or_(code, hb)
    return code


def _table_lookup(builder, bits, lo, hi, code):
    """The levels of ``<8 x i32>`` codes: ``lo[code]`` (levels 0-7), for 4 bits ``hi[code - 8]`` where ``code >= 8``."""
    if bits != 4:
        return _permute(builder, lo, code)
    low = builder.and_(code, ir.Constant(_V8I, [7] * 8))
    upper = builder.icmp_unsigned("!=", builder.and_(code, ir.Constant(_V8I, [8] * 8)), ir.Constant(_V8I, [0] * 8))
    return builder.select(upper, _permute(builder, hi, low), _permute(builder, lo, low))


def _levels_vec(bits):
    """An intrinsic ``(table_lo, table_hi, w, hw, g) -> f32x8``: the levels of codes ``8*g .. 8*g + 7`` of one 64-bit
    word ``w`` of a ``bits``-bit plane (channel ``c`` at bits ``bits*c``; 3 bits: ``w`` from the 2-bit plane and ``hw``
    the 32 high bits of the same channels in its low half), the codebook in two vectors (levels 0-7
    and 8-15; the second is read for 4 bits only). The result stays in a register for the caller to scale and store."""

    @intrinsic
    def levels(typingctx, table_lo, table_hi, w, hw, g):
        if table_lo != f32x8 or table_hi != f32x8:
            return None
        sig = f32x8(table_lo, table_hi, w, hw, g)

        def codegen(context, builder, signature, args):
            lo, hi, w_v, hw_v, g_v = args
            w_v = context.cast(builder, w_v, signature.args[2], types.uint64)
            hw_v = context.cast(builder, hw_v, signature.args[3], types.uint64)
            g_v = context.cast(builder, g_v, signature.args[4], types.int64)
            return _table_lookup(builder, bits, lo, hi, _codes_of_group(builder, bits, w_v, hw_v, g_v))

        return sig, codegen

    return levels


#: eight codes of a word to their levels, in a register (see :func:`_levels_vec`)
levels2_vec = _levels_vec(2)
levels3_vec = _levels_vec(3)
levels4_vec = _levels_vec(4)

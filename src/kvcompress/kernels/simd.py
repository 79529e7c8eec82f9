"""Eight float32 lanes as one numba value, so a kernel can keep its accumulators in vector registers.

numba has no vector type, and LLVM's loop vectorizer (numba runs no SLP vectorizer) only widens innermost loops: a
loop over 64 channels inside a loop over tokens loads and stores its accumulators at every token. :data:`f32x8` is a
numba type whose LLVM representation is ``<8 x float>``; the ``@intrinsic``\\ s below load, store, splat,
multiply-add, sum and compare it. Values of this type live in numba locals, which LLVM promotes to registers, so a
block's accumulators stay in registers across its tokens. The IR is generic (no target intrinsic): LLVM lowers it to
AVX2/AVX-512 here, to two SSE or NEON halves elsewhere. Arithmetic carries the fast-math flags the kernels use
(``contract``, ``reassoc``, ``nsz``, ``arcp``; no ``nnan``/``ninf``: -inf marks masked scores).

:func:`load8`/:func:`store8`/:func:`codes8` address 2-D arrays as ``(row, col)`` through the array's row stride; the
last axis must be contiguous (every buffer the kernels pass is), and nothing is bounds-checked.

:data:`f32x16` (``<16 x float>``) and its ``*16`` operations are the same for sixteen lanes: one AVX-512 register
where the target has it (the kernels take them there only, :data:`kvcompress.kernels.lookup.WIDE`), two AVX2 ones
elsewhere.

:func:`scatter16_cols1`/:func:`scatter16_cols2` write up to sixteen of KVQuant's outlier entries (column, fp16 value,
token) into a block's scratch by one masked scatter (session 27); :func:`take_marked16` reads them back into a fused
loop's registers from a scratch otherwise held at :data:`MARK` (session 38).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model
from numba.np.arrayobj import make_array

_F32, _I32, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
_V8F, _V8I = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
_V16F, _V16I, _V16B = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16), ir.VectorType(_I8, 16)
_FLAGS = ("contract", "reassoc", "nsz", "arcp")


class F32x8(types.Type):
    """numba type of eight float32 lanes (LLVM ``<8 x float>``)."""

    def __init__(self):
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F)


class F32x16(types.Type):
    """numba type of sixteen float32 lanes (LLVM ``<16 x float>``)."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16F)


def _row_start(context, builder, arrty, arr, row):
    """``i8*`` to the start of row ``row`` (an i64) of the array ``arr`` of type ``arrty`` (its first axis' stride;
    also used by :mod:`.lookup`)."""
    a = make_array(arrty)(context, builder, arr)
    start = builder.bitcast(a.data, _I8.as_pointer())
    return builder.gep(start, [builder.mul(row, builder.extract_value(a.strides, 0))], inbounds=True)


def _element_ptr(context, builder, sig, args, at):
    """Pointer to ``arr[row, col]``: the 2-D array ``args[at]``, the indices ``args[at + 1]`` and ``args[at + 2]``."""
    arr = make_array(sig.args[at])(context, builder, args[at])
    row = context.cast(builder, args[at + 1], sig.args[at + 1], types.int64)
    col = context.cast(builder, args[at + 2], sig.args[at + 2], types.int64)
    row_start = _row_start(context, builder, sig.args[at], args[at], row)
    return builder.gep(builder.bitcast(row_start, arr.data.type), [col], inbounds=True)


def _is_2d(arr, dtype) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == dtype and arr.ndim == 2


def _splat(builder, value, vtype):
    """``value`` in every lane of a vector of type ``vtype`` (also used by :mod:`.lookup`)."""
    one = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, None), ir.Constant(ir.VectorType(_I32, vtype.count),
                                                                              [0] * vtype.count))


def _load_2d(vec_type, lanes):
    """The intrinsic ``(arr, row, col) -> vec_type``: ``arr[row, col : col + lanes]`` (2-D float32) as one vector."""
    ir_type = ir.VectorType(_F32, lanes)

    @intrinsic
    def load_2d(typingctx, arr, row, col):
        if not _is_2d(arr, types.float32):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig, args, 0)
            return builder.load(builder.bitcast(ptr, ir_type.as_pointer()), align=4)

        return vec_type(arr, row, col), codegen

    return load_2d


def _load_1d(vec_type, lanes):
    """The intrinsic ``(arr, off) -> vec_type``: ``arr[off : off + lanes]`` (1-D float32, contiguous) as one vector."""
    ir_type = ir.VectorType(_F32, lanes)

    @intrinsic
    def load_1d(typingctx, arr, off):
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
            return None

        def codegen(context, builder, sig, args):
            data = make_array(sig.args[0])(context, builder, args[0]).data
            ptr = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)], inbounds=True)
            return builder.load(builder.bitcast(ptr, ir_type.as_pointer()), align=4)

        return vec_type(arr, off), codegen

    return load_1d


def _store(vec_type, lanes):
    """The intrinsic ``(vec, arr, row, col)``: ``arr[row, col : col + lanes] = vec`` (``arr`` 2-D float32)."""
    ir_type = ir.VectorType(_F32, lanes)

    @intrinsic
    def store(typingctx, vec, arr, row, col):
        if vec != vec_type or not _is_2d(arr, types.float32):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig, args, 1)
            builder.store(args[0], builder.bitcast(ptr, ir_type.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(vec, arr, row, col), codegen

    return store


def _splat_float(vec_type, lanes):
    """The intrinsic ``(x) -> vec_type``: ``x`` (a float) in every lane."""
    ir_type = ir.VectorType(_F32, lanes)

    @intrinsic
    def splat(typingctx, x):
        def codegen(context, builder, sig, args):
            return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), ir_type)

        return vec_type(x), codegen

    return splat


def _fma(vec_type):
    """The intrinsic ``(a, b, c) -> vec_type``: ``a * b + c`` lane by lane (fused where the target has FMA)."""

    @intrinsic
    def fma(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            return builder.fadd(builder.fmul(args[0], args[1], flags=_FLAGS), args[2], flags=_FLAGS)

        return vec_type(a, b, c), codegen

    return fma


#: ``arr[off : off + n]`` as one vector; ``arr[row, col : col + n] = vec``; ``x`` in all lanes; ``a * b + c`` lane by
#: lane -- for eight lanes (:data:`f32x8`) and sixteen (:data:`f32x16`, what the 16-code lookups need)
load8_1d, store8, splat8, fma8 = _load_1d(f32x8, 8), _store(f32x8, 8), _splat_float(f32x8, 8), _fma(f32x8)
load16_1d, store16, splat16, fma16 = _load_1d(f32x16, 16), _store(f32x16, 16), _splat_float(f32x16, 16), _fma(f32x16)
#: ``arr[row, col : col + n]`` (2-D float32) as one vector, eight and sixteen lanes
load8, load16 = _load_2d(f32x8, 8), _load_2d(f32x16, 16)


def _binary(vec_type, name):
    """The intrinsic ``(a, b) -> vec_type``: ``a <op> b`` lane by lane, ``name`` the builder's float operation
    (``fmul``, ``fadd``, ``fsub``), with the kernels' fast-math flags."""

    @intrinsic
    def binary(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1], flags=_FLAGS)

        return vec_type(a, b), codegen

    return binary


#: ``a * b``, ``a + b``, ``a - b`` lane by lane, eight and sixteen lanes
mul8, add8, sub8 = _binary(f32x8, "fmul"), _binary(f32x8, "fadd"), _binary(f32x8, "fsub")
mul16, add16, sub16 = _binary(f32x16, "fmul"), _binary(f32x16, "fadd"), _binary(f32x16, "fsub")


@intrinsic
def halves16(typingctx, a):
    """Lanes ``0..7`` plus lanes ``8..15`` of ``a`` (:data:`f32x16`), as eight lanes."""

    def codegen(context, builder, sig, args):
        lo = builder.shuffle_vector(args[0], args[0], ir.Constant(_V8I, list(range(8))))
        hi = builder.shuffle_vector(args[0], args[0], ir.Constant(_V8I, list(range(8, 16))))
        return builder.fadd(lo, hi, flags=_FLAGS)

    return f32x8(a), codegen


def _codes(vec_type, lanes):
    """The intrinsic ``(arr, row, col, shift, mask) -> vec_type``: the ``lanes`` bytes ``arr[row, col : col + lanes]``
    (2-D uint8) as ``float((byte >> shift) & mask)``, one plane of packed codes (``shift``/``mask`` integers; constants
    at the call sites, so LLVM folds them)."""
    byte_t, int_t, float_t = (ir.VectorType(t, lanes) for t in (_I8, _I32, _F32))

    @intrinsic
    def codes(typingctx, arr, row, col, shift, mask):
        if not _is_2d(arr, types.uint8):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig, args, 0)
            word = builder.zext(builder.load(builder.bitcast(ptr, byte_t.as_pointer()), align=1), int_t)
            shift_v = _splat(builder, context.cast(builder, args[3], sig.args[3], types.int32), int_t)
            mask_v = _splat(builder, context.cast(builder, args[4], sig.args[4], types.int32), int_t)
            return builder.sitofp(builder.and_(builder.lshr(word, shift_v), mask_v), float_t)

        return vec_type(arr, row, col, shift, mask), codegen

    return codes


#: eight / sixteen packed codes of one plane as floats
codes8, codes16 = _codes(f32x8, 8), _codes(f32x16, 16)


@intrinsic
def join8(typingctx, lo, hi):
    """Sixteen lanes: the eight of ``lo``, then the eight of ``hi``."""

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[1], ir.Constant(_V16I, list(range(16))))

    return f32x16(lo, hi), codegen


@intrinsic
def hsum8x8(typingctx, s0, s1, s2, s3, s4, s5, s6, s7):
    """One vector of eight sums: lane ``t`` = the sum of the lanes of ``st`` (three rounds of shuffles and adds, 7 adds
    for 8 sums instead of 8 separate horizontal sums)."""

    def codegen(context, builder, sig, args):
        def fold(a, b, even, odd):
            return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(_V8I, even)),
                                builder.shuffle_vector(a, b, ir.Constant(_V8I, odd)), flags=_FLAGS)

        pairs = [fold(args[2 * k], args[2 * k + 1], [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15])
                 for k in range(4)]  # (s0 01, s1 01, s0 23, s1 23, s0 45, s1 45, s0 67, s1 67)
        quads = [fold(pairs[2 * k], pairs[2 * k + 1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
                 for k in range(2)]  # (s0..s3 over lanes 0-3, s0..s3 over lanes 4-7)
        return fold(quads[0], quads[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])

    return f32x8(s0, s1, s2, s3, s4, s5, s6, s7), codegen


def _max(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@intrinsic
def max8(typingctx, a, b):
    """The larger of ``a`` and ``b`` lane by lane (``b`` where they compare unordered)."""

    def codegen(context, builder, sig, args):
        return _max(builder, args[0], args[1])

    return f32x8(a, b), codegen


@intrinsic
def where8(typingctx, mask, a, b):
    """``a`` in the lanes where ``mask`` is not 0.0, ``b`` elsewhere."""

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_unordered("!=", args[0], ir.Constant(_V8F, [0.0] * 8)), args[1], args[2])

    return f32x8(mask, a, b), codegen


@intrinsic
def hmax8(typingctx, vec):
    """The largest of the eight lanes (a float32)."""

    def codegen(context, builder, sig, args):
        x = args[0]
        half = ir.VectorType(_I32, 4)
        s = _max(builder, builder.shuffle_vector(x, x, ir.Constant(half, [0, 1, 2, 3])),
                 builder.shuffle_vector(x, x, ir.Constant(half, [4, 5, 6, 7])))
        quarter = ir.VectorType(_I32, 2)
        s = _max(builder, builder.shuffle_vector(s, s, ir.Constant(quarter, [0, 1])),
                 builder.shuffle_vector(s, s, ir.Constant(quarter, [2, 3])))
        return _max(builder, builder.extract_element(s, ir.Constant(_I32, 0)),
                    builder.extract_element(s, ir.Constant(_I32, 1)))

    return types.float32(vec), codegen


_I1, _I16, _I64 = ir.IntType(1), ir.IntType(16), ir.IntType(64)
_V16L = ir.VectorType(_I64, 16)


def _llvm_intrinsic(builder, name, ret, args):
    """The LLVM intrinsic ``name`` of type ``ret (args)``, declared in the builder's module once (also used by
    :mod:`.lookup`)."""
    mod = builder.module
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _masked_load(builder, ptr, elem, mask, align):
    """Sixteen ``elem`` from ``ptr`` (an ``i8*``) where ``mask`` is set (nothing read elsewhere; those lanes undef)."""
    vt = ir.VectorType(elem, 16)
    name = f"llvm.masked.load.v16{'f16' if isinstance(elem, ir.HalfType) else f'i{elem.width}'}.p0"
    fn = _llvm_intrinsic(builder, name, vt, [vt.as_pointer(), _I32, ir.VectorType(_I1, 16), vt])
    return builder.call(fn, [builder.bitcast(ptr, vt.as_pointer()), ir.Constant(_I32, align), mask,
                             ir.Constant(vt, None)])


def _scatter_by_i32_offsets():
    """Whether numba's target has AVX-512 (:data:`kvcompress.kernels.lookup.WIDE`, read when a kernel is compiled):
    the outlier scatter is then AVX-512's own ``vscatterdps`` with sixteen 32-bit offsets, computed in 32-bit lanes.
    The generic masked scatter of sixteen 64-bit addresses compiles to two eight-lane ``vscatterqps`` and 64-bit
    multiplies (``vpmullq``)."""
    from .lookup import WIDE  # lookup imports this module

    return WIDE


def _scatter_entries(column):
    """The intrinsic ``(outflat, cols, vals, tok, e, j, count, shift, gap, d)`` for columns of ``column`` (an
    ``ir.IntType``: one or two bytes each)."""

    @intrinsic
    def scatter(typingctx, outflat, cols, vals, tok, e, j, count, shift, gap, d):
        if not (isinstance(outflat, types.Array) and outflat.dtype == types.float32 and outflat.ndim == 1):
            return None

        def codegen(context, builder, sig, args):
            i64 = [context.cast(builder, args[k], sig.args[k], types.int64) for k in range(4, 10)]
            e64, j64, count64, shift64, gap64, d64 = i64
            first = builder.add(e64, j64)
            lanes = ir.Constant(_V16I, list(range(16)))
            mask = builder.icmp_signed("<", lanes, _splat(builder, builder.trunc(count64, _I32), _V16I))
            col = _masked_load(builder, _row_start(context, builder, sig.args[1], args[1], first), column, mask, 1)
            bits = _masked_load(builder, _row_start(context, builder, sig.args[2], args[2], first), ir.HalfType(),
                                mask, 2)
            tokens = _masked_load(builder, _row_start(context, builder, sig.args[3], args[3], j64), _I8, mask, 1)
            base = make_array(sig.args[0])(context, builder, args[0]).data
            if _scatter_by_i32_offsets():  # one vscatterdps: 32-bit offsets from the scratch's start (see below)
                col = builder.zext(col, _V16I)
                shift32 = _splat(builder, builder.trunc(shift64, _I32), _V16I)
                head = builder.lshr(col, shift32)
                where = builder.add(builder.add(col, builder.mul(head, _splat(builder, builder.trunc(gap64, _I32),
                                                                                   _V16I))),
                                    builder.shl(builder.zext(tokens, _V16I), shift32))  # token * d, d = 2**shift
                fn = _llvm_intrinsic(builder, "llvm.x86.avx512.mask.scatter.dps.512", ir.VoidType(),
                                     [_I8.as_pointer(), ir.VectorType(_I1, 16), _V16I, _V16F, _I32])
                builder.call(fn, [builder.bitcast(base, _I8.as_pointer()), mask, where, builder.fpext(bits, _V16F),
                                  ir.Constant(_I32, 4)])
                return context.get_dummy_value()
            col = builder.zext(col, _V16L)
            head = builder.lshr(col, _splat(builder, shift64, _V16L))
            where = builder.add(builder.add(col, builder.mul(head, _splat(builder, gap64, _V16L))),
                                builder.mul(builder.zext(tokens, _V16L), _splat(builder, d64, _V16L)))
            addr = builder.add(_splat(builder, builder.ptrtoint(base, _I64), _V16L),
                               builder.shl(where, ir.Constant(_V16L, [2] * 16)))
            ptrs = builder.inttoptr(addr, ir.VectorType(_F32.as_pointer(), 16))
            fn = _llvm_intrinsic(builder, "llvm.masked.scatter.v16f32.v16p0", ir.VoidType(),
                                 [_V16F, ptrs.type, _I32, ir.VectorType(_I1, 16)])
            builder.call(fn, [builder.fpext(bits, _V16F), ptrs, ir.Constant(_I32, 4), mask])
            return context.get_dummy_value()

        return types.void(outflat, cols, vals, tok, e, j, count, shift, gap, d), codegen

    return scatter


#: ``scatter16_cols1``/``scatter16_cols2``: up to sixteen outlier entries ``e + j .. e + j + count - 1`` written into
#: a block's scratch in one masked scatter. Entry ``x`` (column ``cols[x]`` in ``[0, h*d)``, one / two little-endian
#: bytes per row of ``cols``; value ``vals[x]`` fp16 bits, converted exactly, ``inf``/``NaN`` too; token ``tok[j +
#: lane]`` of the block) lands at ``outflat[col + (col >> shift) * gap + token * d]`` -- ``d = 2**shift`` channels,
#: ``gap = (width - 1) * d`` for a scratch ``(h, width, d)``. Nothing outside the ``count`` entries is read or
#: written; ``h * width * d < 2**31``. Where the target has AVX-512, one ``vscatterdps`` with 32-bit offsets (the
#: KVQuant kernel at 8k 1.02-1.04x faster than with the generic scatter, which took two eight-lane ``vscatterqps`` and
#: 64-bit multiplies: session 39); elsewhere masked loads and a masked scatter in generic IR, lowered lane by lane.
scatter16_cols1, scatter16_cols2 = _scatter_entries(_I8), _scatter_entries(_I16)


@intrinsic
def pick16(typingctx, arr, off, g, h):
    """Sixteen lanes from the 1-D float32 ``arr``: ``arr[off + g]`` in lanes 0-7, ``arr[off + h]`` in lanes 8-15
    (``0 <= g, h < 16``): one 64-byte load of ``arr[off : off + 16]`` and one ``vpermps`` (AVX-512 only; ``arr`` must
    hold 16 elements from ``off``). The index vector depends on ``g``/``h`` only, so LLVM builds it outside a loop
    over ``off``: what :func:`~.cpu._values_fused` takes a token's value scale and zero with."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        data = make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)], inbounds=True)
        vec = builder.load(builder.bitcast(ptr, _V16F.as_pointer()), align=4)
        lo = _splat(builder, builder.trunc(context.cast(builder, args[2], sig.args[2], types.int64), _I32), _V16I)
        hi = _splat(builder, builder.trunc(context.cast(builder, args[3], sig.args[3], types.int64), _I32), _V16I)
        idx = builder.shuffle_vector(lo, hi, ir.Constant(_V16I, list(range(8)) + list(range(24, 32))))
        fn = _llvm_intrinsic(builder, "llvm.x86.avx512.permvar.sf.512", _V16F, [_V16F, _V16I])
        return builder.call(fn, [vec, idx])

    return f32x16(arr, off, g, h), codegen


@intrinsic
def fill16_u8(typingctx, arr, off, value):
    """``arr[off : off + 16] = value`` (1-D uint8, contiguous; ``value`` an integer): one 16-byte store."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        vt = _V16B
        byte = builder.trunc(context.cast(builder, args[2], sig.args[2], types.int64), _I8)
        ptr = builder.gep(make_array(sig.args[0])(context, builder, args[0]).data,
                          [context.cast(builder, args[1], sig.args[1], types.int64)], inbounds=True)
        builder.store(_splat(builder, byte, vt), builder.bitcast(ptr, vt.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(arr, off, value), codegen


#: the bits :func:`take_marked16` reads as "no outlier here": a quiet NaN whose low payload bits no fp16 value's
#: float32 form has (an fp16 NaN keeps its payload in bits 13-22), so a stored NaN outlier is still taken
MARK = 0x7FC0DEAD


@intrinsic
def take_marked16(typingctx, arr, row, col, v, reset):
    """``arr[row, col : col + 16]`` where a lane does not hold :data:`MARK`'s bits, ``v`` where it does; with
    ``reset`` the sixteen entries are set back to the mark (``arr`` 2-D float32, the row's last axis contiguous). What
    KVQuant's fused values and turned keys patch a token with: the block's outliers are scattered into a scratch held
    at the mark, read back here per sixteen channels, and the mark restored for the next block."""
    if not _is_2d(arr, types.float32) or v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.bitcast(_element_ptr(context, builder, sig, args, 0), _V16F.as_pointer())
        held = builder.load(ptr, align=4)
        mark = ir.Constant(_V16I, [MARK] * 16)
        free = builder.icmp_unsigned("==", builder.bitcast(held, _V16I), mark)
        flag = context.cast(builder, args[4], sig.args[4], types.boolean)
        builder.store(builder.select(flag, builder.bitcast(mark, _V16F), held), ptr, align=4)
        return builder.select(free, args[3], held)

    return f32x16(arr, row, col, v, reset), codegen

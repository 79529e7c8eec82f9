"""The value side of the KIVI-4 kernel alone, two ways (session 30): the kernel's (values unpacked with their scale
and zero into a scratch row, then added per query row from it, eight lanes) and a fused one (sixteen lanes, the
codes converted in registers, each token's scale folded into its three weights, the zeros summed on the side: no
scratch). 90 (layer, KV head) rows of 8k tokens, three query rows; ns per (token, KV head), five rounds.

    PYTHONPATH=src python benchmarks/results/kernel-breakdown-session30/values_fused.py
"""
import time, sys
import numpy as np
from numba import njit, uint64, types
from numba.extending import intrinsic
from llvmlite import ir
from kvcompress.kernels import simd
from kvcompress.kernels.simd import f32x16, fma16, splat16, store16, _element_ptr, _is_2d, _splat
from kvcompress.kernels.cpu import _halves, _unpack_vec, _values_vec, _value_zeros, _run_groups, _FM

_V16B = ir.VectorType(ir.IntType(8), 16); _V16I = ir.VectorType(ir.IntType(32), 16); _V16F = ir.VectorType(ir.FloatType(), 16)

@intrinsic
def codes16(typingctx, arr, row, col, shift, mask):
    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig, args, 0)
        word = builder.zext(builder.load(builder.bitcast(ptr, _V16B.as_pointer()), align=1), _V16I)
        sv = _splat(builder, context.cast(builder, args[3], sig.args[3], types.int32), _V16I)
        mv = _splat(builder, context.cast(builder, args[4], sig.args[4], types.int32), _V16I)
        return builder.sitofp(builder.and_(builder.lshr(word, sv), mv), _V16F)
    return f32x16(arr, row, col, shift, mask), codegen

@intrinsic
def load16(typingctx, arr, row, col):
    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig, args, 0)
        return builder.load(builder.bitcast(ptr, _V16F.as_pointer()), align=4)
    return f32x16(arr, row, col), codegen

_0, _1, _2 = uint64(0), uint64(1), uint64(2)
_16, _32, _48 = uint64(16), uint64(32), uint64(48)

@njit(fastmath=_FM)
def old_values(vp, vs, vz, sc, acc, zacc, reps):
    H, n, units = vp.shape
    hb = np.empty(64, np.uint32); hf = hb.view(np.float32)
    vsc = np.empty(64, np.float32); vze = np.empty(64, np.float32)
    vf = np.empty((32, 64), np.float32)
    vrun = _run_groups(4, uint64(units), uint64(32))
    for _ in range(reps):
      for h in range(H):
        for blk in range(n // 32):
            ta = uint64(blk * 32)
            _halves(vs[h], ta * _2, uint64(64), hb, hf, vsc)
            _halves(vz[h], ta * _2, uint64(64), hb, hf, vze)
            _unpack_vec(vp[h], ta, uint64(32), 4, uint64(units), vsc, vze, uint64(2), vrun, vf)
            _values_vec(vf, uint64(32), sc[blk % 8], acc[h], uint64(64))

@njit(fastmath=_FM)
def new_values(vp, vs, vz, sc, acc, zacc, reps):
    H, n, units = vp.shape
    hb = np.empty(64, np.uint32); hf = hb.view(np.float32)
    vsc = np.empty(64, np.float32); vze = np.empty(64, np.float32)
    for _ in range(reps):
      for h in range(H):
        src = vp[h]
        a = acc[h]
        for blk in range(n // 32):
            ta = uint64(blk * 32)
            _halves(vs[h], ta * _2, uint64(64), hb, hf, vsc)
            _halves(vz[h], ta * _2, uint64(64), hb, hf, vze)
            w = sc[blk % 8]
            a00, a01, a02, a03 = load16(a, 0, _0), load16(a, 0, _16), load16(a, 0, _32), load16(a, 0, _48)
            a10, a11, a12, a13 = load16(a, 1, _0), load16(a, 1, _16), load16(a, 1, _32), load16(a, 1, _48)
            a20, a21, a22, a23 = load16(a, 2, _0), load16(a, 2, _16), load16(a, 2, _32), load16(a, 2, _48)
            for i in range(uint64(32)):
                t = ta + i
                s0, s1 = vsc[_2 * i], vsc[_2 * i + _1]
                la, lb = codes16(src, t, _0, 0, 15), codes16(src, t, _16, 0, 15)
                ha, hb_ = codes16(src, t, _0, 4, 15), codes16(src, t, _16, 4, 15)
                x = w[0, i]; w0, w1 = splat16(x * s0), splat16(x * s1)
                a00 = fma16(w0, la, a00); a01 = fma16(w1, lb, a01); a02 = fma16(w0, ha, a02); a03 = fma16(w1, hb_, a03)
                x = w[1, i]; w0, w1 = splat16(x * s0), splat16(x * s1)
                a10 = fma16(w0, la, a10); a11 = fma16(w1, lb, a11); a12 = fma16(w0, ha, a12); a13 = fma16(w1, hb_, a13)
                x = w[2, i]; w0, w1 = splat16(x * s0), splat16(x * s1)
                a20 = fma16(w0, la, a20); a21 = fma16(w1, lb, a21); a22 = fma16(w0, ha, a22); a23 = fma16(w1, hb_, a23)
            store16(a00, a, 0, _0); store16(a01, a, 0, _16); store16(a02, a, 0, _32); store16(a03, a, 0, _48)
            store16(a10, a, 1, _0); store16(a11, a, 1, _16); store16(a12, a, 1, _32); store16(a13, a, 1, _48)
            store16(a20, a, 2, _0); store16(a21, a, 2, _16); store16(a22, a, 2, _32); store16(a23, a, 2, _48)
            _value_zeros(w, uint64(32), vze, uint64(2), zacc[h])

H, n = 90, 8192
rng = np.random.default_rng(0)
vp = rng.integers(0, 256, (H, n, 32), dtype=np.uint8)
vs = (rng.random((H, n * 2), dtype=np.float32) * 0.1 + 0.01).astype(np.float16).view(np.uint16)
vz = (rng.random((H, n * 2), dtype=np.float32) - 0.5).astype(np.float16).view(np.uint16)
sc = rng.random((8, 3, 32), dtype=np.float32)
acc1 = np.zeros((H, 3, 64), np.float32); acc2 = np.zeros((H, 3, 64), np.float32)
z1 = np.zeros((H, 3, 2), np.float32); z2 = np.zeros((H, 3, 2), np.float32)
old_values(vp, vs, vz, sc, acc1, z1, 1); new_values(vp, vs, vz, sc, acc2, z2, 1)
# compare: old acc includes zeros (values themselves); new = acc(scaled codes, plane order) + zeros per group
# old: vf holds values with zeros -> acc1 has all. new: acc2 + z2 group
g = np.array([0]*16 + [1]*16 + [0]*16 + [1]*16)
tot2 = acc2 + z2[:, :, g]
print(f"the two agree: max |difference| {np.abs(acc1 - tot2).max():.3g} of max |acc| {np.abs(acc1).max():.4g}")
for rep in range(5):
    t = time.perf_counter(); old_values(vp, vs, vz, sc, acc1, z1, 3); a = time.perf_counter() - t
    t = time.perf_counter(); new_values(vp, vs, vz, sc, acc2, z2, 3); b = time.perf_counter() - t
    print(f"kernel's value path {a/3/(H*n)*1e9:.1f} ns per (token, KV head)   fused {b/3/(H*n)*1e9:.1f}")

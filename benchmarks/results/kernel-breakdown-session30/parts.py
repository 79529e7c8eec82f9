"""Where a KIVI-4 token's time goes inside the fused CPU kernel (session 30), 8k tokens, SmolLM2's shapes.

Runs the kernel's own block pieces (``kvcompress.kernels.cpu``: key statistics, ``_unpack_vec``, ``_scores_vec``,
``_softmax_block``, value statistics, ``_unpack_vec``, ``_values_vec``) in one function over every (layer, KV head),
first checked against ``kivi_layer_serial``, then with pieces switched off (MODE bits: 1 key unpack, 2 scores,
4 softmax, 8 value unpack, 16 value accumulation, 32 value statistics; the key statistics always run). Prints ns per
(token, KV head) per MODE, three rounds.

    PYTHONPATH=src python benchmarks/results/kernel-breakdown-session30/parts.py
"""
import time, numpy as np
from numba import njit, uint64
from kvcompress.kernels import cpu
from kvcompress.kernels.cpu import (_halves, _unpack_vec, _scores_vec, _softmax_block, _values_vec, _value_zeros,
                                    _run_groups, _FM, unpacked_channels)
_0, _1, _2 = uint64(0), uint64(1), uint64(2)

@njit(fastmath=_FM)
def fast_range(q, kp, ks, kz, vp, vs, vz, kchan, vchan, acc_out, m_out, l_out, MODE):
    n, units = kp.shape
    rows, d = q.shape[0], q.shape[1]
    pk, pv = uint64(kchan.shape[0]), uint64(vchan.shape[0])
    W = uint64(32)
    hb = np.empty(64, np.uint32); hf = hb.view(np.float32)
    kstat = np.empty(64, np.float32); kzero = np.empty(64, np.float32); kscale_p = np.empty(64, np.float32)
    qs = np.empty((rows, 64), np.float32); bias = np.empty(rows, np.float32)
    qp = np.zeros((rows, 64), np.float32)
    for r in range(rows):
        for p in range(pk):
            c = kchan[p]
            if c >= 0:
                qp[r, p] = q[r, c]
    kf = np.empty((32, 64), np.float32); vf = np.empty((32, 64), np.float32)
    sc = np.empty((rows, 32), np.float32)
    krun = np.empty(0, np.uint64); vrun = _run_groups(4, uint64(units), uint64(32))
    vsc = np.empty(64, np.float32); vze = np.empty(64, np.float32)
    ok = np.ones(32, np.float32); m = np.full(rows, -np.inf, np.float32); l = np.zeros(rows, np.float32)
    acc = np.zeros((rows, 64), np.float32); zacc = np.zeros((rows, 2), np.float32); accn = np.zeros((rows, 64), np.float32)
    ebits = np.empty(32, np.int32); escale = ebits.view(np.float32)
    for blk in range(n // 32):
        g = uint64(blk); ta = g * W
        _halves(ks, g * uint64(64), uint64(64), hb, hf, kstat)
        _halves(kz, g * uint64(64), uint64(64), hb, hf, kzero)
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
        if MODE & 1:
            _unpack_vec(kp, ta, W, 4, uint64(units), kscale_p, kscale_p, _0, krun, kf)
        if MODE & 2:
            _scores_vec(qs, bias, kf, W, sc, pk)
        if MODE & 4:
            _softmax_block(sc, W, ok, m, l, acc, zacc, accn, ebits, escale)
        if MODE & 32:
            _halves(vs, ta * _2, uint64(64), hb, hf, vsc)
        if MODE & 32:
            _halves(vz, ta * _2, uint64(64), hb, hf, vze)
        if MODE & 8:
            _unpack_vec(vp, ta, W, 4, uint64(units), vsc, vze, _2, vrun, vf)
        if MODE & 16:
            _values_vec(vf, W, sc, acc, pv)
    for r in range(rows):
        m_out[r] = m[r]; l_out[r] = l[r]
        for p in range(pv):
            c = vchan[p]
            if c >= 0:
                acc_out[r, c] = acc[r, p]

@njit
def fast_layer(q, kp, ks, kz, vp, vs, vz, kchan, vchan, acc, m, l, MODE):
    for h in range(q.shape[1]):
        fast_range(q[0, h], kp[0, h], ks[0, h], kz[0, h], vp[0, h], vs[0, h], vz[0, h], kchan, vchan, acc[0, h], m[0, h], l[0, h], MODE)

H3, L, n, d, bits = 3, 30, 8192, 64, 4
rng = np.random.default_rng(0)
nb = d * bits // 8
layers = []
for _ in range(L):
    kp = rng.integers(0, 256, (1, H3, n, nb), dtype=np.uint8)
    vp = rng.integers(0, 256, (1, H3, n, nb), dtype=np.uint8)
    ks = (rng.random((1, H3, n // 32 * d), dtype=np.float32) * 0.1 + 0.01).astype(np.float16).view(np.uint16)
    kz = (rng.random((1, H3, n // 32 * d), dtype=np.float32) - 0.5).astype(np.float16).view(np.uint16)
    vs = (rng.random((1, H3, n * 2), dtype=np.float32) * 0.1 + 0.01).astype(np.float16).view(np.uint16)
    vz = (rng.random((1, H3, n * 2), dtype=np.float32) - 0.5).astype(np.float16).view(np.uint16)
    layers.append((kp, ks, kz, vp, vs, vz))
q = rng.standard_normal((1, H3, 3, d)).astype(np.float32) * 0.3
kchan = cpu.unpacked_channels(bits, d); vchan = cpu.unpacked_channels(bits, d)
kr = np.zeros((1, H3, 0, d), np.float32); vr = kr
acc = np.empty((1, H3, 3, d), np.float32); m = np.empty((1, H3, 3), np.float32); l = np.empty((1, H3, 3), np.float32)
acc2 = acc.copy(); m2 = m.copy(); l2 = l.copy()
valid = np.ones((1, 1, 0), np.bool_); mult = np.ones((1, 1, 2, 0), np.float32)
def real():
    for (kp, ks, kz, vp, vs, vz) in layers:
        cpu.kivi_layer_serial(q, kp, ks, kz, bits, 32, False, kchan, n, kr, vp, vs, vz, bits, 32, vchan, n, vr,
                              valid, mult, n, n, acc, m, l)
def fast():
    for (kp, ks, kz, vp, vs, vz) in layers:
        fast_layer(q, kp, ks, kz, vp, vs, vz, kchan, vchan, acc2, m2, l2, MODE)

MODE = 63
real(); fast()
print(f"all pieces on, against kivi_layer_serial: max |acc| diff {np.abs(acc - acc2).max():.2e}, "
      f"max |m| diff {np.abs(m - m2).max():.2e}, max relative l diff {(np.abs(l - l2) / l).max():.2e}")
print("ns per (token, KV head); MODE bits on: 1 key unpack, 2 scores, 4 softmax, 8 value unpack, 16 value "
      "accumulation, 32 value statistics (the key statistics always run)")
for rnd in range(3):
    out = []
    t = time.perf_counter(); real(); a = time.perf_counter() - t
    out.append(f"kivi_layer_serial: {a/(L*H3*n)*1e9:.1f}")
    for MODE in (63, 7, 56, 3, 24, 1, 8):
        fast(); t = time.perf_counter(); fast(); b = time.perf_counter() - t
        out.append(f"{MODE}: {b/(L*H3*n)*1e9:.1f}")
    print("  ".join(out), flush=True)

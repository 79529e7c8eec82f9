"""Seconds the first call of kivi_layer_serial takes with an empty numba cache (compilation), session 36.

    NUMBA_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python benchmarks/results/kernel-session36/compile_time.py LABEL
"""
import sys, time, numpy as np
t0 = time.perf_counter()
from kvcompress.kernels import cpu
bits, d, n, H = 4, 64, 256, 3
rng = np.random.default_rng(0)
nb = d * bits // 8
kp = rng.integers(0, 256, (1, H, n, nb), dtype=np.uint8); vp = kp.copy()
ks = np.zeros((1, H, n // 32 * d), np.uint16); kz = ks.copy()
vs = np.zeros((1, H, n * 2), np.uint16); vz = vs.copy()
q = np.zeros((1, H, 3, d), np.float32)
chan = cpu.unpacked_channels(bits, d); kr = np.zeros((1, H, 0, d), np.float32)
valid, mult = np.ones((1, 1, 0), np.bool_), np.ones((1, 1, 2, 0), np.float32)
acc = np.empty((1, H, 3, d), np.float32); m = np.empty((1, H, 3), np.float32); l = m.copy()
t1 = time.perf_counter()
cpu.kivi_layer_serial(q, kp, ks, kz, bits, 32, False, chan, n, kr, vp, vs, vz, bits, 32, chan, n, kr, valid, mult, n, n, acc, m, l)
print(f"{sys.argv[1]}: first call of kivi_layer_serial (compile, empty cache) {time.perf_counter() - t1:.1f} s")

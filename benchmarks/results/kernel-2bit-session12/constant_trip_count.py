"""Session 12: the same 4-bit plane unpack with its width and unit count as runtime values (vectorized) and as
literals (LLVM unrolls the 32-iteration loops fully and, numba running no SLP vectorizer, leaves them scalar)."""
import time, numpy as np
from numba import njit, uint64
from kvcompress.kernels import cpu as C
n = 8192
kp = np.random.default_rng(0).integers(0, 256, (n, 32), dtype=np.uint8)
@njit(fastmath=C._FM)
def rt(kp, bits, units, reps):
    ones = np.ones((32, units), np.float32); kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            C._unpack_block(kp, uint64(g * 32), uint64(0), uint64(32), bits, uint64(units), ones, kf)
    return kf[0, 0]
@njit(fastmath=C._FM)
def lit(kp, reps):
    ones = np.ones((32, 32), np.float32); kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            C._unpack_block(kp, uint64(g * 32), uint64(0), uint64(32), 4, uint64(32), ones, kf)
    return kf[0, 0]
rt(kp, 4, 32, 1); lit(kp, 1)
for _ in range(3):
    for name, fn in (("rt", lambda r: rt(kp, 4, 32, r)), ("lit", lambda r: lit(kp, r))):
        best = 1e9
        for _ in range(9):
            t = time.perf_counter(); fn(10); best = min(best, time.perf_counter() - t)
        print(name, f"{best / (10 * n) * 1e9:.1f}", end="  ")
    print()

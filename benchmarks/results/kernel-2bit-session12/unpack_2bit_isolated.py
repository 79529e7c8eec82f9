"""Session 12: unpacking 64 2-bit codes per token in isolation (ns per token): the plane loops (16 iterations each, left
scalar), one long plane loop per block without / with the copy into the per-token layout."""
import time, numpy as np
from numba import njit, uint64
from kvcompress.kernels import cpu as C
n = 8192
kp = np.random.default_rng(0).integers(0, 256, (n, 16), dtype=np.uint8)
@njit(fastmath=C._FM)
def cur(kp, bits, units, reps):
    ones = np.ones((32, units), np.float32); kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            C._unpack_block(kp, uint64(g * 32), uint64(0), uint64(32), bits, uint64(units), ones, kf)
    return kf[0, 0]
@njit(fastmath=C._FM)
def flat(kp, bits, units, reps):
    f = kp.reshape(-1)
    U = uint64(units)
    m = uint64(32) * U
    suf = np.ones(m, np.float32); tmp = np.empty((4, m), np.float32); kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            base = uint64(g) * m
            for j in range(m):
                tmp[0, j] = np.float32(np.int32(f[base + j]) & 3) * suf[j]
            for j in range(m):
                tmp[1, j] = np.float32((np.int32(f[base + j]) >> 2) & 3) * suf[j]
            for j in range(m):
                tmp[2, j] = np.float32((np.int32(f[base + j]) >> 4) & 3) * suf[j]
            for j in range(m):
                tmp[3, j] = np.float32(np.int32(f[base + j]) >> 6) * suf[j]
            for i in range(32):
                for k in range(4):
                    for u in range(U):
                        kf[i, uint64(k) * U + u] = tmp[k, uint64(i) * U + u]
    return kf[0, 0]
@njit(fastmath=C._FM)
def flat_nocopy(kp, bits, units, reps):
    f = kp.reshape(-1)
    U = uint64(units)
    m = uint64(32) * U
    suf = np.ones(m, np.float32); tmp = np.empty((4, m), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            base = uint64(g) * m
            for j in range(m):
                tmp[0, j] = np.float32(np.int32(f[base + j]) & 3) * suf[j]
            for j in range(m):
                tmp[1, j] = np.float32((np.int32(f[base + j]) >> 2) & 3) * suf[j]
            for j in range(m):
                tmp[2, j] = np.float32((np.int32(f[base + j]) >> 4) & 3) * suf[j]
            for j in range(m):
                tmp[3, j] = np.float32(np.int32(f[base + j]) >> 6) * suf[j]
    return tmp[0, 0]
args = (kp, 2, 16)
for fn in (cur, flat, flat_nocopy): fn(*args, 1)
for _ in range(3):
    for fn in (cur, flat, flat_nocopy):
        best = 1e9
        for _ in range(9):
            t = time.perf_counter(); fn(*args, 10); best = min(best, time.perf_counter() - t)
        print(fn.__name__, f"{best / (10 * n) * 1e9:.1f}", end="  ")
    print()

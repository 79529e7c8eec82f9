"""Session 12: unpacking one token's 64 codes in isolation (ns per token, best of 9 x 10 passes over 8k tokens).

* ``planes``: the kernel's plane loops (4 bits) (``_unpack_block``) with the width and unit count as runtime values;
* ``planes, literal counts``: the same with literals: LLVM unrolls the 32-iteration loops fully before its loop
  vectorizer runs, and numba runs no SLP vectorizer, so they stay scalar (4 bits: 41 vs 7.7 ns);
* ``table``: today's 2-bit unpack (a 256-entry table, one 16-byte copy per byte);
* ``block planes``: one long loop per plane over a block of 32 tokens (2 bits), without and with the copy back into
  the per-token layout (runs of 16 floats: scalar again).

    python benchmarks/results/kernel-2bit-session12/unpack_isolated.py
"""
import time

import numpy as np
from numba import njit, uint64

from kvcompress.kernels import cpu as C

N = 8192


@njit(fastmath=C._FM)
def planes(kp, bits, units, reps):
    ones = np.ones((32, units), np.float32)
    kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            C._unpack_block(kp, uint64(g * 32), uint64(0), uint64(32), bits, uint64(units), ones, kf)
    return kf[0, 0]


@njit(fastmath=C._FM)
def planes2(kp, bits, units, reps):
    """The 2-bit plane loops the kernel ran before session 12 (four loops of ``units`` = 16 iterations per token)."""
    u_ = uint64(units)
    kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            for i in range(32):
                t = g * 32 + i
                for u in range(u_):
                    kf[i, u] = np.float32(np.int32(kp[t, u]) & 3)
                for u in range(u_):
                    kf[i, u_ + u] = np.float32((np.int32(kp[t, u]) >> 2) & 3)
                for u in range(u_):
                    kf[i, 2 * u_ + u] = np.float32((np.int32(kp[t, u]) >> 4) & 3)
                for u in range(u_):
                    kf[i, 3 * u_ + u] = np.float32(np.int32(kp[t, u]) >> 6)
    return kf[0, 0]


@njit(fastmath=C._FM)
def table2(kp, bits, units, reps):
    """Today's 2-bit unpack (``_unpack_2bit``: a table lookup per byte)."""
    kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            C._unpack_2bit(kp, uint64(g * 32), uint64(32), uint64(units), kf[0], uint64(0), uint64(0), kf)
    return kf[0, 0]


@njit(fastmath=C._FM)
def planes_literal4(kp, bits, units, reps):
    ones = np.ones((32, 32), np.float32)
    kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            C._unpack_block(kp, uint64(g * 32), uint64(0), uint64(32), 4, uint64(32), ones, kf)
    return kf[0, 0]


@njit(fastmath=C._FM)
def block_planes2(kp, bits, units, reps, copy):
    f = kp.reshape(-1)
    u_ = uint64(units)
    m = uint64(32) * u_
    tmp = np.empty((4, m), np.float32)
    kf = np.empty((32, 64), np.float32)
    for _ in range(reps):
        for g in range(kp.shape[0] // 32):
            base = uint64(g) * m
            for j in range(m):
                tmp[0, j] = np.float32(np.int32(f[base + j]) & 3)
            for j in range(m):
                tmp[1, j] = np.float32((np.int32(f[base + j]) >> 2) & 3)
            for j in range(m):
                tmp[2, j] = np.float32((np.int32(f[base + j]) >> 4) & 3)
            for j in range(m):
                tmp[3, j] = np.float32(np.int32(f[base + j]) >> 6)
            if copy:
                for i in range(32):
                    for k in range(4):
                        for u in range(u_):
                            kf[i, uint64(k) * u_ + u] = tmp[k, uint64(i) * u_ + u]
    return kf[0, 0] + tmp[0, 0]


def best_ns(fn, *args) -> float:
    fn(*args[:3], 1, *args[3:])
    best = min(_seconds(fn, *args) for _ in range(9))
    return best / (10 * N) * 1e9


def _seconds(fn, *args):
    t = time.perf_counter()
    fn(*args[:3], 10, *args[3:])
    return time.perf_counter() - t


rng = np.random.default_rng(0)
kp4 = rng.integers(0, 256, (N, 32), dtype=np.uint8)
kp2 = rng.integers(0, 256, (N, 16), dtype=np.uint8)
print(f"4 bits, planes: {best_ns(planes, kp4, 4, 32):.1f} ns; planes, literal counts: {best_ns(planes_literal4, kp4, 4, 32):.1f} ns")
print(f"2 bits, planes (before session 12): {best_ns(planes2, kp2, 2, 16):.1f} ns; table: {best_ns(table2, kp2, 2, 16):.1f} ns; block planes: {best_ns(block_planes2, kp2, 2, 16, False):.1f} ns, "
      f"with the copy back: {best_ns(block_planes2, kp2, 2, 16, True):.1f} ns")

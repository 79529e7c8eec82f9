"""Session 34: what a numba parallel region costs per call on this host (the omp layer, 2 threads), alone and with a
small or a threaded torch op between the calls; serial against a prange over 12 items, one or two regions a call.

    python benchmarks/results/kernel-session34/parallel_region_cost.py
"""
import sys, time, statistics
import numpy as np
import torch
import kvcompress.kernels as K   # starts numba's pool the library's way
import numba
from numba import njit, prange

@njit(cache=False, inline="always")
def _item(x, out, i, reps):
    """``out[i]``: ``reps`` passes of multiply-adds over row ``i`` of ``x``, the work of one item."""
    s = 0.0
    for r in range(reps):
        for j in range(x.shape[1]):
            s += x[i, j] * 1.0000001
    out[i] = s


@njit(parallel=True, cache=False)
def par(x, out, reps):
    for i in prange(out.shape[0]):
        _item(x, out, i, reps)


@njit(parallel=True, cache=False)
def par2(x, out, reps):  # two regions, as kivi_layer_parallel
    for i in prange(out.shape[0]):
        _item(x, out, i, reps)
    for i in prange(3):
        out[i] += 1.0


@njit(cache=False)
def ser(x, out, reps):
    for i in range(out.shape[0]):
        _item(x, out, i, reps)


x = np.random.rand(12, 1024).astype(np.float32); out = np.empty(12, np.float32)
print("threading layer:", end=" ")
numba.set_num_threads(2); par(x, out, 1); print(numba.threading_layer(), "torch threads", torch.get_num_threads())
for reps in (0, 1, 10, 50):
    res = {}
    for name, f, nt in (("serial", ser, 1), ("prange x1 region, 2 thr", par, 2), ("prange x2 regions, 2 thr", par2, 2)):
        numba.set_num_threads(nt); f(x, out, reps)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(300): f(x, out, reps)
            ts.append((time.perf_counter() - t0) / 300 * 1e6)
        res[name] = statistics.median(ts)
    print(f"work {reps * 12 * 1024} float-mults: " + "; ".join(f"{k} {v:.1f} us" for k, v in res.items()))

print("with torch ops between the calls (torch at 2 threads):")
a = torch.randn(1, 9, 1, 64); big = torch.randn(512, 512)
for label, op in (("tiny torch op", lambda: a * 0.125), ("parallel torch op (512x512 add)", lambda: big + 1.0)):
    for reps in (10, 50):
        res = {}
        for name, f, nt in (("serial", ser, 1), ("prange 2 thr", par, 2)):
            numba.set_num_threads(nt); f(x, out, reps)
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(300):
                    op(); f(x, out, reps)
                ts.append((time.perf_counter() - t0) / 300 * 1e6)
            res[name] = statistics.median(ts)
        t0 = time.perf_counter()
        for _ in range(300): op()
        top = (time.perf_counter() - t0) / 300 * 1e6
        print(f"  {label} ({top:.1f} us alone), work {reps * 12 * 1024}: " + "; ".join(f"{k} {v:.1f} us" for k, v in res.items()))

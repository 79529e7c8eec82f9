"""Session 13: a few small torch/numpy calls timed warm and after reading 64 MB (caches flushed, as between the
model's matmuls): ~6-15 us warm, ~100-180 us cold on this host.

    python benchmarks/results/decode-speed/session13/cold.py
"""
import time, statistics, torch, numpy as np
from kvcompress import kernels
torch.set_num_threads(1)
q = torch.randn(1, 9, 1, 64)
big = np.ones(64 << 20 >> 2, np.float32)  # 64 MB
def cold(): big.sum()
def piece_q():
    return kernels._np(q).reshape(1, 3, 3, 64) * np.float32(0.125)
acc = np.random.rand(1, 3, 3, 64).astype(np.float32); l = np.random.rand(1, 3, 3).astype(np.float32)
def piece_out():
    a = acc.copy()
    a /= np.maximum(l, kernels._TINY)[..., None]
    return torch.from_numpy(a).view(1, 1, 9, 64).to(q.dtype)
res = torch.randn(1, 3, 129, 64).half()
def piece_tail():
    return kernels._tail(res, q)
for name, f in (("q", piece_q), ("out", piece_out), ("tail", piece_tail)):
    for mode in ("warm", "cold"):
        ts = []
        for _ in range(200):
            if mode == "cold": cold()
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        print(name, mode, f"{statistics.median(ts)*1e6:.1f} us")

"""The KIVI-layout kernel on one (KV head) of n = 8192 tokens held in cache, ns per (token, KV head), best of 50.

    python benchmarks/results/kernel-simd-session16/one_head.py SRC BITS

SRC: the source tree to import kvcompress from (a worktree of another commit, or a copy with a piece switched off:
how the ablation in README.md was made). 3 query rows (GQA 3), head_dim 64, KIVI G = 32 for keys and values."""
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from kvcompress.kernels import cpu
from kvcompress.quant import quantize_uniform
import kvcompress.kernels as K

n, bits = 8192, int(sys.argv[2])
g = torch.Generator().manual_seed(0)
k = (torch.randn(1, 1, n, 64, generator=g) * 2).half().float()
v = torch.randn(1, 1, n, 64, generator=g).half().float()
kq = quantize_uniform(k, bits, axis=2, group_size=32)
vq = quantize_uniform(v, bits, axis=3, group_size=32)
q = torch.randn(3, 64, generator=g).numpy() * 0.125
kchan, vchan = cpu.unpacked_channels(bits, 64), cpu.unpacked_channels(bits, 64)
def np_(t): return t.contiguous().numpy()
kp = np_(kq.packed[0, 0]); vp = np_(vq.packed[0, 0])
ks = np_(kq.scale[0, 0].half()).view(np.uint16).reshape(-1); kz = np_(kq.zero[0, 0].half()).view(np.uint16).reshape(-1)
vs = np_(vq.scale[0, 0].half()).view(np.uint16).reshape(-1); vz = np_(vq.zero[0, 0].half()).view(np.uint16).reshape(-1)
kr = np.zeros((0, 64), np.float32); vr = kr
acc = np.empty((3, 64), np.float32); m = np.empty(3, np.float32); l = np.empty(3, np.float32)
args = (q, kp, ks, kz, bits, 32, False, kchan, n, kr, vp, vs, vz, bits, 32, vchan, n, vr, np.ones(0, np.bool_), np.ones((2, 0), np.float32), 0, n, acc, m, l)
cpu._attend_range(*args)
best = 1e9
for _ in range(50):
    t = time.perf_counter(); cpu._attend_range(*args); best = min(best, time.perf_counter() - t)
print(f"bits {bits}: {best / n * 1e9:.2f} ns per (token, KV head)", (acc / l[:, None])[0, :4])

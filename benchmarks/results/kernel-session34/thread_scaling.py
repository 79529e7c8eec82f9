"""Session 34: the KIVI-4 kernel at 8k on one and two threads, one layer called 30 times against 30 layers once."""
import sys, time, statistics, torch
sys.argv = ["x"]; from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import attention_microbench as mb
from kvcompress import kernels
L = mb.Layers(8192, 4)
def one_layer():
    q, (kq, vq) = L.q[0], L.codes[0]
    qg = q.reshape(1, 3, 3, 64) * 0.125
    kernels.kivi_attention(qg, L.n, kq.packed, kq.scale, kq.zero, 4, 32, vq.packed, vq.scale, vq.zero, 4, 32)
def thirty():
    L.fused()
for label, fn, reps in (("same layer x30", lambda: [one_layer() for _ in range(30)], 1), ("30 layers", thirty, 1)):
    res = {}
    for th in (1, 2, 1, 2, 1, 2):
        torch.set_num_threads(th); fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        res.setdefault(th, []).append(min(ts) * 1e3)
    print(label, {k: [round(x, 1) for x in v] for k, v in res.items()})

"""``kivi_layer_serial`` of several source trees in one process, interleaved round by round (session 31).

Each tree's ``kvcompress`` is loaded under its own package name (numba caches per file, so each keeps its own
compiled kernels); the first tree named is imported as ``kvcompress``. The work: one decode step of attention over 30
layers x 3 KV heads of SmolLM2's shapes (three query rows, d = 64), all ``n`` tokens KIVI codes of ``bits`` (keys per
channel in groups of 32 tokens, values per token in groups of 32 channels), random codes and fp16 statistics. Checks
that the trees agree, then prints ns per (token, KV head) per round, the minimum and the median, and each tree's
median over the first one's.

    python benchmarks/results/kernel-session31/ab_kernel.py 4 8192 9 new=src base=/tmp/base/src lanes=/tmp/lanes/src
"""
import importlib.util
import sys
import time

import numpy as np

bits, n, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
trees = [arg.split("=", 1) for arg in sys.argv[4:]]


def load(package, root):
    spec = importlib.util.spec_from_file_location(package, root + "/kvcompress/__init__.py",
                                                  submodule_search_locations=[root + "/kvcompress"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return importlib.import_module(package + ".kernels.cpu")


kernels = {name: load("kvcompress" if i == 0 else f"kvtree{i}", root) for i, (name, root) in enumerate(trees)}
H, L, d = 3, 30, 64
rng = np.random.default_rng(0)
nbytes = d * bits // 8
layers = []
for _ in range(L):
    kp = rng.integers(0, 256, (1, H, n, nbytes), dtype=np.uint8)
    vp = rng.integers(0, 256, (1, H, n, nbytes), dtype=np.uint8)
    ks = (rng.random((1, H, n // 32 * d), dtype=np.float32) * 0.1 + 0.01).astype(np.float16).view(np.uint16)
    kz = (rng.random((1, H, n // 32 * d), dtype=np.float32) - 0.5).astype(np.float16).view(np.uint16)
    vs = (rng.random((1, H, n * 2), dtype=np.float32) * 0.1 + 0.01).astype(np.float16).view(np.uint16)
    vz = (rng.random((1, H, n * 2), dtype=np.float32) - 0.5).astype(np.float16).view(np.uint16)
    layers.append((kp, ks, kz, vp, vs, vz))
q = rng.standard_normal((1, H, 3, d)).astype(np.float32) * 0.3
chan = next(iter(kernels.values())).unpacked_channels(bits, d)
tail = np.zeros((1, H, 0, d), np.float32)
valid, mult = np.ones((1, 1, 0), np.bool_), np.ones((1, 1, 2, 0), np.float32)


def run(cpu):
    acc, m, l = np.empty((1, H, 3, d), np.float32), np.empty((1, H, 3), np.float32), np.empty((1, H, 3), np.float32)
    for kp, ks, kz, vp, vs, vz in layers:
        cpu.kivi_layer_serial(q, kp, ks, kz, bits, 32, False, chan, n, tail, vp, vs, vz, bits, 32, chan, n, tail,
                              valid, mult, n, n, acc, m, l)
    return acc / l[..., None]


outs = {name: run(cpu) for name, cpu in kernels.items()}
first = next(iter(outs.values()))
print("largest difference of acc / l from the first tree:",
      {name: float(np.abs(out - first).max()) for name, out in outs.items()}, flush=True)
times = {name: [] for name in kernels}
order = list(kernels.items())
for rnd in range(rounds):
    for name, cpu in (order if rnd % 2 else order[::-1]):
        t = time.perf_counter()
        run(cpu)
        times[name].append((time.perf_counter() - t) / (L * H * n) * 1e9)
ref = np.median(times[trees[0][0]])
for name, ts in times.items():
    print(f"bits {bits} n {n} {name:>6}: {' '.join(f'{x:.1f}' for x in ts)} | min {min(ts):.1f} median "
          f"{np.median(ts):.1f} | median / {trees[0][0]}'s {np.median(ts) / ref:.2f}")

"""The KIVI kernel of another commit against the working tree's, interleaved in one process (session 36): 30 layers x
3 KV heads x 8k tokens of random codes, SmolLM2's head_dim 64, ``ROWS`` query rows per KV head; ``kivi_layer_serial``
on one thread; ns per (token, KV head), median and fastest of ``ROUNDS`` rounds; the two outputs compared first.

    PYTHONPATH=src python benchmarks/results/kernel-session36/values_fused_ab.py BITS ROWS ROUNDS [REV [masked]]

``REV`` (default b37f78c, session 35's tree) is read with ``git show`` into a module in the temporary directory, one
file per revision kept between runs, so numba compiles it once per cache; its relative imports point at the working
tree's ``lookup``/``simd``, so ``REV`` must not need other intrinsics than the tree has. ``masked`` (session 37) passes
an all-true validity mask, so every block takes the kernel's general loop instead of its whole-block one.
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvcompress.kernels import cpu

bits, rows, rounds = (int(a) for a in sys.argv[1:4])
rev = sys.argv[4] if len(sys.argv) > 4 else "b37f78c"
src = subprocess.run(["git", "show", f"{rev}:src/kvcompress/kernels/cpu.py"], check=True, capture_output=True,
                     text=True).stdout
src = src.replace("from .lookup", "from kvcompress.kernels.lookup").replace("from .simd", "from kvcompress.kernels.simd")
masked = len(sys.argv) > 5 and sys.argv[5] == "masked"
path = Path(tempfile.gettempdir()) / "kvcompress-ab" / f"cpu_{rev}.py"
if not path.exists() or path.read_text() != src:  # unchanged: numba's cache of it stays valid
    path.parent.mkdir(exist_ok=True)
    path.write_text(src)
spec = importlib.util.spec_from_file_location(f"cpu_{rev}", path)
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old  # numba's cache records the module by name and imports it when loading
spec.loader.exec_module(old)

H3, L, n, d = 3, 30, 8192, 64
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
q = rng.standard_normal((1, H3, rows, d)).astype(np.float32) * 0.3
kchan, vchan = cpu.unpacked_channels(bits, d), cpu.unpacked_channels(bits, d)
kr = np.zeros((1, H3, 0, d), np.float32)
valid, mult = np.ones((1, 1, n if masked else 0), np.bool_), np.ones((1, 1, 2, 0), np.float32)


def run(mod):
    acc = np.empty((1, H3, rows, d), np.float32)
    m, l = np.empty((1, H3, rows), np.float32), np.empty((1, H3, rows), np.float32)
    for kp, ks, kz, vp, vs, vz in layers:
        mod.kivi_layer_serial(q, kp, ks, kz, bits, 32, False, kchan, n, kr, vp, vs, vz, bits, 32, vchan, n, kr,
                              valid, mult, n, n, acc, m, l)
    return acc, m, l


a, b = run(old), run(cpu)
print(f"bits {bits}, {rows} rows{', masked' if masked else ''}: max |acc| difference {np.abs(a[0] - b[0]).max():.2e} "
      f"of max |acc| {np.abs(a[0]).max():.3g}; max relative l difference {np.abs(a[2] / b[2] - 1).max():.1e}")
times = {"rev": [], "tree": []}
for k in range(rounds):
    for name, mod in (("rev", old), ("tree", cpu)) if k % 2 == 0 else (("tree", cpu), ("rev", old)):
        t = time.perf_counter()
        run(mod)
        times[name].append(time.perf_counter() - t)
ns = {k: (np.median(v) / (L * H3 * n) * 1e9, min(v) / (L * H3 * n) * 1e9) for k, v in times.items()}
print(f"ns per (token, KV head): {rev} {ns['rev'][0]:.1f} (fastest {ns['rev'][1]:.1f}), working tree "
      f"{ns['tree'][0]:.1f} (fastest {ns['tree'][1]:.1f}); {rev} / tree {ns['rev'][0] / ns['tree'][0]:.3f}")

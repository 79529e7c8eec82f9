"""Microbenchmark of KVQuant's per-block outlier loop (``kvquant_cpu._outliers_block``): one stream of 8192 tokens x 3 KV
heads x 64 channels, blocks of ``BLOCK``, outlier rate ``RATE`` (Poisson per token), fastest of 15 x 20 passes;
with ``ROWS`` > 1 (session 27) that many batch rows, their CSR rows interleaved token by token, every row's blocks
read in turn (as the kernel does), 15 x 10 passes.

    python benchmarks/results/kvquant-kernel-session25/outliers_block_microbench.py [KERNEL_FILE] [RATE] [ROWS]

``KERNEL_FILE`` (default: the tree's ``kvquant_cpu.py``) may be an edited copy or another revision's (``git show
REV:src/kvcompress/kernels/kvquant_cpu.py > /tmp/old.py``). Each run compiles into a numba cache directory of its own
(numba's cache cannot reload functions of a module loaded from a file path)."""
import sys, time, importlib.util
from pathlib import Path
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="outliers-microbench-")
import numpy as np
from numba import njit
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
from kvcompress import kernels
path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else str(ROOT / "src/kvcompress/kernels/kvquant_cpu.py")
spec = importlib.util.spec_from_file_location("kvcompress.kernels.kvq_variant", path)
kc = importlib.util.module_from_spec(spec); spec.loader.exec_module(kc)
rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
nb = int(sys.argv[3]) if len(sys.argv) > 3 else 1
h, d, n = 3, 64, 8192
gen = np.random.default_rng(0)
per = gen.poisson(rate * h * d, n) if nb == 1 else gen.poisson(rate * h * d, (n, nb))  # entries per (token, row)
nnz = int(per.sum())
cols = np.concatenate([np.sort(gen.choice(h * d, c, replace=False)) for c in per.reshape(-1)]).astype(np.uint8).reshape(-1, 1)
vals = (gen.standard_normal(nnz) * 5).astype(np.float16).view(np.uint16)
counts = np.ascontiguousarray(per.reshape(n, nb).T.astype(np.uint8)).reshape(nb, 1, n, 1)
rp = kc._row_pointers(counts, n)  # (empty for one row: offsets carried)
colmap = kernels._column_map(d, h)
B = kc.BLOCK
cflat = (colmap[0] * (B * d) + colmap[1]).astype(np.uint64)
out = np.zeros((h, B, d), np.float32)
tok = np.empty(B * h * d + 16, np.uint8)
obits = np.empty(B * h * d, np.uint32)
oval = np.empty(B * h * d, np.float32)
fn = kc._outliers_block
@njit
def drive(counts, rp, cols, vals, colmap, cflat, out, tok, obits, oval, n, reps):
    flat = out.reshape(-1)
    of = obits.view(np.float32)
    e = 0
    for _ in range(reps):
        for bi in range(counts.shape[0]):
            e = 0
            ta = 0
            while ta < n:
                nt = min(B, n - ta)
                e = fn(counts, rp, e, cols, vals, colmap, cflat, bi, ta, nt, out, flat, tok, obits, of, oval)
                ta += nt
    return e
reps = 20 if nb == 1 else 10
drive(counts, rp, cols, vals, colmap, cflat, out, tok, obits, oval, n, 1)
best = 1e9
for _ in range(15):
    t = time.perf_counter(); drive(counts, rp, cols, vals, colmap, cflat, out, tok, obits, oval, n, reps); best = min(best, (time.perf_counter() - t) / reps)
print(f"{path.split('/')[-1]} rate {rate}, {nb} batch row(s): nnz {nnz}, {best*1e6:.1f} us per 8k-token pass, "
      f"{best*1e9/nnz:.2f} ns/entry" + (f"; per step (x60 streams) {best*60*1e3:.2f} ms" if nb == 1 else ""))

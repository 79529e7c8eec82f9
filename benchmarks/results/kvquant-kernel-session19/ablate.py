"""Session 14 (session 17: the pieces of the vector path; min over rounds): where KVQuant's kernel spends its time on this host -- the serial layer kernel at 8k (3-bit, 1 %
outliers, pre-RoPE keys; 30 layers of random codes, as attention_microbench.py --layout kvquant), against copies of
kernels/kvquant_cpu.py with one piece switched off (a textual edit of the source; timings only, results wrong).
Interleaved rounds, median ms per step over 30 layers.

    python benchmarks/results/kvquant-kernel-session14/ablate.py 8192 7
    python benchmarks/results/kvquant-kernel-session14/ablate.py 8192 7 3 HEAD   # this kernel vs a committed one
"""
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attention_microbench import KVQuantLayers  # noqa: E402

from kvcompress import kernels  # noqa: E402

torch.set_num_threads(1)
n, rounds = int(sys.argv[1]), int(sys.argv[2])
bits = int(sys.argv[3]) if len(sys.argv) > 3 else 3
src = (ROOT / "src/kvcompress/kernels/kvquant_cpu.py").read_text().replace("from .cpu import", "from kvcompress.kernels.cpu import").replace("from .lookup import", "from kvcompress.kernels.lookup import").replace("from .simd import", "from kvcompress.kernels.simd import")
EDITS = {
    "base": [],
    "no rotation": [("        if rope:\n            pos0 = ", "        if False:\n            pos0 = ")],
    "no outliers": [("        if kcounts.shape[2] > 0:\n            ke = _outliers", "        if False:\n            ke = _outliers"),
                    ("        if vcounts.shape[2] > 0:\n            ve = _outliers", "        if False:\n            ve = _outliers")],
    "no key dequant": [("                _dequant_vec(kbits,", "                if False: _dequant_vec(kbits,")],
    "no value dequant": [("                _dequant_vec(vbits,", "                if False: _dequant_vec(vbits,")],
    "no scores": [("                _scores_vec(qb[hh]", "                if False: _scores_vec(qb[hh]")],
    "no value accumulation": [("                _values_vec(vf[hh]", "                if False: _values_vec(vf[hh]")],
    "BLOCK = 16": [("\nBLOCK = 64\n", "\nBLOCK = 16\n")],
    "BLOCK = 128": [("\nBLOCK = 64\n", "\nBLOCK = 128\n")],
    "BLOCK = 32": [("\nBLOCK = 64\n", "\nBLOCK = 32\n")],
}
ONLY = [a for a in sys.argv[5:]]
if ONLY:
    EDITS = {k: v for k, v in EDITS.items() if k == "base" or k in ONLY}
SOURCES = {name: (src, edits) for name, edits in EDITS.items() if not name.startswith("_x_") and "no writes" not in name}
if len(sys.argv) > 4 and sys.argv[4] != '-':  # compare the working tree's kernel with a committed one: ... REV
    import subprocess

    old = subprocess.run(["git", "show", f"{sys.argv[4]}:src/kvcompress/kernels/kvquant_cpu.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    SOURCES = {"base": (src, []), sys.argv[4]: (old.replace("from .cpu import", "from kvcompress.kernels.cpu import").replace("from .lookup import", "from kvcompress.kernels.lookup import").replace("from .simd import", "from kvcompress.kernels.simd import"), [])}
tmp = Path(tempfile.mkdtemp())
mods = {}
for name, (text, edits) in SOURCES.items():
    for a, b in edits:
        assert a in text, (name, a)
        text = text.replace(a, b)
    path = tmp / f"kvq_{len(mods)}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mods[name] = mod

layers = KVQuantLayers(n, bits)
H, D = 3, 64
args = []
for q, (ks, vs) in zip(layers.q, layers.streams):
    streams, rotation = kernels._kvquant_code_args(n, ks.codes(), vs.codes(), layers.rope, 1, H, D)
    qg = (q.reshape(1, H, 3, D) * D**-0.5).numpy()
    out = (np.empty((1, H, 3, D), np.float32), np.empty((1, H, 3), np.float32), np.empty((1, H, 3), np.float32))
    args.append((qg, *streams, kernels._column_map(D, H), *rotation, kernels._ALL_VALID, n, n, *kernels._NO_TAIL, *out))
for mod in mods.values():  # compile
    mod.kvquant_layer_serial(*args[0])
times = {k: [] for k in mods}
for _ in range(rounds):
    for name, mod in mods.items():
        t0 = time.perf_counter()
        for a in args:
            mod.kvquant_layer_serial(*a)
        times[name].append((time.perf_counter() - t0) * 1e3)
base = min(times["base"])  # session 17: min over rounds (the host's phases move medians by ~10 %)
print(f"{n} tokens, {bits}-bit, 30 layers x 3 KV heads, min of {rounds} rounds; ns per (token, KV head) = ms * 1e6 / (30 * {n} * 3)")
for name, t in times.items():
    med = min(t)
    print(f"{name:18s} {med:8.1f} ms  {med * 1e6 / (30 * n * 3):6.1f} ns  saves {base - med:7.1f} ms")

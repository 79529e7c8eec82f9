"""A/B of the fused kernels between two source trees, interleaved process by process (session 16).

    python benchmarks/results/kernel-simd-session16/ab.py BASE_SRC NEW_SRC [context] [rounds] [bits...]

Each round runs one child per tree (alternating which goes first); a child imports ``kvcompress`` from the tree it is
given, builds the microbenchmark's 30 layers (``attention_microbench.Layers`` / ``KVQuantLayers``, same seed), warms
the kernel, and prints the median ms of 15 timed steps of ``fused`` (the kernel alone) and its ``check()`` error.
"""
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.abspath(os.path.join(HERE, "..", ".."))

CHILD = r"""
import sys, time, json, statistics
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import torch; torch.set_num_threads(1)
import attention_microbench as mb
layout, n, bits = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
L = (mb.KVQuantLayers if layout == "kvquant" else mb.Layers)(n, bits)
err = L.check(); L.fused()
ts = []
for _ in range(15):
    t = time.perf_counter(); L.fused(); ts.append(time.perf_counter() - t)
print(json.dumps({"ms": 1e3 * statistics.median(ts), "err": err}))
"""


def main():
    base, new = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    specs = sys.argv[5:] or ["kivi:4", "kivi:2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    for spec in specs:
        layout, bits = spec.split(":")
        res = {"base": [], "new": []}
        errs = {}
        for r in range(rounds):
            order = [("base", base), ("new", new)] if r % 2 == 0 else [("new", new), ("base", base)]
            for name, src in order:
                out = subprocess.run([sys.executable, "-c", CHILD, src, BENCH, layout, str(n), bits], env=env,
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                d = json.loads(out)
                res[name].append(d["ms"])
                errs[name] = d["err"]
        ratios = [a / b for a, b in zip(res["new"], res["base"])]
        print(f"{layout}-{bits} n={n}: base {statistics.median(res['base']):.1f} ms, new "
              f"{statistics.median(res['new']):.1f} ms, new/base median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f} max {max(ratios):.3f}); check err base {errs['base']:.2e} new {errs['new']:.2e}",
              flush=True)


if __name__ == "__main__":
    main()

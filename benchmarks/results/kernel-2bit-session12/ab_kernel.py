"""A/B of the serial KIVI kernel (session 12): the previous cpu.py (plane unpacking at every width) vs today's, same
arguments (each version its own channel order), interleaved in one process. Run from the repository root:

    git show 01ab320:src/kvcompress/kernels/cpu.py > cpu_old.py
    python benchmarks/results/kernel-2bit-session12/ab_kernel.py 8192 2 --one   # one layer (fits in L2)
    python benchmarks/results/kernel-2bit-session12/ab_kernel.py 8192 2         # 30 layers
    python benchmarks/results/kernel-2bit-session12/ab_kernel.py 1024 2
"""
import sys, time, torch, statistics
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import attention_microbench as am
import kvcompress.kernels as K
import kvcompress.kernels.cpu as new
import cpu_old as old
torch.set_num_threads(1)
n, bits = int(sys.argv[1]), int(sys.argv[2])
one = "--one" in sys.argv
if one: am.LAYERS = 1
L = am.Layers(n, bits)
argsets = []
orig = K._run_layer
def cap(serial, parallel, args, units, work):
    argsets.append(args(1))
K._run_layer = cap
L.fused()
K._run_layer = orig
old_args = []
for a in argsets:
    a = list(a); a[7] = old.plane_channels(bits, 64); a[15] = old.plane_channels(bits, 64); old_args.append(tuple(a))
def run(mod, sets):
    t = time.perf_counter()
    for a in sets: mod.kivi_layer_serial(*a)
    return time.perf_counter() - t
# same results?
import numpy as np
a1, a2 = argsets[0], old_args[0]
run(new, argsets[:1]); r1 = a1[-3].copy(); run(old, old_args[:1]); r2 = a2[-3].copy()
print("max |new - old| acc:", float(np.abs(r1 - r2).max()))
res = {"new": [], "old": []}
R = 80 if one else 15  # rounds
for r in range(R):
    for name in (("new", "old") if r % 2 else ("old", "new")):
        res[name].append(run(new if name == "new" else old, argsets if name == "new" else old_args))
for k, v in res.items():
    print(f"{k}: median {statistics.median(v)*1e3:.2f} ms  min {min(v)*1e3:.2f} ms", end=" | ")
print(f"new/old: median {statistics.median(res['new'])/statistics.median(res['old']):.3f}, min {min(res['new'])/min(res['old']):.3f}  (n {n}, bits {bits}, {'1 layer' if one else '30 layers'})")

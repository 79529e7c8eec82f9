"""A/B/n of the serial KIVI kernel (session 12): the working tree's ``cpu.py`` against other versions of it on the same
arguments (SmolLM2's shapes, KIVI G = 32), run back to back round by round; the figure is the median over rounds of
``time(working tree) / time(other)``, which stays put when this host changes speed between rounds. Run from the
repository root (``cpu_<name>.py`` next to it), e.g. against the kernel as session 12 found it:

    git show 01ab320:src/kvcompress/kernels/cpu.py > cpu_s0.py
    python benchmarks/results/kernel-2bit-session12/ab_paired.py 8192 4 s0 --one   # one layer (fits in L2)
    python benchmarks/results/kernel-2bit-session12/ab_paired.py 8192 2 s0         # 30 layers

The working tree's channel order is passed to every version: at 2 bits the old version then computes garbage on the
same work (the timing is what is compared; the tests check the results).
"""
import sys, time, torch, statistics
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import importlib
import attention_microbench as am
import kvcompress.kernels as K
import kvcompress.kernels.cpu as cur
torch.set_num_threads(1)
n, bits = int(sys.argv[1]), int(sys.argv[2])
names = sys.argv[3].split(",")
one = "--one" in sys.argv
if one: am.LAYERS = 1
L = am.Layers(n, bits)
argsets = []
orig = K._run_layer
K._run_layer = lambda serial, parallel, args, units, work: argsets.append(args(1))
L.fused()
K._run_layer = orig
mods = {"cur": cur, **{k: importlib.import_module("cpu_" + k) for k in names}}
def run(mod):
    t = time.perf_counter()
    for a in argsets: mod.kivi_layer_serial(*a)
    return time.perf_counter() - t
for m in mods.values(): run(m)
res = {k: [] for k in mods}
R = 100 if one else 21
for r in range(R):
    ks = list(mods) if r % 2 else list(mods)[::-1]
    for k in ks: res[k].append(run(mods[k]))
base = statistics.median(res["cur"])
def paired(k):  # median over rounds of cur / k, each round's runs back to back (robust to the host's slow phases)
    return statistics.median(c / x for c, x in zip(res["cur"], res[k]))
print(f"n {n} bits {bits} {'1 layer' if one else '30 layers'}: cur median {base*1e3:.2f} ms; " + "; ".join(f"cur/{k} {paired(k):.3f} (q1-q3 {statistics.quantiles([c / x for c, x in zip(res['cur'], res[k])], n=4)[0]:.2f}-{statistics.quantiles([c / x for c, x in zip(res['cur'], res[k])], n=4)[2]:.2f})" for k in res if k != "cur"))

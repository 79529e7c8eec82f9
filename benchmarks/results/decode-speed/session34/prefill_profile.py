"""Session 34: where an 8k KVQuant-3 prefill's time goes next to DynamicCache's. One process, one thread: a warm-up
prefill of the method, then PAIRS alternating pairs of prefills (DynamicCache and the method, which goes first
alternates), each under cProfile; per pair the wall times, their ratio, and the eight largest own-time entries of
either side (seconds).

    python benchmarks/results/decode-speed/session34/prefill_profile.py 8192 kvquant:bits=3,calibration=auto 3
"""
import sys, time, cProfile, pstats, io, torch
from transformers import DynamicCache
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/, for decode_speed
from decode_speed import prefill
from kvcompress import load_model
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
torch.set_num_threads(1)
L = int(sys.argv[1]); spec = sys.argv[2]; pairs = int(sys.argv[3])
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:L].view(1, -1)
sp = parse_spec(spec); make = lambda: sp.make(model)
c, _ = prefill(model, make, ids); c.close(); del c
def run(build):
    pr = cProfile.Profile(); t0 = time.perf_counter(); pr.enable(); c, _ = prefill(model, build, ids); pr.disable()
    t = time.perf_counter() - t0
    if hasattr(c, "close"): c.close()
    st = pstats.Stats(pr); out = {}
    for (f, ln, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        out[fn if f == "~" else f"{f.split('/')[-1]}:{fn}"] = tt
    return t, out
for i in range(pairs):
    order = [("dyn", DynamicCache), ("method", make)]
    if i % 2: order.reverse()
    res = {n: run(b) for n, b in order}
    keys = sorted(set(res["dyn"][1]) | set(res["method"][1]), key=lambda k: -max(res["dyn"][1].get(k, 0), res["method"][1].get(k, 0)))[:8]
    print(f"pair {i}: dyn {res['dyn'][0]:.2f}  method {res['method'][0]:.2f}  ratio {res['dyn'][0]/res['method'][0]:.3f}")
    for k in keys: print(f"   {k[:70]:70s} {res['dyn'][1].get(k,0):7.2f} {res['method'][1].get(k,0):7.2f}")
    sys.stdout.flush()

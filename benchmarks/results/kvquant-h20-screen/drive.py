import sys, time, json, ast
sys.path.insert(0, "/tmp/h20")
import torch
from sim import *
nwin = int(sys.argv[1]); variants = sys.argv[2:]
model, tok, ids, _ = load(nwin)
wins = windows_from_ids(ids, P + C, nwin, 0)
t0 = time.time()
ref = run_windows(model, wins, fp16_quant, make_masks(0))
rnll = sum(float(-r.gather(-1, w[P:].view(-1,1)).sum()) for r, w in zip(ref, wins)) / (C*len(wins))
print(f"ref ppl {math.exp(rnll):.3f}  ({time.time()-t0:.0f}s)", flush=True)
for v in variants:
    t0 = time.time()
    d = dict(ast.literal_eval(v))
    R = d.pop("R", 0)
    q = KVQSim(model, d)
    lps = run_windows(model, wins, q, make_masks(R))
    nll, kl, ag = compare(ref, lps, wins)
    print(f"{v:70s} ppl {math.exp(nll):.3f} dppl {100*(math.exp(nll-rnll)-1):+.2f}% KL {kl:.4f} agree {100*ag:.1f}%  ({time.time()-t0:.0f}s)", flush=True)

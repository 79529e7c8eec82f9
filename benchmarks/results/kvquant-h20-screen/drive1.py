# window subset driver: argv[1] = comma list of window indices in the 4-window set
import sys, time, ast; sys.path.insert(0, "/tmp/h20")
from sim import *
idx = [int(x) for x in sys.argv[1].split(",")]
model, tok, ids, _ = load(4)
wins = windows_from_ids(ids, P + C, 4, 0)[idx]
t0 = time.time()
ref = run_windows(model, wins, fp16_quant, make_masks(0))
rnll = sum(float(-r.gather(-1, w[P:].view(-1,1)).sum()) for r, w in zip(ref, wins)) / (C*len(wins))
print(f"windows {idx} ref ppl {math.exp(rnll):.3f} ({time.time()-t0:.0f}s)", flush=True)
for v in sys.argv[2:]:
    t0 = time.time(); d = dict(ast.literal_eval(v)); R = d.pop("R", 0)
    lps = run_windows(model, wins, KVQSim(model, d), make_masks(R))
    nll, kl, ag = compare(ref, lps, wins)
    print(f"{v:70s} dppl {100*(math.exp(nll-rnll)-1):+.2f}% KL {kl:.4f} agree {100*ag:.1f}%  ({time.time()-t0:.0f}s)", flush=True)

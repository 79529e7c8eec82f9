import sys, ast; sys.path.insert(0, "/tmp/h20")
from sim import *
model, tok, ids, _ = load(4)
wins = windows_from_ids(ids, P + C, 4, 0)[3:4]
ref = run_windows(model, wins, fp16_quant, make_masks(0))[0]
tgt = wins[0][P:]
for v in sys.argv[1:]:
    d = dict(ast.literal_eval(v)); R = d.pop("R", 0)
    l = run_windows(model, wins, KVQSim(model, d), make_masks(R))[0]
    nr = -ref.gather(-1, tgt.view(-1,1)).squeeze(-1); nm = -l.gather(-1, tgt.view(-1,1)).squeeze(-1)
    kl = (ref.exp()*(ref-l)).sum(-1)
    diff = nm - nr
    print(v, "mean diff", float(diff.mean()), "KL", float(kl.mean()))
    top = diff.argsort(descending=True)[:12]
    for i in top.tolist():
        ctx = tok.decode(wins[0][P+i-12:P+i]); 
        print(f"  t={i:3d} dNLL {float(diff[i]):+.2f} refNLL {float(nr[i]):.2f} KL {float(kl[i]):.3f} tgt={tok.decode([int(tgt[i])])!r} ctx={ctx!r}")
    s = diff.sort(descending=True).values
    print("  sum top5", float(s[:5].sum()), "top20", float(s[:20].sum()), "total", float(diff.sum()), "neg sum", float(s[s<0].sum()))

"""FastGen (default T = 0.95): which hybrid each (layer, KV head) picks on the prompts of the 4 evaluation windows
(WikiText-2, P = 1024, seed 0 as `kvcompress eval`), the mean recovery of each hybrid, the share of prompt tokens
kept.  `python benchmarks/fastgen_policy_share.py` (one thread, about a minute)."""
import torch, collections
from kvcompress import load_model, make_cache
from kvcompress.compat import cache_kwargs
from kvcompress.data import load_text, token_windows
from kvcompress.methods.fastgen_policies import policy_name, HYBRID_NAMES
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
w = token_windows(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw"), 1280, 4, seed=0)
count = collections.Counter(); recs = []; kept = []
for row in w:
    with make_cache("fastgen", model) as cache, torch.no_grad():
        model(input_ids=row[None, :1024], **cache_kwargs(model, cache))
        for l in cache.layers:
            for p in l.head_policies()[0]:
                count[policy_name(p)] += 1
            recs.append(l.recoveries[0])
            kept += [n / 1024 for n in l.lengths]
tot = sum(count.values())
print("policy share over 4 prompts x 30 layers x 3 kv heads:")
for k, v in count.most_common():
    print(f"  {k}: {v} ({100*v/tot:.1f} %)")
r = torch.stack(recs).reshape(-1, 5)
print("mean recovery per hybrid:", {n: round(float(x), 3) for n, x in zip(HYBRID_NAMES, r.mean(0))})
print("mean kept share after the prompt: %.3f" % (sum(kept) / len(kept)))

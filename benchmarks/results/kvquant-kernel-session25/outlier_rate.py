"""Share of keys and values KVQuant-3 (calibrated) keeps as outliers on 4096 tokens of WikiText-2, per layer (every
6th printed) and over all layers. Run from the repository root:

    python benchmarks/results/kvquant-kernel-session25/outlier_rate.py
"""
import torch
from kvcompress import load_model
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m", progress=False)
n = 4096
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw"))[:n]).view(1, -1)
cache = parse_spec("kvquant:bits=3,calibration=auto").make(model)
with torch.inference_mode():
    model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
tk = tv = ent = 0
for i, layer in enumerate(cache.layers):
    sk, sv = layer.k.sparse, layer.v.sparse
    e = layer.k.length * 3 * 64
    nk, nv = sk.vals.numel() if sk else 0, sv.vals.numel() if sv else 0
    tk += nk; tv += nv; ent += e
    if i % 6 == 0: print(i, layer.k.length, f"{nk/e:.4f} {nv/e:.4f}")
print("all", f"{tk/ent:.4f} {tv/ent:.4f}")

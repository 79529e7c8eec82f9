"""Session 13: where a decode step's time goes, per module (self_attn, mlp, lm_head, mask, rotary), DynamicCache vs a method.

    python benchmarks/results/decode-speed/session13/outside.py kivi:bits=4 1024 8 8
"""
import sys, time, statistics, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from decode_speed import prefill, decode_burst
from transformers import DynamicCache
import transformers.models.llama.modeling_llama as ML
from kvcompress import load_model
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
torch.set_num_threads(1)
spec = parse_spec(sys.argv[1]); L = int(sys.argv[2]); rounds = int(sys.argv[3]); steps = int(sys.argv[4])
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:L].view(1, -1)
T = {}
def timed(name, f):
    def w(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); T[name] = T.get(name, 0.0) + time.perf_counter() - t0; return r
    return w
ML.create_causal_mask = timed("mask", ML.create_causal_mask)
for i, layer in enumerate(model.model.layers):
    layer.self_attn.forward = timed("self_attn", layer.self_attn.forward)
    layer.mlp.forward = timed("mlp", layer.mlp.forward)
model.lm_head.forward = timed("lm_head", model.lm_head.forward)
model.model.rotary_emb.forward = timed("rotary", model.model.rotary_emb.forward)
dyn = list(prefill(model, DynamicCache, ids))
a = list(prefill(model, lambda: spec.make(model), ids))
res = {}
for i in range(rounds):
    for name, st in (("dyn", dyn), ("ours", a)):
        T.clear(); t = decode_burst(model, st, steps)
        res.setdefault(f"{name} total", []).append(t / steps * 1e3)
        for k, v in T.items():
            res.setdefault(f"{name} {k}", []).append(v / steps * 1e3)
for k, v in sorted(res.items()):
    print(f"{k:16s} {statistics.median(v):7.2f} ms/step")

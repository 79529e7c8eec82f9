"""Session 13: where a decode step's time goes, per module (self_attn, mlp, lm_head, mask, rotary), DynamicCache vs a method.

    python benchmarks/results/decode-speed/session13/outside.py kivi:bits=4 1024 8 8
"""
import statistics

from transformers import DynamicCache
import transformers.models.llama.modeling_llama as ML

from timing_setup import L, T, ids, model, rounds, spec, steps, timed  # noqa: F401
from decode_speed import decode_burst, prefill
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

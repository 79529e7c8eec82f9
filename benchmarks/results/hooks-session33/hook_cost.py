"""Session 33: ms per DynamicCache decode step of SmolLM2 (512-token prompt, 16 steps, three times) while 0, 20 and 100
KVQuant caches are alive: their hooks run in every forward of the model, whichever cache it uses.

    python benchmarks/results/hooks-session33/hook_cost.py
"""
import time, torch
from transformers import DynamicCache
from kvcompress import load_model, make_cache
from kvcompress.compat import cache_kwargs
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.arange(100, 612).view(1, -1)
def steps(n=16):
    c = DynamicCache()
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, c)); nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = model(nxt, **cache_kwargs(model, c)).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / n * 1e3
held = []
for k in [0, 20, 100]:
    while len(held) < k: held.append(make_cache("kvquant", model, bits=3, nuq=False))
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    print(k, "caches alive,", hooks, "hooks: ms per DynamicCache decode step", [round(steps(), 2) for _ in range(3)], flush=True)

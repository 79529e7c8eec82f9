"""Session 13: time inside the attention step per piece (sdpa / cache update vs the kvcompress layer, its kernel, stage,
flush, settle, ...), by wrapping functions with perf_counter; run at session start (the kernel then was timed apart).

    python benchmarks/results/decode-speed/session13/breakdown.py kivi:bits=4 1024 6 8
"""
import sys, time, statistics, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from decode_speed import prefill, decode_burst
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from kvcompress import load_model, kernels
from kvcompress.layers import KVLayer
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
sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = timed("sdpa", sdpa)
DynamicLayer.update = timed("dyn.update", DynamicLayer.update)
KVLayer.attend = timed("ours.attend", KVLayer.attend)
KVLayer.update = timed("ours.update", KVLayer.update)
kernels._cpu.kivi_layer_serial = timed("kernel", kernels._cpu.kivi_layer_serial)
kernels._kvq_cpu.kvquant_layer_serial = timed("kernel", kernels._kvq_cpu.kvquant_layer_serial)
dyn = list(prefill(model, DynamicCache, ids))
a = list(prefill(model, lambda: spec.make(model), ids))
res = {}
for i in range(rounds):
    T.clear(); td = decode_burst(model, dyn, steps); Td = dict(T)
    T.clear(); ta = decode_burst(model, a, steps); Ta = dict(T)
    for k, v in [("dyn total", td), ("ours total", ta)] + list(Td.items()) + list(Ta.items()):
        res.setdefault(k, []).append(v / steps * 1e3)
for k, v in res.items():
    print(f"{k:14s} {statistics.median(v):7.2f} ms/step")
from kvcompress.methods import kivi as K
K.KiviStore.stage = timed("stage", K.KiviStore.stage)
K.KiviStore.flush = timed("flush", K.KiviStore.flush)
K.KiviStore.fused = timed("fused()", K.KiviStore.fused)
K.KiviStore.decode_step = timed("decode_step", K.KiviStore.decode_step)
K._DeferredQuantization.settle = timed("settle", K._DeferredQuantization.settle)
K.KiviLayer.attend_step = timed("attend_step", K.KiviLayer.attend_step)
res = {}
for i in range(rounds):
    T.clear(); ta = decode_burst(model, a, steps); Ta = dict(T)
    for k, v in list(Ta.items()):
        res.setdefault(k, []).append(v / steps * 1e3)
for k, v in res.items():
    print(f"{k:14s} {statistics.median(v):7.2f} ms/step")
print("---- inside decode_step")
kernels._tail = timed("_tail", kernels._tail)
kernels._kivi_numba = timed("_kivi_numba", kernels._kivi_numba)
kernels._run_layer = timed("_run_layer", kernels._run_layer)
K._Quantized.arrays = timed("arrays", K._Quantized.arrays)
res = {}
for i in range(rounds):
    T.clear(); ta = decode_burst(model, a, steps); Ta = dict(T)
    for k, v in list(Ta.items()):
        res.setdefault(k, []).append(v / steps * 1e3)
for k, v in res.items():
    print(f"{k:14s} {statistics.median(v):7.2f} ms/step")

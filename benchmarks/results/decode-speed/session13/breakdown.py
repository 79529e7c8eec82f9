"""Session 13: time inside the attention step per piece (sdpa / cache update vs the kvcompress layer, its kernel, stage,
flush, settle, ...), by wrapping functions with perf_counter; run at session start (the kernel then was timed apart).

    python benchmarks/results/decode-speed/session13/breakdown.py kivi:bits=4 1024 6 8
"""
import statistics

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from kvcompress import kernels
from kvcompress.layers import KVLayer

from timing_setup import L, T, ids, model, print_interleaved_pieces, rounds, spec, steps, timed  # noqa: F401
from decode_speed import decode_burst, prefill
sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = timed("sdpa", sdpa)
DynamicLayer.update = timed("dyn.update", DynamicLayer.update)
KVLayer.attend = timed("ours.attend", KVLayer.attend)
KVLayer.update = timed("ours.update", KVLayer.update)
kernels._cpu.kivi_layer_serial = timed("kernel", kernels._cpu.kivi_layer_serial)
kernels._kvq_cpu.kvquant_layer_serial = timed("kernel", kernels._kvq_cpu.kvquant_layer_serial)
dyn = list(prefill(model, DynamicCache, ids))
a = list(prefill(model, lambda: spec.make(model), ids))
print_interleaved_pieces(decode_burst, dyn, a)
def report_method_pieces():
    """Median ms per step of every wrapped piece over ``rounds`` bursts of the method's cache."""
    res = {}
    for _ in range(rounds):
        T.clear()
        decode_burst(model, a, steps)
        for k, v in T.items():
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
report_method_pieces()
print("---- inside decode_step")
kernels._tail = timed("_tail", kernels._tail)
kernels._kivi_numba = timed("_kivi_numba", kernels._kivi_numba)
kernels._run_layer = timed("_run_layer", kernels._run_layer)
K._Quantized.arrays = timed("arrays", K._Quantized.arrays)
report_method_pieces()

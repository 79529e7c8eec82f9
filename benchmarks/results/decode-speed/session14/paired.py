"""Session 14: paired in-process A/B of KVQuant's one-call decode step (kernels.kvquant_decode) against DynamicCache
and against the path before it (the kernel with a float32 tail, the division in torch: kvquant_decode made to decline).
Both KVQuant caches append through quantize_into (this session's other change, not separable here).

    python benchmarks/results/decode-speed/session14/paired.py kvquant:bits=3,calibration=auto 1024 15 8
"""
import statistics
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session13"))
from timing_setup import ids, model, rounds, spec, steps  # noqa: E402  (argv: SPEC CONTEXT ROUNDS STEPS)
from decode_speed import decode_burst, prefill  # noqa: E402

from kvcompress import kernels  # noqa: E402

one_call = kernels.kvquant_decode
with torch.inference_mode():
    dyn = list(prefill(model, DynamicCache, ids))
    a = list(prefill(model, lambda: spec.make(model), ids))
    b = list(prefill(model, lambda: spec.make(model), ids))
r_new, r_old, r_gain = [], [], []
for i in range(rounds):
    td = decode_burst(model, dyn, steps)
    kernels.kvquant_decode = one_call
    tn = decode_burst(model, a, steps)
    kernels.kvquant_decode = lambda *args, **kw: None
    to = decode_burst(model, b, steps)
    kernels.kvquant_decode = one_call
    r_new.append(td / tn)
    r_old.append(td / to)
    r_gain.append(to / tn)
    print(f"round {i}: DynamicCache {td / steps * 1e3:.1f} ms  one call {tn / steps * 1e3:.1f} ms  "
          f"tail path {to / steps * 1e3:.1f} ms", flush=True)
print(f"median: one call vs DynamicCache {statistics.median(r_new):.3f}x, tail path vs DynamicCache "
      f"{statistics.median(r_old):.3f}x, tail-path time / one-call time {statistics.median(r_gain):.3f}")

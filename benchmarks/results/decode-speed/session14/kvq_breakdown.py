"""Session 14: where a KVQuant decode step's time goes inside the model (perf_counter wrappers around the layer's
pieces; ms per step over all layers, median over rounds), against DynamicCache's attention (sdpa + cache update).

    python benchmarks/results/decode-speed/session14/kvq_breakdown.py kvquant:bits=3,nuq=False 1024 6 8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session13"))

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from kvcompress import kernels  # noqa: E402
from kvcompress.layers import KVLayer  # noqa: E402
from kvcompress.methods import kvquant as KQ, kvquant_store as KS  # noqa: E402
from timing_setup import ids, model, print_interleaved_pieces, spec, timed  # noqa: E402
from decode_speed import decode_burst, prefill  # noqa: E402

ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = timed("sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
DynamicLayer.update = timed("dyn.update", DynamicLayer.update)
KVLayer.attend = timed("ours.attend", KVLayer.attend)
KQ.KVQuantLayer.attend_step = timed("attend_step", KQ.KVQuantLayer.attend_step)
KQ.KVQuantLayer._attend_one_fused = timed("one_fused", KQ.KVQuantLayer._attend_one_fused)
KQ.KVQuantLayer._body_codes = timed("body_codes", KQ.KVQuantLayer._body_codes)
KQ.KVQuantLayer._append = timed("append", KQ.KVQuantLayer._append)
KQ.KVQuantLayer._step_rope = timed("step_rope", KQ.KVQuantLayer._step_rope)
KS.QuantStream.append = timed("stream.append", KS.QuantStream.append)
KS.Positions.append = timed("pos.append", KS.Positions.append)
# numba functions called from other numba functions cannot be wrapped: only those Python calls
kernels._kvq_cpu.quantize_into = timed("quantize_into", kernels._kvq_cpu.quantize_into)
kernels.kvquant_decode = timed("kvq_decode", kernels.kvquant_decode)
kernels._kvq_cpu.kvquant_decode_serial = timed("kernel+tail", kernels._kvq_cpu.kvquant_decode_serial)

dyn = list(prefill(model, DynamicCache, ids))
ours = list(prefill(model, lambda: spec.make(model), ids))
print_interleaved_pieces(decode_burst, dyn, ours)

"""Speed: time to first token (prefill) and decode tokens/s, the method interleaved with the reference (full)
cache in one process; reported as median ratios ``reference_time / method_time`` (> 1 = the method is faster).

Absolute times are kept in the JSON for context only: the machine is shared, so only the interleaved ratios
mean anything."""

from __future__ import annotations

import statistics
import time

import torch
from ..compat import cache_kwargs


@torch.inference_mode()
def time_run(model, spec, ids: torch.Tensor, steps: int) -> dict:
    """One fresh cache: prefill ``ids`` ``(1, L)`` (timed: TTFT), then ``steps`` greedy decode steps (timed).
    Returns seconds and the memory ratios after prefill and after decoding."""
    with spec.make(model) as cache:
        t0 = time.perf_counter()
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
        nxt = logits.argmax().view(1, 1)
        ttft = time.perf_counter() - t0
        mem_prefill = cache.memory_report()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
            nxt = logits.argmax().view(1, 1)
        decode = time.perf_counter() - t0
        mem_end = cache.memory_report()
    return {
        "ttft_s": ttft,
        "decode_s": decode,
        "decode_tokens_per_s": steps / decode,
        "bytes_ratio_prefill": mem_prefill.ratio,
        "bytes_ratio_end": mem_end.ratio,
        "stored_bytes_end": mem_end.stored_bytes,
    }


def compare(model, spec, reference, ids: torch.Tensor, steps: int, repeats: int = 3) -> dict:
    """``repeats`` rounds, each timing the reference and the method back to back (order alternating per round).
    ``ttft_ratio`` / ``decode_ratio``: medians over rounds of reference_time / method_time."""
    rounds = []
    for r in range(repeats):
        order = (reference, spec) if r % 2 == 0 else (spec, reference)
        got = {id(s): time_run(model, s, ids, steps) for s in order}
        ref, met = got[id(reference)], got[id(spec)]
        rounds.append(
            {
                "ttft_ratio": ref["ttft_s"] / met["ttft_s"],
                "decode_ratio": ref["decode_s"] / met["decode_s"],
                "reference": ref,
                "method": met,
            }
        )
    return {
        "ttft_ratio": statistics.median(x["ttft_ratio"] for x in rounds),
        "decode_ratio": statistics.median(x["decode_ratio"] for x in rounds),
        "context": int(ids.shape[1]),
        "steps": steps,
        "repeats": repeats,
        "rounds": rounds,
    }

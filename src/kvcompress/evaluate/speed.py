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


@torch.inference_mode()
def _prefill(model, cache, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    return logits.argmax().view(1, 1), time.perf_counter() - t0


@torch.inference_mode()
def _burst(model, cache, nxt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[0, -1].argmax().view(1, 1)
    return nxt, time.perf_counter() - t0


class SharedReference:
    """The reference cache prefilled once with ``ids (1, L)`` and shared by every method's decode bursts: it grows by
    the reference's bursts and is prefilled again once it holds more than ``L + slack`` tokens, so the reference
    decodes within ``slack`` tokens of the method's context while most methods pay no reference prefill."""

    def __init__(self, model, spec, ids: torch.Tensor, slack: int = 96):
        self.model, self.spec, self.ids, self.slack = model, spec, ids, slack
        self.cache = self.ctx = self.next = None
        self.ttft_s: float | None = None
        self.prefills = 0

    def ready(self) -> None:
        """Prefill (again) if there is no cache yet or it has grown past ``L + slack``."""
        if self.cache is not None and self.cache.get_seq_length() <= self.ids.shape[1] + self.slack:
            return
        self.close()
        self.ctx = self.spec.make(self.model)
        self.cache = self.ctx.__enter__()
        self.next, self.ttft_s = _prefill(self.model, self.cache, self.ids)
        self.prefills += 1

    def burst(self, steps: int) -> float:
        self.next, seconds = _burst(self.model, self.cache, self.next, steps)
        return seconds

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
        self.cache = self.ctx = self.next = None


def compare_bursts(model, spec, reference: SharedReference, ids: torch.Tensor, steps: int, repeats: int = 2) -> dict:
    """The cheap form of :func:`compare` (``kvcompress eval``'s): the method's cache is prefilled once with ``ids
    (1, L)``, then ``repeats`` rounds of ``steps`` greedy decode steps on it and on the shared reference (order
    alternating per round). ``decode_ratio``: median over rounds of reference_time / method_time; ``ttft_ratio``:
    the reference's latest prefill time / the method's (one pair, not interleaved: noisier)."""
    reference.ready()
    with spec.make(model) as cache:
        met_next, met_ttft = _prefill(model, cache, ids)
        rounds = []
        for r in range(repeats):
            if r % 2 == 0:
                ref_s = reference.burst(steps)
                met_next, met_s = _burst(model, cache, met_next, steps)
            else:
                met_next, met_s = _burst(model, cache, met_next, steps)
                ref_s = reference.burst(steps)
            rounds.append({"decode_ratio": ref_s / met_s, "reference_decode_s": ref_s, "method_decode_s": met_s})
        mem_end = cache.memory_report()
    return {
        "ttft_ratio": reference.ttft_s / met_ttft,
        "decode_ratio": statistics.median(x["decode_ratio"] for x in rounds),
        "context": int(ids.shape[1]),
        "steps": steps,
        "repeats": repeats,
        "ttft_s": {"reference": reference.ttft_s, "method": met_ttft},
        "bytes_ratio_end": mem_end.ratio,
        "rounds": rounds,
        "form": "bursts",
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

"""Compressed-context perplexity, KL(full || method) and top-1 agreement.

Protocol (DESIGN.md): prefill P prompt tokens through the method's cache (the method compresses as it
prescribes), then teacher-force the next C tokens one step at a time through that cache. The first continuation
token is predicted by the prefill's last logits, token ``P + i`` by the step that fed token ``P + i - 1``;
NLL is taken over those C tokens only. The full cache runs the same protocol on the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import cache_kwargs
from ..cache import MemoryReport


@dataclass
class TeacherForced:
    """One window through one cache. ``logprobs``: ``(C, vocab)`` float32 next-token log-probabilities."""

    logprobs: torch.Tensor
    memory_prefill: MemoryReport
    memory_end: MemoryReport


@torch.inference_mode()
def teacher_force(model, cache, window: torch.Tensor, prompt_len: int) -> TeacherForced:
    """``window``: ``(P + C,)`` token ids. Prefill ``window[:P]`` into ``cache``, then feed ``window[P:P+C-1]``
    one token per forward. Returns the C predictive distributions for ``window[P:]``."""
    ids = window.view(1, -1)
    total = ids.shape[1]
    out = model(input_ids=ids[:, :prompt_len], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    steps = [out.logits[0, -1].float()]
    memory_prefill = cache.memory_report()
    for t in range(prompt_len, total - 1):
        out = model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
        steps.append(out.logits[0, -1].float())
    memory_end = cache.memory_report()
    return TeacherForced(torch.stack(steps).log_softmax(-1), memory_prefill, memory_end)


def compare(reference: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-window sums. ``reference``, ``logprobs``: ``(C, vocab)`` log-probs; ``targets``: ``(C,)`` ids.

    Returns ``nll_sum`` (method), ``kl_sum`` of KL(reference || method) over the steps, ``agree`` (top-1 equal
    count), ``tokens``."""
    ref, lp = reference.double(), logprobs.double()
    nll = -lp.gather(-1, targets.view(-1, 1)).squeeze(-1)
    kl = (ref.exp() * (ref - lp)).sum(-1)
    agree = reference.argmax(-1) == logprobs.argmax(-1)
    return {
        "nll_sum": float(nll.sum()),
        "kl_sum": float(kl.sum()),
        "agree": int(agree.sum()),
        "tokens": int(targets.numel()),
    }


@torch.inference_mode()
def plain_nll(model, window: torch.Tensor, prompt_len: int) -> float:
    """Sum of NLL of ``window[P:]`` from ONE plain forward over the whole window (no cache) — the check that
    the step-by-step protocol on the full cache is right."""
    ids = window.view(1, -1)
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt_len - 1 : -1].double()
    return float(-logits.log_softmax(-1).gather(-1, ids[0, prompt_len:].view(-1, 1)).sum())


def summarize(per_window: list[dict]) -> dict:
    """Pool windows: ppl = exp(total NLL / total tokens), mean KL per step, agreement share."""
    tokens = sum(w["tokens"] for w in per_window)
    nll = sum(w["nll_sum"] for w in per_window)
    return {
        "ppl": float(torch.tensor(nll / tokens, dtype=torch.float64).exp()),
        "nll": nll / tokens,
        "kl": sum(w["kl_sum"] for w in per_window) / tokens,
        "agreement": sum(w["agree"] for w in per_window) / tokens,
        "tokens": tokens,
        "windows": per_window,
    }

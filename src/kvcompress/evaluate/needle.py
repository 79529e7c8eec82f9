"""Needle in a haystack through a compressed cache, greedy decoding, exact match of the 7 digits.

- ``aware``: the question is part of the prompt the method compresses (one prefill of context + question).
- ``agnostic``: the method compresses the context alone (prefill of the context), then the question is fed one
  token at a time through the compressed cache, then the answer is decoded.
"""

from __future__ import annotations

import torch

from ..compat import cache_kwargs
from ..data import NeedleTask, needle_hit

MODES = ("aware", "agnostic")


def _eos_ids(tokenizer) -> set[int]:
    ids = set()
    for attr in ("eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


@torch.inference_mode()
def answer(model, cache, task: NeedleTask, mode: str, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy answer tokens (at most ``max_new_tokens``, stops at EOS) for ``task`` through ``cache``."""
    if mode == "aware":
        ids = torch.tensor([task.input_ids])
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    else:
        ids = torch.tensor([task.context_ids])
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
        for tok in task.question_ids:
            logits = model(input_ids=torch.tensor([[tok]]), **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits.argmax())
        if nxt in eos_ids:
            break
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model(input_ids=torch.tensor([[nxt]]), **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
    return out


def run_task(model, tokenizer, spec, task: NeedleTask, mode: str, max_new_tokens: int = 12) -> dict:
    """One task, one mode, a fresh cache. Returns ``{"hit", "answer", "generated", "depth", "context_len", "mode"}``."""
    with spec.make(model) as cache:
        tokens = answer(model, cache, task, mode, max_new_tokens, _eos_ids(tokenizer))
        ratio = cache.memory_report().ratio
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {
        "context_len": task.context_len,
        "depth": task.depth,
        "mode": mode,
        "answer": task.answer,
        "generated": text,
        "hit": needle_hit(text, task.answer),
        "bytes_ratio": ratio,
    }


def summarize(results: list[dict]) -> dict:
    """Accuracy per mode and per ``context_len`` (``{"aware": {"1024": 0.67, "all": 0.67}, ...}``)."""
    out: dict = {}
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        acc = {}
        for n in sorted({r["context_len"] for r in rows}):
            sel = [r["hit"] for r in rows if r["context_len"] == n]
            acc[str(n)] = sum(sel) / len(sel)
        acc["all"] = sum(r["hit"] for r in rows) / len(rows)
        out[mode] = acc
    return out

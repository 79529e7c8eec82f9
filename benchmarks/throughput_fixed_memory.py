"""Throughput at a fixed KV memory budget (issue #19, the papers' serving claim): the largest batch each method fits in
``--budget-mib`` of counted cache bytes at a ``--context``-token context, and the aggregate decode tokens/s at that
batch, against transformers' ``DynamicCache`` (the model's dtype) at the batch *it* fits.

Per method:

* **bytes per sequence**: ``cache.memory_report().stored_bytes`` (the tensors the cache holds; DynamicCache: its K/V
  tensors) of a batch-1 cache holding ``context + steps + warmup`` tokens -- what a sequence holds by the end of the
  timed steps; **batch** = ``floor(budget / bytes per sequence)``.
* **aggregate tokens/s**: ``batch * steps / seconds`` for ``--steps`` greedy decode steps of the whole batch through
  the model, after ``--warmup`` untimed steps; methods run interleaved round by round, median of ``--rounds``.

Filling the caches: the ``context``-token prompt (real text) is prefilled **once** at batch 1 into a DynamicCache; its
per-layer K/V (post-RoPE, the model's dtype: what every cache's ``update`` receives) are tiled to the batch and handed
to each layer's own storage path (``layer.dense_step``: KIVI quantizes whole R-blocks of keys and all but the last R
values, LogQuant runs its flush schedule, KVQuant un-rotates keys with the model's cos/sin of positions 0..n-1 and
quantizes them) -- the state a batch prefill leaves, without paying the batch's quadratic prefill
attention on a 2-core CPU. ``--check`` (on by default) verifies that on a short prompt: next-token logits after the fill
equal those after a real prefill through the model. Every row of the batch holds the same K/V; the work per step does
not depend on their values.

    python benchmarks/throughput_fixed_memory.py --threads 1 > benchmarks/results/throughput-fixed-memory/results.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from kvcompress import kernels, load_model, make_cache
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text

DEFAULT_METHODS = ["kivi:bits=4", "kivi:bits=2", "logquant", "kvquant:bits=3,calibration=auto"]


def parse(label: str) -> tuple[str, dict]:
    """``"kivi:bits=4,group_size=32"`` -> ``("kivi", {"bits": 4, "group_size": 32})``."""
    name, _, rest = label.partition(":")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, value = pair.split("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def dynamic_nbytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def filled(model, label: str, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    """A cache of ``label`` (``"dynamic"`` or a kvcompress spec) holding ``kv`` (per layer ``(1, kv_heads, n, d)``)
    tiled to ``batch`` rows, filled through each layer's own storage path."""
    def tiled(i):  # one layer at a time: the batch's fp32 K/V of all layers at once would not fit beside the caches
        k, v = kv[i]
        return k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()

    if label == "dynamic":
        cache = DynamicCache()
        for i in range(len(kv)):
            cache.update(*tiled(i), i)
        return cache
    name, options = parse(label)
    cache = make_cache(name, model, **options)
    for i, layer in enumerate(cache.layers):
        k, v = tiled(i)
        layer.lazy_initialization(k, v)
        if getattr(layer, "pre_rope", False):  # KVQuant un-rotates keys with the cos/sin the forward used
            layer._step_rope = _prompt_rope(layer, k.shape[2])
        layer.dense_step(k, v)
        layer.__dict__.pop("_step_rope", None)
        layer.tokens_seen += k.shape[2]
    return cache


def _prompt_rope(layer, n: int):
    """What ``KVQuantLayer._step_rope`` returns inside a prefill of positions ``0 .. n-1`` (no forward runs while
    filling): positions and the model's own cos/sin for them."""
    cos, sin = layer.method.rope.cos_sin_range(0, n, layer.layer_type)
    pos = torch.arange(n).unsqueeze(0)
    return lambda q: (pos[:, -q:], cos[:, -q:], sin[:, -q:])


def nbytes(cache) -> int:
    return dynamic_nbytes(cache) if isinstance(cache, DynamicCache) else cache.memory_report().stored_bytes


@torch.inference_mode()
def decode(model, cache, first: torch.Tensor, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` greedy decode steps of the batch (after ``warmup`` untimed ones) from tokens ``first
    (batch, 1)``."""
    nxt = first
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        nxt = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


@torch.inference_mode()
def prefill_kv(model, ids: torch.Tensor):
    """Per-layer ``(keys, values)`` ``(1, kv_heads, n, d)`` of a DynamicCache prefill of ``ids (1, n)``, and the next
    token ``(1, 1)``."""
    cache = DynamicCache()
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    return [(layer.keys, layer.values) for layer in cache.layers], logits.argmax(-1, keepdim=True)


@torch.inference_mode()
def check_fill(model, ids: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Max |logit difference| of the next decode step after a real prefill of ``ids (1, n)`` vs after :func:`filled`
    with the K/V that real prefill handed to the cache (recorded from ``cache.update``), per label: 0 when filling
    leaves the state a prefill leaves. (The benchmark fills with a DynamicCache prefill's K/V; a method's own prefill
    attends over 2-byte K/V in the prompt, so its deeper layers' K/V differ by that rounding: same work per step.)"""
    out = {}
    for label in labels:
        name, options = parse(label)
        real = make_cache(name, model, **options) if label != "dynamic" else DynamicCache()
        seen, update = {}, real.update

        def record(k, v, i, *a, **kw):
            seen[i] = (k.clone(), v.clone())
            return update(k, v, i, *a, **kw)

        real.update = record
        logits = model(input_ids=ids, **cache_kwargs(model, real), use_cache=True, logits_to_keep=1).logits
        real.update = update
        first = logits[:, -1].argmax(-1, keepdim=True)
        a = model(input_ids=first, **cache_kwargs(model, real), use_cache=True).logits
        fill = filled(model, label, [seen[i] for i in range(len(seen))], 1)
        b = model(input_ids=first, **cache_kwargs(model, fill), use_cache=True).logits
        out[label] = (a - b).abs().max().item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    p.add_argument("--budget-mib", type=float, default=256.0)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-check", dest="check", action="store_false")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if kernels.AVAILABLE:
        kernels._cpu.numba.set_num_threads(min(args.threads, kernels._cpu.numba.config.NUMBA_NUM_THREADS))
    model, tok = load_model(args.model, progress=False)
    text_ids = torch.tensor(encode(tok, load_text(args.data)))
    labels = ["dynamic", *args.methods]
    print(f"```\npython benchmarks/throughput_fixed_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}\n```\n")
    print(f"model {args.model} ({next(model.parameters()).dtype}); KV budget {args.budget_mib:g} MiB of counted bytes; "
          f"context {args.context} tokens + {args.warmup} untimed + {args.steps} timed greedy decode steps; median of "
          f"{args.rounds} interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}, load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    if args.check:
        diffs = check_fill(model, text_ids[:300].view(1, -1), labels)
        print("fill check (300-token prompt; next-step logits after a real prefill vs after filling with the K/V that "
              "prefill recorded, max |diff|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + "\n")
    t0 = time.perf_counter()
    kv, first = prefill_kv(model, text_ids[: args.context].view(1, -1))
    print(f"prefill of the {args.context}-token prompt (batch 1, DynamicCache): {time.perf_counter() - t0:.1f} s\n")

    budget = int(args.budget_mib * 2**20)
    batch, per_seq = {}, {}
    for label in labels:  # bytes per sequence at the end of the timed steps (batch 1)
        cache = filled(model, label, kv, 1)
        decode(model, cache, first, args.steps, args.warmup)
        per_seq[label] = nbytes(cache)
        batch[label] = min(budget // per_seq[label], args.max_batch)
    seconds = {label: [] for label in labels}
    fitted = {label: 0 for label in labels}
    for _ in range(args.rounds):
        for label in labels:
            if not batch[label]:
                continue
            cache = filled(model, label, kv, batch[label])
            seconds[label].append(decode(model, cache, first.expand(batch[label], 1), args.steps, args.warmup))
            fitted[label] = nbytes(cache)
            del cache
    ref = batch["dynamic"] * args.steps / statistics.median(seconds["dynamic"]) if seconds["dynamic"] else None
    print("| method | bytes / sequence | batch in budget | counted bytes at that batch | aggregate tok/s | vs DynamicCache "
          "| per-sequence tok/s | rounds (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label in labels:
        name = "DynamicCache (full)" if label == "dynamic" else f"`{label}`"
        if not batch[label]:
            print(f"| {name} | {per_seq[label] / 2**20:.1f} MiB | 0 | | | | | |")
            continue
        agg = batch[label] * args.steps / statistics.median(seconds[label])
        rel = f"{agg / ref:.2f}x" if ref else ""
        rounds = ", ".join(f"{s:.2f}" for s in seconds[label])
        print(f"| {name} | {per_seq[label] / 2**20:.1f} MiB | {batch[label]} | {fitted[label] / 2**20:.1f} MiB | "
              f"{agg:.1f} | {rel} | {agg / batch[label]:.2f} | {rounds} |")
    print(f"\nload average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed vs transformers' DynamicCache at several contexts, interleaved in one process.

For each context L and method spec: prefill L tokens of real text once, then time ``--rounds`` bursts of ``--steps``
greedy decode steps, alternating a burst of the method's cache with a burst of a DynamicCache (a copy of one prefilled
per context), each continuing where its previous burst stopped; the median ratio ``dynamic_time / method_time`` is
printed (> 1 = the method decodes faster). Also: the attention path each layer takes (self-attending over stored
parts, or dense K/V handed to transformers), the peak transient bytes of the method's cache while decoding, and the
TTFT ratio: the median of ``--ttft-rounds`` interleaved pairs of prefills (a DynamicCache one and the method's, each
building its own cache; which goes first alternates from pair to pair, since the second of a pair measured 1-2 %
slower in its matmuls too, session 21), after the method's first prefill warmed it up. ``--ttft-only`` skips the
decode bursts. With ``--chunked-too``, each round also times
a burst of the method's cache with the fused kernels switched off (``kernels.fused(False)``: the chunked path over the
same stored codes) and prints ``chunked_time / method_time`` (> 1 = the kernel path is faster).

    python benchmarks/decode_speed.py --contexts 1024 4096 8192 --threads 1 > benchmarks/results/decode-speed/results.md

``--dtype bfloat16`` runs the model (and so DynamicCache and the held 2-byte parts) in bfloat16, the dtype SmolLM2's
hub checkpoint loads in by default; the kernels compute in fp32 either way.

Absolute times are printed for context only; the machine is shared, only the interleaved ratios mean anything.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from kvcompress import kernels, load_model
from kvcompress.attention.interface import inner_of, install
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec

DEFAULT_METHODS = ["full", "kivi:bits=4", "kivi:bits=2", "logquant", "streaming:budget=0.25", "h2o",
                   "snapkv:budget=0.25", "kvquant:nuq=False,bits=3", "minicache:start_layer=15", "fastkv", "fastgen"]


@torch.inference_mode()
def prefill(model, make, ids: torch.Tensor):
    """A cache from ``make()`` holding ``ids (1, L)``, and the greedy next token."""
    cache = make()
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    return cache, logits.argmax().view(1, 1)


@torch.inference_mode()
def decode_burst(model, state: list, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps continuing ``state = [cache, next token (1, 1)]`` (updated)."""
    cache, nxt = state
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[0, -1].argmax().view(1, 1)
    state[1] = nxt
    return time.perf_counter() - t0


def ttft_ratio(model, make, ids: torch.Tensor, method_first: bool = False) -> float:
    """One DynamicCache prefill of ``ids`` and one with ``make()``, the method's first with ``method_first`` (each
    building its cache: a request's whole time to first token): ``dynamic_time / method_time``."""
    order = [("dynamic", DynamicCache), ("method", make)]
    times = {}
    for name, build in reversed(order) if method_first else order:
        t0 = time.perf_counter()
        cache, _ = prefill(model, build, ids)
        times[name] = time.perf_counter() - t0
        if hasattr(cache, "close"):
            cache.close()
    return times["dynamic"] / times["method"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the dtype the model computes in, the caches' too (default: load_model's, float32; SmolLM2's "
                        "hub checkpoint is bfloat16, what transformers' from_pretrained gives it by default)")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="transformers' attention implementation, the one DynamicCache attends with (default sdpa, "
                        "transformers' own default; in bfloat16 its eager path is faster on this CPU)")
    p.add_argument("--prefill-attn", choices=["sdpa", "eager"], default=None,
                   help="the attention implementation of DynamicCache's prefills (default: --attn's); e.g. sdpa with "
                        "--attn eager, whose prefill at 8k takes minutes (the TTFT column then compares that prefill)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ttft-rounds", type=int, default=3,
                   help="pairs of prefills (DynamicCache and the method, alternating which goes first) per method; "
                        "the median ratio")
    p.add_argument("--ttft-only", action="store_true", help="only the TTFT pairs (no decode bursts)")
    p.add_argument("--chunked-too", action="store_true",
                   help="also time the method with the fused kernels off (the chunked path), interleaved")
    p.add_argument("--min-parallel-work", type=int, default=None,
                   help="kernels.MIN_PARALLEL_WORK for this run (batch * kv_heads * tokens from which a kernel runs "
                        f"threaded; default {kernels.MIN_PARALLEL_WORK})")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.min_parallel_work is not None:
        kernels.MIN_PARALLEL_WORK = args.min_parallel_work
    model, tok = load_model(args.model, dtype=args.dtype and getattr(torch, args.dtype), progress=False)
    prefill_attn = args.prefill_attn or args.attn

    def attention(impl: str):
        """Give the model ``impl`` as its own attention (kvcompress's routing, once a method installed it, kept)."""
        if inner_of(model) != impl:
            routed = model.config._attn_implementation != inner_of(model)
            model.set_attn_implementation(impl)
            if routed:
                install(model)

    attention(args.attn)
    text_ids = torch.tensor(encode(tok, load_text(args.data)))
    print(f"```\npython benchmarks/decode_speed.py {' '.join(sys.argv[1:])}\n```\n")
    print(f"model {args.model} ({next(model.parameters()).dtype}, {args.attn} attention"
          f"{'' if prefill_attn == args.attn else f', {prefill_attn} in prefills'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.steps} decode steps, median of {args.rounds} interleaved bursts after one prefill\n")
    extra = " fused vs chunked (kernels off) |" if args.chunked_too else ""
    print("| method | context | decode ratio vs DynamicCache | method tok/s | DynamicCache tok/s | TTFT ratio (median "
          f"of {args.ttft_rounds} interleaved prefill pairs) | path | peak transient (decode) |{extra}")
    print("|---|---:|---:|---:|---:|---:|---|---:|" + ("---:|" if args.chunked_too else ""))
    for length in args.contexts:
        ids = text_ids[:length].view(1, -1)
        attention(prefill_attn)
        dynamic = prefill(model, DynamicCache, ids)
        for label in args.methods:
            spec = parse_spec(label)
            try:
                ratios, ours, theirs, off = [], [], [], []
                attention(prefill_attn)
                mine = list(prefill(model, lambda: spec.make(model), ids))  # also warms up the method's kernels
                ttft = statistics.median(ttft_ratio(model, lambda: spec.make(model), ids, method_first=i % 2 == 1)
                                         for i in range(args.ttft_rounds))
                attention(args.attn)
                if args.ttft_only:
                    if hasattr(mine[0], "close"):
                        mine[0].close()
                    print(f"| `{label}` | {length} | - | - | - | {ttft:.2f}x | - | - |", flush=True)
                    continue
                for layer in mine[0].layers:  # the column is the decode steps' peak (a prefill holds its own K/V once)
                    if hasattr(layer, "peak_transient_bytes"):
                        layer.peak_transient_bytes = 0
                reference = [copy.deepcopy(dynamic[0]), dynamic[1]]
                cache = mine[0]
                for _ in range(args.rounds):
                    t_ref = decode_burst(model, reference, args.steps)
                    t_m = decode_burst(model, mine, args.steps)
                    ratios.append(t_ref / t_m)
                    if args.chunked_too:
                        with kernels.fused(False):
                            off.append(decode_burst(model, mine, args.steps) / t_m)
                    ours.append(args.steps / t_m)
                    theirs.append(args.steps / t_ref)
                if hasattr(cache, "close"):
                    cache.close()
            except Exception as exc:  # a method that refuses this model / context is reported, not fatal
                print(f"| `{label}` | {length} | refused: {str(exc)[:80]} | | | | | |")
                continue
            path = "self-attending" if all(getattr(layer, "attends", False) for layer in cache.layers if not getattr(layer, "is_sliding", False)) else "dense K/V to transformers"
            peak = cache.memory_report().peak_transient_bytes / 2**20
            chunked = f" {statistics.median(off):.2f}x |" if off else ""
            print(f"| `{label}` | {length} | {statistics.median(ratios):.2f}x | {statistics.median(ours):.1f} | "
                  f"{statistics.median(theirs):.1f} | {ttft:.2f}x | {path} | {peak:.2f} MiB |{chunked}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

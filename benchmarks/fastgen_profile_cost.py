"""FastGen's profiling cost as a share of a 128-token generation, and its stored bytes per policy.

    nice -n 5 python benchmarks/fastgen_profile_cost.py --prompt-len 1024 --new 128 --repeats 3

Times are CPU seconds of this process (``time.process_time``, one torch thread), so that other jobs on a shared
machine inflate them less than wall-clock time would. Per repeat, interleaved in one process: (a) a fastgen prefill (``recovery`` T) of a ``prompt-len``-token
WikiText window; (b) the same prefill with the full cache; (c) a ``new``-token greedy generation with the full
cache (prefill + decode). Profiling cost = (a) - (b): everything FastGen adds to the prefill (attention maps in
chunks, recoveries, policy choice, building the ragged buffers). Prints medians: profiling / generation, and the
wall-clock share the layers themselves measured (``FastGenLayer.profile_seconds`` / prefill wall time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompress.compat import cache_kwargs
from kvcompress import load_model, make_cache
from kvcompress.data import load_text, token_windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--recovery", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, progress=False)
    ids = token_windows(tok, load_text(args.data), args.prompt_len, 1)[0:1]
    prof, fg_prefill, fg_wall, full_prefill, gen = [], [], [], [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            with make_cache("fastgen", model, recovery=args.recovery, tokenizer=tok) as cache:
                t0, w0 = time.process_time(), time.perf_counter()
                model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
                fg_prefill.append(time.process_time() - t0)
                fg_wall.append(time.perf_counter() - w0)
                prof.append(sum(getattr(layer, "profile_seconds", 0.0) for layer in cache.layers))
            with make_cache("full", model) as cache:
                t0 = time.process_time()
                model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
                full_prefill.append(time.process_time() - t0)
            with make_cache("full", model) as cache:
                t0 = time.process_time()
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=args.new,
                    min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_token_id,
                )
                gen.append(time.process_time() - t0)
    med = statistics.median
    cost = med([a - b for a, b in zip(fg_prefill, full_prefill)])
    share = med([p / w for p, w in zip(prof, fg_wall)])
    print(f"model {args.model}, prompt {args.prompt_len} tokens, T={args.recovery}, {args.repeats} repeats (medians, CPU s)")
    print(f"profiling cost (fastgen prefill - full prefill): {cost:.3f} s = {100 * cost / med(gen):.2f} % of a "
          f"{args.new}-token generation ({med(gen):.2f} s with the full cache)")
    print(f"fastgen prefill / full prefill: {med(fg_prefill) / med(full_prefill):.2f}x ({med(fg_prefill):.2f} s vs "
          f"{med(full_prefill):.2f} s); in-layer profiling share of the fastgen prefill (wall): {100 * share:.1f} %")


if __name__ == "__main__":
    main()

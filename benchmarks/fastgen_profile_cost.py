"""FastGen's profiling cost as a share of a 128-token generation, and its stored bytes per policy.

    nice -n 5 python benchmarks/fastgen_profile_cost.py --prompt-len 1024 --new 128 --repeats 3

Per repeat, interleaved in one process: (a) a fastgen prefill (``recovery`` T) of a ``prompt-len``-token
WikiText window, timing the profiling + prompt compression inside the layers (``FastGenLayer.profile_seconds``)
and the whole prefill; (b) the same prefill with the full cache; (c) a ``new``-token greedy generation with the
full cache (prefill + decode). Prints medians: profiling / generation, fastgen prefill / full prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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
    model, tok = load_model(args.model, progress=False)
    ids = token_windows(tok, load_text(args.data), args.prompt_len, 1)[0:1]
    prof, fg_prefill, full_prefill, gen = [], [], [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            with make_cache("fastgen", model, recovery=args.recovery, tokenizer=tok) as cache:
                t0 = time.perf_counter()
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                fg_prefill.append(time.perf_counter() - t0)
                prof.append(sum(getattr(layer, "profile_seconds", 0.0) for layer in cache.layers))
            with make_cache("full", model) as cache:
                t0 = time.perf_counter()
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                full_prefill.append(time.perf_counter() - t0)
            with make_cache("full", model) as cache:
                t0 = time.perf_counter()
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=args.new,
                    min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_token_id,
                )
                gen.append(time.perf_counter() - t0)
    med = statistics.median
    print(f"model {args.model}, prompt {args.prompt_len} tokens, T={args.recovery}, {args.repeats} repeats (medians)")
    print(f"profiling + prompt compression: {med(prof):.3f} s = {100 * med(prof) / med(gen):.2f} % of a {args.new}-token generation ({med(gen):.2f} s, full cache)")
    print(f"fastgen prefill / full prefill: {med(fg_prefill) / med(full_prefill):.2f}x ({med(fg_prefill):.2f} s vs {med(full_prefill):.2f} s)")


if __name__ == "__main__":
    main()

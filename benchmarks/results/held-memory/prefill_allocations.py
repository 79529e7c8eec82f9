"""Session 35: the sizes of the blocks torch allocates during one prefill, bucketed by glibc's mmap threshold range.

glibc serves a block from its heap below ``M_MMAP_THRESHOLD`` and maps it on its own from there. The threshold starts
at 128 KiB and, unless set, rises to the size of each mapped block freed (up to 32 MiB on 64-bit): after a first
prefill has freed its large temporaries, the next prefill's blocks of that size come from the heap. This prints how
many blocks, and how many bytes, a prefill allocates in each size range, so the ranges can be matched with the
thresholds at which ``rss_per_cache.py --malloc-mmap-threshold`` stops growing. A block here is what one operator
keeps of what it allocated (``torch.profiler`` with ``profile_memory``: each event's ``self_cpu_memory_usage`` where
positive; on the CPU the profiler attributes allocations to the operator that made them, mostly its output), so an
operator's scratch that it frees before returning is not counted.

    python benchmarks/results/held-memory/prefill_allocations.py --tokens 2048 --method kvquant:bits=3,calibration=auto
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from kvcompress import load_model
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec

EDGES = [0, 2**17, 2**20, 2**22, 2**24, 2**25, 2**62]  # 128 KiB, 1 MiB, 4 MiB, 16 MiB, 32 MiB


def label(lo: int, hi: int) -> str:
    """A size range as text."""
    def size(b):
        return "inf" if b >= 2**62 else f"{b >> 20} MiB" if b >= 2**20 else f"{b >> 10} KiB"
    return f"[{size(lo)}, {size(hi)})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--method", default="kvquant:bits=3,calibration=auto")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[: args.tokens].view(1, -1)

    def prefill():
        cache = DynamicCache() if args.method == "DynamicCache" else parse_spec(args.method).make(model)
        with torch.inference_mode():
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        return cache

    first = prefill()  # a warm prefill first (calibration, compilation), kept alive as a program would
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        second = prefill()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    print(f"SmolLM2, one {args.tokens}-token prefill of `{args.method}` (the second; the first kept alive), "
          f"one thread: {len(sizes)} operators kept memory, {sum(sizes) / 2**20:.0f} MiB in all\n")
    print("| block size | blocks | MiB allocated | largest |")
    print("|---|---:|---:|---:|")
    for lo, hi in zip(EDGES, EDGES[1:]):
        part = [s for s in sizes if lo <= s < hi]
        print(f"| {label(lo, hi)} | {len(part)} | {sum(part) / 2**20:.1f} | "
              f"{(max(part) / 2**20 if part else 0):.2f} MiB |")
    del first, second


if __name__ == "__main__":
    main()

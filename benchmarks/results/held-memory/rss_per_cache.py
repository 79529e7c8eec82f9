"""Session 33: what the process's resident memory grows by for each cache a program keeps alive, next to what the cache
counts (``nbytes()``). Each method runs in a fresh process: load SmolLM2, prefill ``--tokens`` of WikiText-2 into
``--caches`` caches one after the other and keep them all; print the resident set after each. ``--malloc-mmap-threshold``
runs the same with glibc's ``MALLOC_MMAP_THRESHOLD_`` set (blocks from that size are mapped and unmapped on their own,
never carved out of the heap). ``--malloc-trim`` calls glibc's ``malloc_trim(0)`` after each prefill (the free heap
pages go back to the system) and prints the mean time of those calls; ``--release-free-memory`` (session 34) does the
same through the library's public call, ``kvcompress.release_free_memory()``, and also prints the mean MiB it reported
released.

    python benchmarks/results/held-memory/rss_per_cache.py --tokens 2048 --caches 4
    python benchmarks/results/held-memory/rss_per_cache.py --tokens 2048 --caches 4 --malloc-mmap-threshold 262144
    python benchmarks/results/held-memory/rss_per_cache.py --tokens 2048 --caches 4 --malloc-trim
    python benchmarks/results/held-memory/rss_per_cache.py --tokens 2048 --caches 4 --release-free-memory
"""
import argparse
import os
import subprocess
import sys

CHILD = r"""
import ctypes, sys, time
import torch
from transformers import DynamicCache
import kvcompress
from kvcompress import load_model
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
from kvcompress.memory import resident_bytes
torch.set_num_threads(1)
label, tokens, caches, trim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]  # trim: none / libc / library
libc, trims, released = ctypes.CDLL("libc.so.6"), [], []
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:tokens].view(1, -1)
rss = lambda: resident_bytes() / 2**20
held, out = [], [rss()]
for _ in range(caches):
    cache = DynamicCache() if label == "DynamicCache" else parse_spec(label).make(model)
    with torch.inference_mode():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    held.append(cache)
    if trim != "none":
        t0 = time.perf_counter()
        if trim == "libc":
            libc.malloc_trim(0)
        else:
            released.append(kvcompress.release_free_memory() / 2**20)
        trims.append(time.perf_counter() - t0)
    out.append(rss())
counted = held[0].nbytes() / 2**20 if hasattr(held[0], "nbytes") else float("nan")
print(counted, sum(trims) / max(1, len(trims)) * 1e3, sum(released) / max(1, len(released)), *out)
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--caches", type=int, default=4)
    p.add_argument("--malloc-mmap-threshold", type=int, default=None)
    after_prefill = p.add_mutually_exclusive_group()
    after_prefill.add_argument("--malloc-trim", action="store_true")
    after_prefill.add_argument("--release-free-memory", action="store_true")
    p.add_argument("--methods", nargs="+", default=["DynamicCache", "full", "kivi:bits=4", "kivi:bits=2", "logquant",
                                                     "kvquant:bits=3,calibration=auto", "kvquant:nuq=False,bits=3"])
    args = p.parse_args()
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    print(f"SmolLM2, {args.tokens}-token prefill per cache, {args.caches} caches kept alive, one thread; "
          f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'unset (glibc default, dynamic)'}"
          f"{'; malloc_trim(0) after each prefill' if args.malloc_trim else ''}"
          f"{'; kvcompress.release_free_memory() after each prefill' if args.release_free_memory else ''}\n")
    print("| method | counted nbytes() per cache (MiB) | resident after the model loaded (MiB) | resident after each cache (MiB) "
          "| growth per cache after the first (MiB) | malloc_trim (ms per call) | released per call (MiB) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for label in args.methods:
        res = subprocess.run([sys.executable, "-c", CHILD, label, str(args.tokens), str(args.caches),
                              "library" if args.release_free_memory else "libc" if args.malloc_trim else "none"],
                             env=env,
                             capture_output=True, text=True)
        if res.returncode:
            print(f"| `{label}` | failed: {res.stderr.strip().splitlines()[-1]} | | | | | |", flush=True)
            continue
        counted, trim_ms, released, *rss = map(float, res.stdout.split())
        trimmed = args.malloc_trim or args.release_free_memory
        growth = (rss[-1] - rss[1]) / max(1, args.caches - 1)
        print(f"| `{label}` | {counted:.1f} | {rss[0]:.0f} | {' / '.join(f'{r:.0f}' for r in rss[1:])} | {growth:.0f} | "
              f"{f'{trim_ms:.1f}' if trimmed else '-'} | {f'{released:.0f}' if args.release_free_memory else '-'} |",
              flush=True)


if __name__ == "__main__":
    main()

"""Session 35: where in glibc's heap the buffers a kept cache holds lie, after each of several 2k prefills.

For each kept cache, every tensor storage and numpy array reachable from it (``tests/test_held_memory.py``'s walk; one
entry per start address) is located against the ``[heap]`` segment of ``/proc/self/maps``: how many lie in the heap (the
rest are mapped blocks of their own), and how far below the heap's top the highest one lies. A buffer near the top keeps
glibc from handing back the free space under it (the heap shrinks from its top only, unless ``malloc_trim`` is called).
``mallinfo2`` gives the heap's free bytes. The model's own weights are not walked.

Two variants test what strands the heap: ``--drop`` closes and drops each cache after its prefill instead of keeping it;
``--map-buffers B`` moves every storage buffer of ``B`` bytes or more (:class:`kvcompress.storage.GrowingTokens`, what
the compressed caches hold their codes and statistics in) out of the heap into an anonymous mapping of its own (an
experiment: the buffer is copied there as it is taken).

    python benchmarks/results/held-memory/heap_placement.py --method kvquant:bits=3,calibration=auto
    python benchmarks/results/held-memory/heap_placement.py --method kvquant:bits=3,calibration=auto --drop
    python benchmarks/results/held-memory/heap_placement.py --method kvquant:bits=3,calibration=auto --map-buffers 1
"""
import argparse
import ctypes
import gc
import mmap
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

from kvcompress import load_model, storage
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
from kvcompress.memory import resident_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_held_memory import reachable_memory  # noqa: E402


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_range() -> tuple[int, int]:
    """``(start, end)`` of the ``[heap]`` mapping."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            a, z = line.split()[0].split("-")
            return int(a, 16), int(z, 16)
    return 0, 0


def map_buffers_from(min_bytes: int) -> None:
    """From now on, every :class:`~kvcompress.storage.GrowingTokens` buffer of ``min_bytes`` or more is copied, as it is
    taken, into an anonymous mapping of its own (outside glibc's heap; unmapped when the tensor is collected)."""
    hold = storage.GrowingTokens._hold

    def mapped_hold(self, buffer):
        if buffer is not None and buffer.numel() * buffer.element_size() >= min_bytes:
            mapped = torch.frombuffer(mmap.mmap(-1, buffer.numel() * buffer.element_size()), dtype=buffer.dtype,
                                      count=buffer.numel()).view(buffer.shape)
            mapped.copy_(buffer)
            buffer = mapped
        hold(self, buffer)

    storage.GrowingTokens._hold = mapped_hold


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--caches", type=int, default=4)
    p.add_argument("--method", default="kvquant:bits=3,calibration=auto")
    p.add_argument("--drop", action="store_true", help="close and drop each cache after its prefill")
    p.add_argument("--map-buffers", type=int, default=None, metavar="BYTES",
                   help="storage buffers of this size or more in mappings of their own, outside the heap")
    args = p.parse_args()
    if args.map_buffers is not None:
        map_buffers_from(args.map_buffers)
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[: args.tokens].view(1, -1)
    kept = "each cache closed and dropped after its prefill" if args.drop else "every cache kept alive"
    mapped = ("" if args.map_buffers is None
              else f"; storage buffers of >= {args.map_buffers} bytes mapped outside the heap")
    print(f"SmolLM2, `{args.method}`, {args.tokens}-token prefills, {kept}{mapped}, one thread\n")
    print("| after prefill | resident (MiB) | heap size (MiB) | heap free (MiB) | cache buffers in the heap / all "
          "| heap bytes they hold (KiB) | highest one below the heap's top (MiB) | its path |")
    print("|---:|---:|---:|---:|---|---:|---:|---|")
    held = []
    for k in range(args.caches):
        cache = DynamicCache() if args.method == "DynamicCache" else parse_spec(args.method).make(model)
        with torch.inference_mode():
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        skip = {id(model)}
        if getattr(getattr(cache, "method", None), "calibration", None) is not None:
            skip.add(id(cache.method.calibration))
        bufs = {}  # one entry per buffer (a tensor and a numpy view of its storage share one)
        for path, ptr, _, size in reachable_memory(cache, skip):
            if size and size >= bufs.get(ptr, ("", 0))[1]:
                bufs[ptr] = (path, size)
        bufs = [(path, ptr, size) for ptr, (path, size) in bufs.items()]
        if args.drop:  # (the buffer columns then say where its buffers were)
            getattr(cache, "close", lambda: None)()
            del cache
            gc.collect()
        else:
            held.append(cache)
        a, z = heap_range()
        info = libc.mallinfo2()
        inside = [(path, ptr, size) for path, ptr, size in bufs if a <= ptr < z]
        top = max(inside, key=lambda b: b[1] + b[2], default=None)
        below = (z - top[1] - top[2]) / 2**20 if top else float("nan")
        print(f"| {k + 1} | {resident_bytes() / 2**20:.0f} | {(z - a) / 2**20:.0f} | {info.fordblks / 2**20:.0f} | "
              f"{len(inside)} / {len(bufs)} | {sum(s for _, _, s in inside) / 1024:.0f} | {below:.1f} | "
              f"`{top[0] if top else '-'}` |", flush=True)


if __name__ == "__main__":
    main()

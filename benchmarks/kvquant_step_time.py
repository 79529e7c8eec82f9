"""Where a KVQuant decode step's time goes inside the model: the whole forward, the layers' attention steps, and the
numba call in them; then the same 30 calls replayed back to back (warm caches).

SmolLM2, KVQuant-3 calibrated, ``--context`` tokens of WikiText-2 prefilled, then ``--steps`` greedy decode steps
(the first 4 not counted); medians per step, milliseconds. With ``--threads 2`` the one-call step runs the threaded
kernel from :data:`kvcompress.kernels.MIN_PARALLEL_WORK` on (``--min-parallel-work`` overrides it). The counted
wrappers add about a microsecond per call. Timings only; nothing is checked.

    python benchmarks/kvquant_step_time.py --context 4096 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompress import kernels, load_model
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
from kvcompress.methods.kvquant import KVQuantLayer


def _timed(owner, name: str, spent: dict, record: list | None = None):
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``spent[name]`` (and its arguments to
    ``record``, when given); returns the original."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if record is not None:
            record.append(args)
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    return real


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--min-parallel-work", type=int, default=None)
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.min_parallel_work is not None:
        kernels.MIN_PARALLEL_WORK = args.min_parallel_work
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor(encode(tok, load_text(args.data))[: args.context]).view(1, -1)
    cache = parse_spec("kvquant:bits=3,calibration=auto").make(model)
    spent = {"attend_step": 0.0, "kvquant_decode_append": 0.0}
    calls: list[tuple] = []
    _timed(KVQuantLayer, "attend_step", spent)
    real_call = _timed(kernels._kvq_cpu, "kvquant_decode_append", spent, calls)
    rows = []
    with torch.inference_mode():
        nxt = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[0, -1].argmax().view(1, 1)
        for step in range(args.steps):
            spent.update(dict.fromkeys(spent, 0.0))
            calls.clear()
            start = time.perf_counter()
            nxt = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[0, -1].argmax().view(1, 1)
            if step >= 4:
                rows.append((time.perf_counter() - start, spent["attend_step"], spent["kvquant_decode_append"]))
    if not calls:
        raise SystemExit("no kvquant_decode_append call was made (no numba, or another path)")
    replays = []
    for _ in range(5):  # the last step's calls again, back to back (each rewrites the same new token's codes)
        start = time.perf_counter()
        for call in calls:
            real_call(*call)
        replays.append(time.perf_counter() - start)
    step, attend, call = (statistics.median(r[i] for r in rows) * 1e3 for i in range(3))
    n, span = calls[-1][8], calls[-1][9]
    print(f"context {args.context}, {torch.get_num_threads()} torch thread(s), {len(calls)} calls per step, "
          f"n={n}, token ranges of {span} ({-(-n // span)} range(s)); medians of {len(rows)} steps, ms")
    print("| step | attention steps | numba calls | outside numba | same calls replayed warm |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {step:.2f} | {attend:.2f} | {call:.2f} | {attend - call:.2f} | {statistics.median(replays) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

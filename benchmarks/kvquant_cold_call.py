"""What a KVQuant layer's decode call costs when the caches are cold, as they are inside the model.

Inside a decode step, each layer's numba call runs after the previous layers' weights went through the caches; the
call took about twice its warm time in session 20. This script captures the 30 calls of one decode step (SmolLM2,
KVQuant-3 calibrated, one thread), then replays them:

* ``warm``: the same call twice, the second timed;
* ``after scrub``: after copying 64 MiB (every cache level flushed);
* ``n=K``: the same call over the first ``K`` tokens only (one block: the per-call work without the context);
* ``+ this layer's arrays touched``: after the scrub, every cache line of the call's contiguous arrays is read once
  (its data back in the caches, nothing else);
* ``+ another layer's n=64 call``: after the scrub, another layer's one-block call first (the code, the scratch and
  the dispatch warm again; this layer's data still cold);
* ``dispatch only``: numba's dispatch of the same arguments to a function that does nothing.

Medians and minimums over ``--rounds`` x 8 calls, microseconds. Timings only; nothing is checked.

    python benchmarks/kvquant_cold_call.py --context 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from numba import njit

from kvcompress import kernels, load_model
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec


@njit
def _dispatch_only(*args):
    return len(args)


def capture(context: int, data: str) -> list[tuple]:
    """The arguments of every ``kvquant_decode_append`` call of one decode step after ``context`` tokens."""
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor(encode(tok, load_text(data))[:context]).view(1, -1)
    cache = parse_spec("kvquant:bits=3,calibration=auto").make(model)
    module = kernels._kvq_cpu
    real = module.kvquant_decode_append
    calls = []
    with torch.inference_mode():
        nxt = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[0, -1].argmax().view(1, 1)
        model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)  # compiled and warm

        def record(*args):
            calls.append(args)
            return real(*args)

        module.kvquant_decode_append = record
        try:
            model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)
        finally:
            module.kvquant_decode_append = real
    if not calls:
        raise SystemExit("no kvquant_decode_append call was made (no numba, or another path)")
    return calls


def _arrays(x):
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _arrays(y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    calls = capture(args.context, args.data)
    call = kernels._kvq_cpu.kvquant_decode_append
    src, dst = np.ones(16 << 20, np.float32), np.empty(16 << 20, np.float32)  # 64 MiB

    def scrub():
        np.copyto(dst, src)

    def first(a, n):  # the call over its first n tokens
        a = list(a)
        a[8] = n
        return tuple(a)

    def touch(a):  # every cache line of the call's contiguous arrays read once (one byte per 64)
        for x in _arrays(a):
            if x.size and x.flags.c_contiguous:
                x.reshape(-1).view(np.uint8)[::64].sum()

    def warm(fn, args_of):  # the same call just before
        return lambda a, o: fn(*args_of(a))

    def flushed(then=None):  # a 64 MiB copy, then (optionally) something else
        def before(a, o):
            scrub()
            if then is not None:
                then(a, o)
        return before

    whole, block64, block8 = (lambda a: a), (lambda a: first(a, 64)), (lambda a: first(a, 8))
    # case -> (what runs first, the function timed, its arguments from the call)
    cases = {
        "warm": (warm(call, whole), call, whole),
        "after scrub": (flushed(), call, whole),
        "+ this layer's arrays touched": (flushed(lambda a, o: touch(a)), call, whole),
        "+ another layer's n=64 call": (flushed(lambda a, o: call(*first(o, 64))), call, whole),
        "n=64 warm": (warm(call, block64), call, block64),
        "n=64 after scrub": (flushed(), call, block64),
        "n=8 warm": (warm(call, block8), call, block8),
        "n=8 after scrub": (flushed(), call, block8),
        "dispatch only, warm": (warm(_dispatch_only, whole), _dispatch_only, whole),
        "dispatch only, after scrub": (flushed(), _dispatch_only, whole),
    }
    times = {name: [] for name in cases}
    with torch.inference_mode():
        _dispatch_only(*calls[0])
        for _ in range(args.rounds):
            for name, (before, fn, args_of) in cases.items():
                for i in range(min(8, len(calls))):
                    a, other = calls[i], calls[(i + 11) % len(calls)]
                    before(a, other)
                    t = time.perf_counter()
                    fn(*args_of(a))
                    times[name].append(time.perf_counter() - t)
    print(f"```\npython benchmarks/kvquant_cold_call.py {' '.join(f'--{k} {v}' for k, v in vars(args).items())}\n```\n")
    print(f"KVQuant-3, SmolLM2, context {args.context}, one decode step's layer calls replayed; torch "
          f"{torch.__version__}, {args.rounds} x 8 calls per case\n")
    print("| case | median us | min us |\n|---|---:|---:|")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v) * 1e6:.0f} | {min(v) * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

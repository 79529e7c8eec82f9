"""How much of a decode step is attention, for a method's cache and for transformers' DynamicCache, and how fast the
method's attention would have to be for a decode-speed goal: the budget behind ``decode_speed.py``'s ratios.

For each context: prefill real text into a DynamicCache and into the method's cache, then ``--rounds`` interleaved
bursts of ``--steps`` greedy decode steps, timing inside each step the attention function transformers calls (for
the method: its whole layer step over the compressed parts, the new token's quantization included) and the caches'
``update`` (DynamicCache: the ``torch.cat`` of the new token onto its whole past). ``rest`` = step - attention -
update: the matmuls, norms and Python between them, the same work for both caches (DynamicCache's measures longer at
long context; not attributed further here -- one candidate is its ``torch.cat`` output, the whole past written anew
each step, being written back to memory while the next matmuls read their weights). Printed per context (medians of
the per-burst means, ms per step): both steps and their attention shares, the ratio, the ratio the method would reach
if its attention cost nothing (DynamicCache's step / the method's rest), and the attention time per step that the goal
ratio allows (DynamicCache's step / goal - the method's rest; negative: out of reach even at zero cost).

    python benchmarks/decode_budget.py --method kvquant:bits=3,calibration=auto --contexts 4096 8192 --threads 1

Goals default to #19's (0.95x at 1k, 1.2x at 4k, 1.5x at 8k). Timings only; nothing is checked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcompress import load_model
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec

from decode_speed import decode_burst, prefill  # (this script's folder is on the path when it runs)

GOALS = {1024: 0.95, 4096: 1.2, 8192: 1.5}


def _timed(get, put, spent: dict, key: str) -> None:
    """Replace the callable ``get()`` by a wrapper (installed with ``put``) adding its wall time to ``spent[key]``."""
    real = get()

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start

    put(wrapper)


def _burst(model, state: list, steps: int, spent: dict) -> tuple[float, float, float]:
    """:func:`decode_speed.decode_burst` of ``steps`` steps: the mean (step, attention, update) seconds."""
    spent.clear()
    total = decode_burst(model, state, steps)
    return total / steps, spent["attention"] / steps, spent["update"] / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="kvquant:bits=3,calibration=auto")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--goal", type=float, default=None, help="one goal ratio for every context (default: #19's)")
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype and getattr(torch, args.dtype), progress=False)
    text = torch.tensor(encode(tok, load_text(args.data)))
    spec = parse_spec(args.method)
    spent: dict = defaultdict(float)
    wrapped: set = set()
    _timed(lambda: Cache.update, lambda f: setattr(Cache, "update", f), spent, "update")
    print(f"```\npython benchmarks/decode_budget.py {' '.join(sys.argv[1:])}\n```\n")
    print(f"model {args.model} ({next(model.parameters()).dtype}), torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), {args.steps} decode steps per burst, medians of {args.rounds} interleaved bursts; ms per step\n")
    print("| context | method step | its attention | DynamicCache step | its attention + cat | rest (method / Dyn.) "
          "| ratio | ratio at zero-cost attention | goal | attention the goal allows |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.contexts:
        ids = text[:length].view(1, -1)
        mine, theirs = list(prefill(model, lambda: spec.make(model), ids)), list(prefill(model, DynamicCache, ids))
        name = model.config._attn_implementation  # the method's cache installed kvcompress's function: both use it
        if name not in wrapped:
            wrapped.add(name)
            _timed(lambda: ALL_ATTENTION_FUNCTIONS[name], lambda f: ALL_ATTENTION_FUNCTIONS.__setitem__(name, f), spent,
                   "attention")
        for state in (theirs, mine):  # untimed: the first steps load the decode kernels and grow the buffers
            _burst(model, state, 2, spent)
        rows = {"mine": [], "theirs": []}
        for _ in range(args.rounds):
            rows["theirs"].append(_burst(model, theirs, args.steps, spent))
            rows["mine"].append(_burst(model, mine, args.steps, spent))
        m_step, m_att, m_upd = (statistics.median(col) * 1e3 for col in zip(*rows["mine"]))
        d_step, d_att, d_upd = (statistics.median(col) * 1e3 for col in zip(*rows["theirs"]))
        m_rest, d_rest = m_step - m_att - m_upd, d_step - d_att - d_upd
        goal = args.goal or GOALS.get(length)
        goal_text, allowed = (f"{goal}x", f"{d_step / goal - m_rest:.1f}") if goal else ("-", "-")
        print(f"| {length} | {m_step:.1f} | {m_att + m_upd:.1f} | {d_step:.1f} | {d_att + d_upd:.1f} | "
              f"{m_rest:.1f} / {d_rest:.1f} | {d_step / m_step:.2f}x | {d_step / m_rest:.2f}x | "
              f"{goal_text} | {allowed} |", flush=True)
        if hasattr(mine[0], "close"):
            mine[0].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

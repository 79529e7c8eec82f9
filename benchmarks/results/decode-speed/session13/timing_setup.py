"""Shared setup of the session 13 timing scripts: argv ``SPEC CONTEXT ROUNDS STEPS``, SmolLM2 on one thread, the first
CONTEXT tokens of WikiText-2, ``timed(name, f)``: ``f`` wrapped to add its wall time to ``T[name]``, and
``print_interleaved_pieces``."""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/: decode_speed's prefill / decode_burst

from kvcompress import load_model  # noqa: E402
from kvcompress.data import encode, load_text  # noqa: E402
from kvcompress.evaluate.spec import parse_spec  # noqa: E402

torch.set_num_threads(1)
spec = parse_spec(sys.argv[1])
L, rounds, steps = (int(x) for x in sys.argv[2:5])
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:L].view(1, -1)
T: dict[str, float] = {}


def timed(name, f):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        r = f(*a, **k)
        T[name] = T.get(name, 0.0) + time.perf_counter() - t0
        return r

    return wrapper


def print_interleaved_pieces(decode_burst, dyn: list, ours: list) -> None:
    """``rounds`` interleaved bursts of ``steps`` decode steps, DynamicCache's state ``dyn`` then the method's
    ``ours``; prints the median ms per step of each whole burst and of every ``timed`` piece."""
    res = {}
    for _ in range(rounds):
        T.clear()
        td = decode_burst(model, dyn, steps)
        pieces_dyn = dict(T)
        T.clear()
        to = decode_burst(model, ours, steps)
        for k, v in [("dyn total", td), ("ours total", to), *pieces_dyn.items(), *T.items()]:
            res.setdefault(k, []).append(v / steps * 1e3)
    for k, v in res.items():
        print(f"{k:14s} {statistics.median(v):7.2f} ms/step")

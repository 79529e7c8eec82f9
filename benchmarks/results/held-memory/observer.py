"""Session 14: bytes a KVQuant cache keeps reachable but did not count, after a 1k prompt on SmolLM2 -- the
observer's captured attention inputs, before (kept until the next forward: ``keep=True``) and after the fix (dropped
as each attention module returns). Uses the walker of tests/test_held_memory.py.

    python benchmarks/results/held-memory/observer.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_held_memory import reachable_memory, unheld  # noqa: E402

from kvcompress import load_model, make_cache  # noqa: E402
from kvcompress.compat import cache_kwargs  # noqa: E402
from kvcompress.data import encode, load_text  # noqa: E402
from kvcompress.methods import kvquant_store  # noqa: E402

torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:1024].view(1, -1)
original = kvquant_store.PositionObserver.__init__
for keep in (True, False):
    def init(self, model, cache, keep=keep):
        self._positions = {}
        kvquant_store.Observer.__init__(self, model, cache, keep=keep)
    kvquant_store.PositionObserver.__init__ = init
    with torch.no_grad(), make_cache("kvquant", model, bits=3, calibration="auto") as cache:
        model(ids, **cache_kwargs(model, cache))
        bad = unheld(cache, model)
        skip = {id(model), id(cache.method.calibration)}
        extra = sum(nb for path, ptr, nb, _ in reachable_memory(cache, skip) if path.startswith("cache.observer"))
        print(f"observer keeps inputs: {keep}: counted nbytes() {cache.nbytes() / 2**20:.2f} MiB; reachable, not "
              f"counted: {len(bad)} arrays, observer's {extra / 2**20:.2f} MiB")
kvquant_store.PositionObserver.__init__ = original

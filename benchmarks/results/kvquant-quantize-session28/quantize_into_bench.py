"""KVQuant's quantization of a prompt's tokens (``kvquant_cpu.quantize_into``), as a 1k prefill calls it: the calls of
one prefill of ``TOKENS`` tokens of WikiText-2 (SmolLM2, KVQuant-3 calibrated; 60 calls, a key and a value stream
per layer) are recorded, then replayed for the tree's kernel and for ``KERNEL_FILE`` (another revision's
``kvquant_cpu.py``, e.g. ``git show REV:src/kvcompress/kernels/kvquant_cpu.py > /tmp/old.py``), alternately, and
the fastest of 7 passes printed per stream kind. Every replay writes the same codes into copies of the recorded
buffers; the two kernels' outputs (codes, ranges, outlier counts and entries) are compared first (session 28).

    python benchmarks/results/kvquant-quantize-session28/quantize_into_bench.py KERNEL_FILE [TOKENS]

Compiles into a numba cache directory of its own (a module loaded from a file path cannot be reloaded from numba's
cache)."""
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="quantize-bench-")
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
from kvcompress import kernels, load_model  # noqa: E402
from kvcompress.compat import cache_kwargs  # noqa: E402
from kvcompress.data import encode, load_text  # noqa: E402
from kvcompress.evaluate.spec import parse_spec  # noqa: E402

other_path = sys.argv[1]
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
spec = importlib.util.spec_from_file_location("kvcompress.kernels.kvq_other", other_path)
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text(str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))))[:tokens]
tree = kernels._kvq_cpu.quantize_into
calls = []


def record(*args):
    calls.append(tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args))
    return tree(*args)


kernels._kvq_cpu.quantize_into = record
with torch.inference_mode():
    cache = parse_spec("kvquant:bits=3,calibration=auto").make(model)
    model(input_ids=ids.view(1, -1), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
kernels._kvq_cpu.quantize_into = tree


def fresh(args):
    return tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)


for args in calls[:2]:  # one value and one key stream: the same writes and results
    a, b = fresh(args), fresh(args)
    ra, rb = tree(*a), other.quantize_into(*b)
    same = all(np.array_equal(x, y) for x, y in zip(a, b) if isinstance(x, np.ndarray))
    same = same and ra[:3] == rb[:3] and np.array_equal(ra[3], rb[3]) and np.array_equal(ra[4], rb[4])
    print(f"{'per channel' if args[3] else 'per token'} stream: the same writes and results: {same}")
kinds = {"values (per token)": calls[0::2], "keys (per channel, pre-RoPE)": calls[1::2]}
print(f"\n{len(calls)} calls of {calls[0][0].shape[2]} tokens; ms per call, fastest of 7 passes over the layers\n")
print(f"| stream | {Path(other_path).name} | tree | ratio |\n|---|---:|---:|---:|")
for name, group in kinds.items():
    best = {"other": 1e9, "tree": 1e9}
    for fn in (tree, other.quantize_into):
        fn(*group[0])
    for _ in range(7):
        for key, fn in (("other", other.quantize_into), ("tree", tree)):
            t0 = time.perf_counter()
            for args in group:
                fn(*args)
            best[key] = min(best[key], (time.perf_counter() - t0) / len(group))
    print(f"| {name} | {best['other'] * 1e3:.3f} | {best['tree'] * 1e3:.3f} | {best['other'] / best['tree']:.2f}x |")

"""Session 33: six 2k-token KVQuant-3 prefills into caches that are all kept, with and without glibc's malloc_trim(0)
after each: seconds per prefill (with the trim), system seconds, the resident set at the end.

    python benchmarks/results/held-memory/trim_cost.py 0   # no trim
    python benchmarks/results/held-memory/trim_cost.py 1   # malloc_trim(0) after each prefill
"""
import ctypes, resource, statistics, sys, time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for decode_speed
from decode_speed import prefill
from kvcompress import load_model
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:2048].view(1, -1)
spec = parse_spec("kvquant:bits=3,calibration=auto"); trim = sys.argv[1] == "1"; libc = ctypes.CDLL("libc.so.6")
held, times, sys_t = [], [], []
for i in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    c, _ = prefill(model, lambda: spec.make(model), ids)
    if trim: libc.malloc_trim(0)
    times.append(time.perf_counter() - t0); sys_t.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime); held.append(c)
rss = int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20
print(f"malloc_trim after each: {trim}: prefill+trim s {[round(t, 2) for t in times]} (median of the last 5: {statistics.median(times[1:]):.2f}); system s {[round(t, 2) for t in sys_t]}; resident {rss} MiB with 6 caches kept")

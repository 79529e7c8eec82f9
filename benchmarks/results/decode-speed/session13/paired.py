"""Session 13: paired in-process A/B of KIVI's one-call decode step vs the parts path before it.

    python benchmarks/results/decode-speed/session13/paired.py kivi:bits=4 1024 15 8   # spec, context, rounds, steps
"""
import sys, copy, statistics, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from decode_speed import prefill, decode_burst
from transformers import DynamicCache
from kvcompress import load_model
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
from kvcompress.methods.kivi import KiviStore
from kvcompress.attention import attend_parts
torch.set_num_threads(1)
spec = parse_spec(sys.argv[1]); L = int(sys.argv[2]); rounds = int(sys.argv[3]); steps = int(sys.argv[4])
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("../shared/data/wikitext-2-raw/wiki.test.raw")))[:L].view(1, -1)
fast = KiviStore.decode_step
def via_parts(self, query, scaling):
    return attend_parts(query, self.parts(fused=True), scaling).output
dyn = list(prefill(model, DynamicCache, ids))
a = list(prefill(model, lambda: spec.make(model), ids))
b = list(prefill(model, lambda: spec.make(model), ids))
r_new, r_old, r_no = [], [], []
for i in range(rounds):
    td = decode_burst(model, dyn, steps)
    KiviStore.decode_step = fast; tn = decode_burst(model, a, steps)
    KiviStore.decode_step = via_parts; to = decode_burst(model, b, steps)
    r_new.append(td / tn); r_old.append(td / to); r_no.append(to / tn)
    print(f"round {i}: dyn {td/steps*1e3:.1f} ms  one-call {tn/steps*1e3:.1f} ms  parts {to/steps*1e3:.1f} ms", flush=True)
KiviStore.decode_step = fast
print(f"median: one-call vs DynamicCache {statistics.median(r_new):.3f}x, parts vs DynamicCache {statistics.median(r_old):.3f}x, "
      f"parts time / one-call time {statistics.median(r_no):.3f}")

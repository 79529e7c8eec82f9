"""Replay the quantize_uniform calls of one prefill (and of a few decode steps) of KIVI-4, KIVI-2 and LogQuant-2 on
SmolLM2, through the one-call numba path and through the torch path, alternately; check that both give the same codes
and statistics first (the zero point's sign aside where it is a zero).

    python benchmarks/results/uniform-quantize-session29/quantize_uniform_bench.py [TOKENS] [STEPS]
"""

import statistics
import sys
import time

import torch

from kvcompress import load_model
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
from kvcompress.methods import kivi, logquant
from kvcompress.quant import uniform

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("pydoc")))[:tokens].view(1, -1)


def record(spec_text):
    """The (x, bits, axis, group) of every quantize_uniform call of one prefill and ``steps`` decode steps."""
    calls = {"prefill": [], "decode": []}
    phase = ["prefill"]
    real = uniform.quantize_uniform

    def spy(x, bits, axis, group_size=None):
        calls[phase[0]].append((x.clone(), bits, axis, group_size))
        return real(x, bits, axis, group_size)

    kivi.quantize_uniform = logquant.quantize_uniform = spy
    try:
        spec = parse_spec(spec_text)
        cache = spec.make(model)
        with torch.inference_mode():
            out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            nxt = out.logits[0, -1].argmax().view(1, 1)
            phase[0] = "decode"
            for _ in range(steps):
                nxt = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[0, -1].argmax().view(1, 1)
            cache.memory_report()  # settles a deferred value queue
    finally:
        kivi.quantize_uniform = logquant.quantize_uniform = real
    return calls


def run(calls, numba):
    uniform.NUMBA_QUANTIZE = numba
    try:
        return [uniform.quantize_uniform(*c) for c in calls]
    finally:
        uniform.NUMBA_QUANTIZE = True


def same(a, b):
    return (torch.equal(a.packed, b.packed) and torch.equal(a.scale.view(torch.int16), b.scale.view(torch.int16))
            and torch.equal(a.zero.float(), b.zero.float()))


print("```\npython benchmarks/results/uniform-quantize-session29/quantize_uniform_bench.py " + " ".join(sys.argv[1:]) + "\n```\n")
print(f"{tokens}-token prompt (pydoc text), then {steps} decode steps; ms per prefill / per decode step, summed over the "
      "calls, fastest of 7 alternated passes; torch {}, 1 thread\n".format(torch.__version__))
print("| method | phase | calls | torch path ms | numba path ms | ratio | same codes and statistics |")
print("|---|---|---:|---:|---:|---:|---|")
for spec_text in ("kivi:bits=4", "kivi:bits=2", "logquant"):
    recorded = record(spec_text)
    for phase, calls in recorded.items():
        if not calls:
            continue
        ok = all(same(a, b) for a, b in zip(run(calls, True), run(calls, False)))
        times = {True: [], False: []}
        for _ in range(7):
            for numba in (False, True):
                t0 = time.perf_counter()
                run(calls, numba)
                times[numba].append(time.perf_counter() - t0)
        per = 1 if phase == "prefill" else steps
        slow, fast = min(times[False]) / per * 1e3, min(times[True]) / per * 1e3
        print(f"| `{spec_text}` | {phase} | {len(calls)} | {slow:.2f} | {fast:.2f} | {slow / fast:.2f}x | {ok} |",
              flush=True)

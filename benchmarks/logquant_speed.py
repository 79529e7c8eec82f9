"""Decode tokens/s of LogQuant vs KIVI (and the full cache) at 2k and 4k context on SmolLM2, interleaved.

    nice -n 5 python benchmarks/logquant_speed.py --contexts 2048 4096 --steps 32 --repeats 3

Each round times every method back to back on the same prompt (fresh cache: prefill, then ``steps`` greedy
decode steps), rotating the order per round; reported: median decode tokens/s per method, the median per-round
ratio LogQuant / KIVI, and the stored bytes of each cache after decoding. The machine is shared: only the
interleaved ratios mean anything.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from kvcompress import load_model
from kvcompress.data import encode, load_text
from kvcompress.evaluate.spec import parse_spec
from kvcompress.evaluate.speed import time_run

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--logquant", default="logquant:bits=2,window=42,key_axis=channel")
    p.add_argument("--kivi-residual", default="2048:96,4096:32", help="context:residual pairs (byte-matched to LogQuant-2 channel)")
    p.add_argument("--data", default=str(WIKI))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    residual = dict(tuple(int(x) for x in pair.split(":")) for pair in args.kivi_residual.split(","))
    model, tok = load_model("smollm2-135m", progress=False)
    ids_all = torch.tensor(encode(tok, load_text(args.data)))
    print(f"| context | method | stored bytes | decode tok/s (median) | vs full | LogQuant / KIVI |")
    print("|---:|---|---:|---:|---:|---:|")
    for ctx in args.contexts:
        ids = ids_all[10_000 : 10_000 + ctx].view(1, -1)
        specs = {"full": parse_spec("full"), "logquant": parse_spec(args.logquant),
                 "kivi": parse_spec(f"kivi:bits=2,residual={residual.get(ctx, 128)}")}
        runs = {name: [] for name in specs}
        names = list(specs)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                runs[name].append(time_run(model, specs[name], ids, args.steps))
        tps = {n: statistics.median(x["decode_tokens_per_s"] for x in runs[n]) for n in names}
        lq_vs_kivi = statistics.median(a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                       for a, b in zip(runs["logquant"], runs["kivi"]))
        for n in names:
            ratio = f"{lq_vs_kivi:.2f}" if n == "logquant" else ""
            print(f"| {ctx} | {specs[n].label} | {runs[n][-1]['stored_bytes_end']:,} | {tps[n]:.1f} | "
                  f"{tps[n] / tps['full']:.2f} | {ratio} |", flush=True)

if __name__ == "__main__":
    main()

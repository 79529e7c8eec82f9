"""MiniCache: share of tokens retained exactly per merged layer pair, on a real model.

    python benchmarks/minicache_retention.py --spec "gamma=0.05" --windows 2

Per window (WikiText-2, the windows ``kvcompress eval`` draws with the same seed): prefill P tokens through a
minicache cache, then feed C tokens one at a time; prints per layer pair the share of entries kept exactly after P
and after P + C, and the share a literal reading of the rule ("normalized distance > gamma") would keep.
Perplexity, KL, bytes and the needle of any minicache setting come from ``kvcompress eval`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse

import torch

from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text, windows_from_ids

WIKI = "../shared/data/wikitext-2-raw/wiki.test.raw"


def _windows(tok, args) -> torch.Tensor:
    ids = torch.tensor(encode(tok, load_text(args.data)), dtype=torch.long)
    return windows_from_ids(ids, args.prompt_len + args.cont_len, args.windows, args.seed)


@torch.inference_mode()
def main_retention(args) -> None:
    from kvcompress import load_model, make_cache
    from kvcompress.cli import parse_options
    from kvcompress.methods.minicache import angular_distance, retained_fractions, unit
    from kvcompress.profiles.layers import capture_kv

    model, tok = load_model(args.model, progress=False)
    opts = parse_options([p for p in args.spec.split(",") if p])
    windows = _windows(tok, args)
    gamma = opts.get("gamma", 0.05)
    rows: dict = {}
    for w in windows:
        ids = w.view(1, -1)
        with make_cache("minicache", model, **opts) as cache:
            model(input_ids=ids[:, : args.prompt_len], **cache_kwargs(model, cache), logits_to_keep=1)
            after_prefill = retained_fractions(cache)
            for t in range(args.prompt_len, ids.shape[1] - 1):
                model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache))
            after_decode = retained_fractions(cache)
        kv = capture_kv(model, ids[:, : args.prompt_len])
        for a, b in after_prefill:
            literal = None
            for xa, xb in ((kv[a][0], kv[b][0]), (kv[a][1], kv[b][1])):
                d = angular_distance(unit(xa)[1], unit(xb)[1])
                lo, hi = d.amin(-1, keepdim=True), d.amax(-1, keepdim=True)
                over = (d - lo) / (hi - lo) > gamma
                literal = over if literal is None else literal | over
            r = rows.setdefault((a, b), [0.0, 0.0, 0.0])
            r[0] += after_prefill[(a, b)] / len(windows)
            r[1] += after_decode[(a, b)] / len(windows)
            r[2] += float(literal.double().mean()) / len(windows)
    print(f"minicache {opts} on {args.model}: P={args.prompt_len}, C={args.cont_len}, {len(windows)} windows")
    print(f"\n| pair | retained after P | retained after P+C | literal reading (norm. distance > {gamma}) |")
    print("|---|---:|---:|---:|")
    for (a, b), (p, pc, lit) in sorted(rows.items()):
        print(f"| {a}-{b} | {100 * p:.2f} % | {100 * pc:.2f} % | {100 * lit:.1f} % |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=WIKI)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--cont-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--spec", default="", help="minicache options, e.g. 'gamma=0.05'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    main_retention(args)


if __name__ == "__main__":
    main()

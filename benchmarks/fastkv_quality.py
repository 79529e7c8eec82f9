"""FastKV quality vs SnapKV at the same KV budget and vs the full cache: needle (query-aware) and
compressed-context perplexity / KL, with the protocol of ``kvcompress.evaluate`` (same task builders and
per-task functions), written one JSON line per (task, method) so that a long run on a shared machine can be
resumed where it stopped.

    python benchmarks/fastkv_quality.py needle --out R/needle.jsonl --methods full "snapkv:budget=0.1" "fastkv:budget=0.1"
    python benchmarks/fastkv_quality.py ppl --out R/ppl.jsonl --methods full "fastkv:budget=0.1"
    python benchmarks/fastkv_quality.py table R/needle.jsonl R/ppl.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["task"], r["spec"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_needle(args, model, tok, specs) -> None:
    from kvcompress.data import make_needle_tasks
    from kvcompress.evaluate.needle import run_task

    out, done = Path(args.out), _done(Path(args.out))
    for n in args.lengths:
        tasks = make_needle_tasks(tok, args.haystack, n, args.depths, args.per_depth, seed=args.seed)
        for i, task in enumerate(tasks):
            for spec in specs:
                key = f"{n}/{i}"
                if (key, spec.label) in done:
                    continue
                r = run_task(model, tok, spec, task, "aware", args.tokens)
                _append(out, {"task": key, "spec": spec.label, **r})
                print(f"{key} {spec.label:28s} hit={r['hit']} {r['generated']!r}", flush=True)


def run_ppl(args, model, tok, specs) -> None:
    from kvcompress.data import load_text, token_windows
    from kvcompress.evaluate.ppl import compare, teacher_force

    out, done = Path(args.out), _done(Path(args.out))
    windows = token_windows(tok, load_text(args.data), args.prompt_len + args.cont_len, args.windows, seed=args.seed)
    ref_spec = next(s for s in specs if s.name == "full")
    for i, window in enumerate(windows):
        with ref_spec.make(model) as cache:
            ref = teacher_force(model, cache, window, args.prompt_len).logprobs
        for spec in specs:
            if (str(i), spec.label) in done:
                continue
            with spec.make(model) as cache:
                got = teacher_force(model, cache, window, args.prompt_len)
            row = compare(ref, got.logprobs, window[args.prompt_len :])
            row["bytes_ratio"] = got.memory_prefill.ratio
            _append(out, {"task": str(i), "spec": spec.label, **row})
            print(f"window {i} {spec.label:28s} nll/tok={row['nll_sum'] / row['tokens']:.4f} "
                  f"kl={row['kl_sum'] / row['tokens']:.4f}", flush=True)


def table(paths: list[str]) -> None:
    rows: dict = defaultdict(lambda: defaultdict(list))
    for p in paths:
        for r in map(json.loads, Path(p).read_text().splitlines()):
            rows[r["spec"]]["hit" if "hit" in r else "ppl"].append(r)
    print("| method | needle hits (aware) | needle acc | ppl | dppl % | KL | top-1 agree | KV bytes ratio |")
    print("|---|---|---|---|---|---|---|---|")
    full_ppl = None
    for spec, got in rows.items():
        ppl = got["ppl"]
        if ppl:
            tokens = sum(r["tokens"] for r in ppl)
            val = math.exp(sum(r["nll_sum"] for r in ppl) / tokens)
            full_ppl = val if spec == "full" else full_ppl
    for spec, got in rows.items():
        hits, ppl = got["hit"], got["ppl"]
        acc = f"{sum(r['hit'] for r in hits)}/{len(hits)}" if hits else "-"
        pct = f"{100 * sum(r['hit'] for r in hits) / len(hits):.0f} %" if hits else "-"
        if ppl:
            tokens = sum(r["tokens"] for r in ppl)
            val = math.exp(sum(r["nll_sum"] for r in ppl) / tokens)
            d = f"{100 * (val / full_ppl - 1):+.1f}" if full_ppl else "-"
            kl = f"{sum(r['kl_sum'] for r in ppl) / tokens:.4f}"
            agree = f"{sum(r['agree'] for r in ppl) / tokens:.3f}"
            ratio = f"{ppl[0]['bytes_ratio']:.2f}x"
            print(f"| {spec} | {acc} | {pct} | {val:.3f} | {d} | {kl} | {agree} | {ratio} |")
        else:
            ratio = f"{sum(r['bytes_ratio'] for r in hits) / len(hits):.2f}x" if hits else "-"
            print(f"| {spec} | {acc} | {pct} | - | - | - | - | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["needle", "ppl", "table"])
    p.add_argument("files", nargs="*", help="for 'table': the JSON-lines files")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["full", "snapkv:budget=0.1", "fastkv:budget=0.1"])
    p.add_argument("--out", default="fastkv_quality.jsonl")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--per-depth", type=int, default=2)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--haystack", default="../shared/data/paul-graham-essays")
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--cont-len", type=int, default=64)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.what == "table":
        table(args.files)
        return
    from kvcompress import load_model
    from kvcompress.evaluate.spec import parse_spec, validate_specs

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, progress=False)
    specs = [parse_spec(m) for m in args.methods]
    validate_specs(specs, model)
    (run_needle if args.what == "needle" else run_ppl)(args, model, tok, specs)


if __name__ == "__main__":
    main()

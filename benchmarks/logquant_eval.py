"""LogQuant vs KIVI on SmolLM2 with the evaluation harness's own protocol, checkpointed (resumable).

    nice -n 5 python benchmarks/logquant_eval.py ppl --data wiki --log results/lq/wiki.jsonl
    nice -n 5 python benchmarks/logquant_eval.py ppl --data code --log results/lq/code.jsonl
    nice -n 5 python benchmarks/logquant_eval.py needle --log results/lq/needle.jsonl
    python benchmarks/logquant_eval.py table results/lq/wiki.jsonl

Same windows, tasks and functions as ``kvcompress eval`` (``windows_from_ids``, ``ppl.teacher_force`` /
``compare`` / ``summarize``, ``make_needle_tasks``, ``needle.run_task``; seed 0), but every finished window or
needle task is appended to a JSONL log at once, and a rerun skips what is logged — the shared machine kills
long jobs. ``code`` = the standard library's own top-level ``.py`` files, sorted and concatenated.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch

from kvcompress import load_model
from kvcompress.data import encode, load_text, make_needle_tasks, windows_from_ids
from kvcompress.evaluate import needle as _needle
from kvcompress.evaluate import ppl as _ppl
from kvcompress.evaluate.spec import parse_spec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECS = ["full", "logquant:bits=2,key_axis=token", "logquant:bits=2,key_axis=channel", "kivi:bits=2,residual=96"]
NEEDLE_SPECS = SPECS[:3] + ["kivi:bits=2,residual=64", "kivi:bits=2,residual=96"]


def stdlib_code() -> str:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def _done(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _append(log: Path, record: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_ppl(args, model, tok) -> None:
    text = load_text(SHARED / "wikitext-2-raw" / "wiki.test.raw") if args.data == "wiki" else stdlib_code()
    ids = torch.tensor(encode(tok, text), dtype=torch.long)
    windows = windows_from_ids(ids, args.prompt_len + args.cont_len, args.windows, 0)
    done = {(r["window"], r["spec"]) for r in _done(args.log)}
    for w, window in enumerate(windows):
        todo = [s for s in args.specs if (w, s) not in done]
        if not todo:
            continue
        targets = window[args.prompt_len :]
        ref = None
        for label in ["full"] + [s for s in todo if s != "full"]:
            spec = parse_spec(label)
            torch.manual_seed(0)
            with spec.make(model) as cache:
                got = _ppl.teacher_force(model, cache, window, args.prompt_len)
            ref = got if label == "full" else ref
            if label in todo:
                rec = _ppl.compare(ref.logprobs, got.logprobs, targets)
                rec.update(window=w, spec=label, bytes_prefill=got.memory_prefill.stored_bytes,
                           bytes_end=got.memory_end.stored_bytes, ref_bytes_prefill=got.memory_prefill.reference_bytes,
                           ref_bytes_end=got.memory_end.reference_bytes)
                _append(args.log, rec)
                print(f"window {w} {label}: nll {rec['nll_sum'] / rec['tokens']:.4f}", flush=True)


def run_needle(args, model, tok) -> None:
    tasks = make_needle_tasks(tok, load_text(SHARED / "paul-graham-essays"), args.context, args.depths, args.per_depth, 0)
    done = {(r["task"], r["mode"], r["spec"]) for r in _done(args.log)}
    for i, task in enumerate(tasks):
        for mode in ("aware", "agnostic"):
            for label in args.specs:
                if (i, mode, label) in done:
                    continue
                torch.manual_seed(0)
                rec = _needle.run_task(model, tok, parse_spec(label), task, mode, 12)
                _append(args.log, {"task": i, "spec": label} | rec)
                print(f"task {i} {mode} {label}: hit={rec['hit']} {rec['generated']!r}", flush=True)


def table(log: Path) -> str:
    recs = _done(log)
    if recs and "window" in recs[0]:
        specs = list(dict.fromkeys(r["spec"] for r in recs))
        by = {s: [r for r in recs if r["spec"] == s] for s in specs}
        ref_nll = sum(r["nll_sum"] for r in by["full"]) / sum(r["tokens"] for r in by["full"])
        lines = ["| method | stored bytes @P | @P+C | ratio @P | ppl | Δppl % | KL | top-1 agree | windows |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in specs:
            rs = by[s]
            n = sum(r["tokens"] for r in rs)
            nll = sum(r["nll_sum"] for r in rs) / n
            bp = sum(r["bytes_prefill"] for r in rs) / len(rs)
            be = sum(r["bytes_end"] for r in rs) / len(rs)
            ratio = sum(r["ref_bytes_prefill"] for r in rs) / sum(r["bytes_prefill"] for r in rs)
            lines.append(f"| {s} | {bp:,.0f} | {be:,.0f} | {ratio:.2f}x | {torch.tensor(nll).exp():.3f} | "
                         f"{100 * (torch.tensor(nll - ref_nll).exp() - 1):+.2f} | {sum(r['kl_sum'] for r in rs) / n:.4f} | "
                         f"{100 * sum(r['agree'] for r in rs) / n:.1f} % | {len(rs)} |")
        return "\n".join(lines)
    specs = list(dict.fromkeys(r["spec"] for r in recs))
    lines = ["| method | aware | agnostic |", "|---|---:|---:|"]
    for s in specs:
        cell = []
        for mode in ("aware", "agnostic"):
            rs = [r for r in recs if r["spec"] == s and r["mode"] == mode]
            cell.append(f"{sum(r['hit'] for r in rs)}/{len(rs)}")
        lines.append(f"| {s} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("ppl")
    q.add_argument("--data", choices=["wiki", "code"], required=True)
    q.add_argument("--prompt-len", type=int, default=1024)
    q.add_argument("--cont-len", type=int, default=128)
    q.add_argument("--windows", type=int, default=4)
    q.add_argument("--specs", nargs="+", default=SPECS)
    q.add_argument("--log", type=Path, required=True)
    n = sub.add_parser("needle")
    n.add_argument("--context", type=int, default=2048)
    n.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    n.add_argument("--per-depth", type=int, default=2)
    n.add_argument("--specs", nargs="+", default=NEEDLE_SPECS)
    n.add_argument("--log", type=Path, required=True)
    t = sub.add_parser("table")
    t.add_argument("log", type=Path)
    for sp in (q, n):
        sp.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.cmd == "table":
        print(table(args.log))
        return
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", progress=False)
    (run_ppl if args.cmd == "ppl" else run_needle)(args, model, tok)
    print(table(args.log))


if __name__ == "__main__":
    main()

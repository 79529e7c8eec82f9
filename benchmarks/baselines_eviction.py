"""Resumable run of the evaluation protocol for the eviction baselines (streaming, h2o, snapkv).

Same building blocks and windows as ``kvcompress eval`` (kvcompress.evaluate), but every (method, window) and
(method, needle task) result is appended to a JSONL log as soon as it exists, so an interrupted run resumes
where it stopped (the shared machine kills long jobs now and then). ``summary`` prints the Markdown table.

    python benchmarks/baselines_eviction.py run --log results/baselines-eviction.jsonl
    python benchmarks/baselines_eviction.py summary --log results/baselines-eviction.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvcompress import load_model
from kvcompress.data import encode, load_text, make_needle_tasks, windows_from_ids
from kvcompress.evaluate import needle as _needle
from kvcompress.evaluate import ppl as _ppl
from kvcompress.evaluate.spec import parse_spec

METHODS = [
    "full",
    "streaming:budget=0.2",
    "h2o",
    "snapkv:budget=0.2",
    "snapkv:budget=0.2,storage=kivi,bits=2",
    "streaming:budget=0.5",
    "h2o:heavy=0.25,recent=0.25",
    "snapkv:budget=0.5",
]


def load_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run(args) -> None:
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["part"], r["spec"], r["item"]) for r in load_log(log)}
    model, tok = load_model(args.model, progress=False)
    specs = [parse_spec(m) for m in args.methods]
    ids = torch.tensor(encode(tok, load_text(args.data)), dtype=torch.long)
    windows = windows_from_ids(ids, args.prompt_len + args.cont_len, args.windows, args.seed)
    ref_dir = log.with_suffix(".ref")
    ref_dir.mkdir(exist_ok=True)
    for w, window in enumerate(windows):
        ref_file = ref_dir / f"P{args.prompt_len}-C{args.cont_len}-w{w}.pt"
        for s in specs:
            if ("ppl", s.label, w) in done:
                continue
            if s.name != "full" and not ref_file.exists():
                raise SystemExit("put 'full' first in --methods")
            torch.manual_seed(args.seed)
            with s.make(model) as cache:
                got = _ppl.teacher_force(model, cache, window, args.prompt_len)
            if s.name == "full":
                torch.save(got.logprobs, ref_file)
            ref = torch.load(ref_file)
            row = _ppl.compare(ref, got.logprobs, window[args.prompt_len :])
            row.update(part="ppl", spec=s.label, item=w, ratio_prefill=got.memory_prefill.ratio,
                       ratio_end=got.memory_end.ratio)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)
    if args.needle:
        haystack = load_text(args.needle_dir)
        tasks = [t for n in args.needle for t in make_needle_tasks(tok, haystack, n, args.depths, 1, args.seed)]
        for i, task in enumerate(tasks):
            for mode in ("aware", "agnostic"):
                for s in specs:
                    if ("needle", s.label, f"{i}-{mode}") in done:
                        continue
                    torch.manual_seed(args.seed)
                    row = _needle.run_task(model, tok, s, task, mode, 12)
                    row.update(part="needle", spec=s.label, item=f"{i}-{mode}")
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(row, flush=True)


def summary(args) -> None:
    rows = load_log(Path(args.log))
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    print("| method | bytes ratio @P | bytes ratio @P+C | ppl | Δppl % | KL | top-1 agree | needle aware 1k/2k | "
          "needle agnostic 1k/2k |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref_ppl = None
    for s in specs:
        ppl = [r for r in rows if r["spec"] == s and r["part"] == "ppl"]
        summ = _ppl.summarize(ppl) if ppl else None
        if s == "full" and summ:
            ref_ppl = summ["ppl"]
        needle = [r for r in rows if r["spec"] == s and r["part"] == "needle"]

        def acc(mode):
            out = []
            for n in sorted({r["context_len"] for r in needle}):
                hits = [r["hit"] for r in needle if r["mode"] == mode and r["context_len"] == n]
                out.append(f"{sum(hits)}/{len(hits)}")
            return " · ".join(out) or "-"

        if summ:
            rp = sum(r["ratio_prefill"] for r in ppl) / len(ppl)
            re_ = sum(r["ratio_end"] for r in ppl) / len(ppl)
            d = 100 * (summ["ppl"] / ref_ppl - 1) if ref_ppl else float("nan")
            cells = [f"{rp:.2f}x", f"{re_:.2f}x", f"{summ['ppl']:.3f}", f"{d:+.2f}", f"{summ['kl']:.4f}",
                     f"{100 * summ['agreement']:.1f} %"]
        else:
            cells = ["-"] * 6
        print(f"| {s} | " + " | ".join(cells) + f" | {acc('aware')} | {acc('agnostic')} |")
    n_win = len({r["item"] for r in rows if r["part"] == "ppl"})
    print(f"\n{n_win} ppl windows; needle counts are hits/tasks per context length.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--log", required=True)
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--methods", nargs="+", default=METHODS)
    r.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    r.add_argument("--prompt-len", type=int, default=1024)
    r.add_argument("--cont-len", type=int, default=128)
    r.add_argument("--windows", type=int, default=2)
    r.add_argument("--needle", type=int, nargs="*", default=[1024, 2048])
    r.add_argument("--needle-dir", default="../shared/data/paul-graham-essays")
    r.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summary")
    s.add_argument("--log", required=True)
    args = p.parse_args()
    run(args) if args.cmd == "run" else summary(args)


if __name__ == "__main__":
    main()

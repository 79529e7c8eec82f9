"""MiniCache measurements on a real model (results in benchmarks/results/minicache.md).

Same protocol and code as ``kvcompress eval`` (kvcompress.evaluate.ppl: P prompt tokens compressed, C tokens
teacher-forced one at a time, NLL / KL / top-1 agreement over the C; windows drawn by kvcompress.data with the
same seed), but resumable on a shared machine: the full-cache reference log-probs of each window and every
(spec, window) result are saved under --work as soon as they are done, and each spec's pooled result goes to its
own JSON under --out (a killed run loses one window of one spec).

    # perplexity rows (add specs freely; done ones are skipped)
    nice -n 5 python benchmarks/minicache_sweep.py ppl --out benchmarks/results/minicache_runs/ppl \\
        --specs minicache "minicache:merge=average" "kivi:bits=4" "minicache:storage=kivi,bits=4"
    # table (Markdown) + ratio-vs-Δppl plot (one line per start layer S, points labelled with gamma)
    python benchmarks/minicache_sweep.py report --out benchmarks/results/minicache_runs/ppl
    # share of merged entries kept exactly per layer pair (after P, after P + C) and the share the literal
    # reading of the rule (normalized distance > gamma) would keep
    nice -n 5 python benchmarks/minicache_sweep.py retention --spec "gamma=0.05"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

WIKI = "../shared/data/wikitext-2-raw/wiki.test.raw"


def _windows(tok, args) -> torch.Tensor:
    from kvcompress.data import encode, load_text, windows_from_ids

    ids = torch.tensor(encode(tok, load_text(args.data)), dtype=torch.long)
    return windows_from_ids(ids, args.prompt_len + args.cont_len, args.windows, args.seed)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)[:80] + "-" + hashlib.sha1(label.encode()).hexdigest()[:6]


def _atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename: a killed run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _mem(report) -> dict:
    return {"stored": report.stored_bytes, "reference": report.reference_bytes, "peak": report.peak_transient_bytes}


def _pool(mems: list[dict]) -> dict:
    stored, ref = sum(m["stored"] for m in mems), sum(m["reference"] for m in mems)
    return {"stored_bytes": stored / len(mems), "reference_bytes": ref / len(mems), "ratio": ref / stored,
            "peak_transient_bytes": max(m["peak"] for m in mems)}


@torch.inference_mode()
def ppl(args) -> None:
    """Unit of work = (spec, window): each is saved as soon as it is done, then pooled per spec."""
    from kvcompress import load_model
    from kvcompress.evaluate import ppl as P
    from kvcompress.evaluate.spec import parse_spec
    from kvcompress.methods.minicache import retained_fractions

    model, tok = load_model(args.model, progress=False)
    specs = [parse_spec(s) for s in args.specs]
    for s in specs:  # bad options fail before any work
        with s.make(model):
            pass
    windows = _windows(tok, args)
    out = Path(args.out)
    work = Path(args.work) / f"{args.model}-P{args.prompt_len}-C{args.cont_len}-n{args.windows}-s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    def reference(i: int) -> torch.Tensor:
        path = work / f"ref-{i}.pt"
        if not path.exists():
            with parse_spec("full").make(model) as cache:
                logprobs = P.teacher_force(model, cache, windows[i], args.prompt_len).logprobs
            _atomic(path, lambda tmp: torch.save(logprobs, tmp))
        return torch.load(path)

    ref_rows = [P.compare(reference(i), reference(i), w[args.prompt_len:]) for i, w in enumerate(windows)]
    ref_ppl = P.summarize(ref_rows)["ppl"]
    for s in specs:
        path = out / f"{_slug(s.label)}.json"
        if path.exists():
            continue
        parts = []
        for i, w in enumerate(windows):
            part = work / f"{_slug(s.label)}-w{i}.json"
            if not part.exists():
                torch.manual_seed(args.seed)
                t0 = time.perf_counter()
                with s.make(model) as cache:
                    got = P.teacher_force(model, cache, w, args.prompt_len)
                    kept = retained_fractions(cache) if s.name == "minicache" else {}
                row = {"compare": P.compare(reference(i), got.logprobs, w[args.prompt_len:]),
                       "prefill": _mem(got.memory_prefill), "end": _mem(got.memory_end),
                       "retained": {f"{a}-{b}": f for (a, b), f in kept.items()},
                       "seconds": time.perf_counter() - t0}
                _atomic(part, lambda tmp: tmp.write_text(json.dumps(row)))
            parts.append(json.loads(part.read_text()))
        with s.make(model) as cache:  # the options as resolved for this model (start_layer=None -> L // 2)
            resolved = {"start_layer": getattr(cache.method, "start_layer", None), "layers": cache.geometry.num_layers}
        summary = P.summarize([p["compare"] for p in parts])
        summary["dppl_pct"] = 100.0 * (summary["ppl"] / ref_ppl - 1.0)
        kept = [p["retained"] for p in parts]
        result = {
            "spec": s.label, "method": s.name, "options": s.kwargs, "resolved": resolved, "model": args.model,
            "data": args.data,
            "prompt_len": args.prompt_len, "cont_len": args.cont_len, "windows": args.windows, "seed": args.seed,
            "ref_ppl": ref_ppl, "ppl": summary,
            "memory": {"after_prefill": _pool([p["prefill"] for p in parts]),
                       "after_decode": _pool([p["end"] for p in parts])},
            "retained_after_decode": {k: sum(r[k] for r in kept) / len(kept) for k in kept[0]},
            "seconds": sum(p["seconds"] for p in parts), "command": " ".join(sys.argv),
        }
        _atomic(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        print(f"{s.label}: ratio {result['memory']['after_decode']['ratio']:.3f}x, ppl {summary['ppl']:.3f} "
              f"({summary['dppl_pct']:+.2f} %), KL {summary['kl']:.4f}", flush=True)


def _load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def report(args) -> None:
    rows = _load(Path(args.out))
    if not rows:
        sys.exit(f"no results under {args.out}")
    r0 = rows[0]
    print(f"{r0['model']}, {r0['data']}, P = {r0['prompt_len']}, C = {r0['cont_len']}, {r0['windows']} windows; "
          f"full-cache ppl {r0['ref_ppl']:.3f}\n")
    print("| spec | ratio @P | ratio @P+C | ppl | Δppl % | KL | top-1 agree | retained (mean over pairs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: r["spec"]):
        kept = list(r["retained_after_decode"].values())
        ret = f"{100 * sum(kept) / len(kept):.2f} %" if kept else "-"
        p, m = r["ppl"], r["memory"]
        print(f"| {r['spec']} | {m['after_prefill']['ratio']:.3f}x | {m['after_decode']['ratio']:.3f}x | "
              f"{p['ppl']:.3f} | {p['dppl_pct']:+.2f} | {p['kl']:.4f} | {100 * p['agreement']:.1f} % | {ret} |")
    plot(rows, Path(args.out) / "sweep.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    for r in rows:
        if r["method"] != "minicache":
            continue
        o = r["options"]
        key = f"S={r['resolved']['start_layer']}" + "".join(f", {k}={v}" for k, v in sorted(o.items())
                                                             if k not in ("start_layer", "gamma"))
        lines.setdefault(key, []).append((r["memory"]["after_decode"]["ratio"], r["ppl"]["dppl_pct"],
                                          o.get("gamma", 0.05)))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for key, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=key)
        for x, y, g in pts:
            ax.annotate(f"γ={g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    r0 = rows[0]
    ax.set_xlabel("stored-bytes ratio vs fp16 after P + C tokens")
    ax.set_ylabel("Δ perplexity vs full cache (%)")
    ax.set_yscale("log")
    ax.set_title(f"MiniCache on {r0['model']}: P={r0['prompt_len']}, C={r0['cont_len']}, {r0['windows']} windows",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"\nwrote {path}")


@torch.inference_mode()
def retention(args) -> None:
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
            model(input_ids=ids[:, : args.prompt_len], past_key_values=cache, logits_to_keep=1)
            after_prefill = retained_fractions(cache)
            for t in range(args.prompt_len, ids.shape[1] - 1):
                model(input_ids=ids[:, t : t + 1], past_key_values=cache)
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
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("ppl", "retention"):
        q = sub.add_parser(name)
        q.add_argument("--model", default="smollm2-135m")
        q.add_argument("--data", default=WIKI)
        q.add_argument("--prompt-len", type=int, default=1024)
        q.add_argument("--cont-len", type=int, default=256)
        q.add_argument("--windows", type=int, default=4)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=1)
    sub.choices["ppl"].add_argument("--specs", nargs="+", required=True, help="method specs name[:opt=value,...]")
    sub.choices["ppl"].add_argument("--out", required=True, help="one JSON per spec")
    sub.choices["ppl"].add_argument("--work", default="/tmp/minicache-ref", help="cached full-cache log-probs")
    sub.choices["retention"].add_argument("--spec", default="", help="minicache options, e.g. 'gamma=0.05'")
    q = sub.add_parser("report")
    q.add_argument("--out", required=True)
    args = p.parse_args()
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    {"ppl": ppl, "report": report, "retention": retention}[args.cmd](args)


if __name__ == "__main__":
    main()

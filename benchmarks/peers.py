"""Side-by-side with the peers: kvpress presses and transformers' ``QuantizedCache`` next to our methods, on the
same model (SmolLM2-135M), WikiText-2 windows and needle set, through kvcompress's own protocol.

    python benchmarks/peers.py                 # (= make bench-peers) full protocol: P=1024, C=256, 4 windows, needle 1k/2k
    python benchmarks/peers.py --prompt-len 512 --cont-len 64 --windows 2 --needle 1024 --needle-depths 0.1 0.9

Steps: (1) build / reuse ``.venv-peers`` (torch==2.13.0 first, so no CUDA wheel is pulled; then kvpress with
transformers 5.2.x, optimum-quanto, hqq, and this repository, each installed separately: a failed install is
reported and that peer skipped); (2) run ``benchmarks/peers_runner.py`` in that venv (one process: the full
reference, our methods, the peers); (3) write ``peers.json``, ``peers.md`` and ``pareto.png`` under ``--out`` and
the Markdown to ``benchmarks/results/peers.md``.

This file needs only the standard library (rendering runs under the venv's python, which has matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
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
]
REQUIRED = {"torch", "kvcompress"}


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


def markdown(result: dict) -> str:
    cfg = result["config"]
    nd = cfg.get("needle") or {}
    modes = nd.get("modes", [])
    mode_tag = " · ".join({"aware": "aware", "agnostic": "agn."}[m] for m in modes)
    lines = []
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    v = result["versions"]
    setup = [f"model {result['model']['name']} ({result['model']['dtype']})",
             f"data {result['data']['source']} (sha256 {result['data']['sha256'][:12]})"]
    if cfg["windows"]:
        setup.append(f"P = {cfg['prompt_len']}, C = {cfg['cont_len']}, {cfg['windows']} windows")
    if nd:
        setup.append(f"needle at {nd['context_lens']} tokens, depths {nd['depths']}, modes {modes}")
    setup.append(f"speed at {cfg['speed']['context']} tokens + {cfg['speed']['steps']} steps, median of "
                 f"{cfg['speed']['repeats']} interleaved rounds" if cfg.get("speed") else "speed not measured")
    setup.append(f"torch {v['torch']}, transformers {v['transformers']}, kvpress {v['kvpress']}, "
                 f"optimum-quanto {v['optimum-quanto']}, hqq {v['hqq']}, {v['threads']} thread(s)")
    lines += ["; ".join(setup), ""]
    header = ["method", "family", "stored-bytes ratio @P", "@P+C", "Δppl %", "KL", f"needle ({mode_tag})",
              "TTFT ratio", "decode ratio", "note"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---|" + "---:|" * 7 + "---|")
    for row in result["methods"]:
        mem, ppl, sp = row.get("memory", {}), row.get("ppl", {}), row.get("speed", {})
        ref = row.get("reference")
        cells = [
            f"`{row['spec']}`" + (" (ref)" if ref else ""),
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


def pareto(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"kvcompress": ("tab:blue", "o", "ours (kvcompress)"), "kvpress": ("tab:orange", "s", "kvpress"),
              "transformers": ("tab:green", "^", "transformers QuantizedCache")}
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    seen = set()
    for row in result["methods"]:
        if "ppl" not in row or "memory" not in row:
            continue
        x, y = row["memory"]["after_prefill"]["ratio"], row["ppl"]["dppl_pct"]
        color, marker, name = styles.get(row["family"], ("0.3", "x", row["family"]))
        ax.scatter([x], [y], c=color, marker=marker, s=30, zorder=2, label=None if name in seen else name)
        seen.add(name)
        ax.annotate(row["spec"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("stored-bytes ratio vs fp16 after prefill (higher = smaller cache)")
    ax.set_ylabel("Δ perplexity vs full cache (%, symlog)")
    cfg = result["config"]
    ax.set_title(f"{result['model']['name']}: ours vs peers, P={cfg['prompt_len']}, C={cfg['cont_len']}, "
                 f"{cfg['windows']} windows", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(out: Path, results_md: Path | None) -> None:
    result = json.loads((out / "peers.json").read_text())
    md = markdown(result)
    (out / "peers.md").write_text(md)
    pareto(result, out / "pareto.png")
    if results_md is not None:
        results_md.parent.mkdir(parents=True, exist_ok=True)
        results_md.write_text("# Side by side with the peers\n\n" + md + f"\nPareto plot: `{out / 'pareto.png'}`.\n")
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
    p.add_argument("--render-only", action="store_true", help="only re-render peers.json under --out")
    args, passthrough = p.parse_known_args(argv)
    out = Path(args.out).resolve()
    results_md = Path(args.results_md) if args.results_md else None

    if args.render_only:
        render(out, results_md)
        return 0

    status = ensure_venv(args.reinstall)
    missing = [s for s in REQUIRED if not status.get(s, {}).get("ok")]
    if missing:
        print(f"[peers] cannot run: {', '.join(missing)} failed to install: "
              + "; ".join(status[m]["error"] for m in missing), file=sys.stderr)
        return 1
    for name, st in status.items():
        print(f"[peers] {name}: {'installed' if st['ok'] else 'NOT installed (' + st['error'] + ')'}", flush=True)

    command = shlex.join([Path(sys.executable).name, "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])])
    runner = [str(venv_python()), str(REPO / "benchmarks" / "peers_runner.py"), "--data", args.data,
              "--needle-dir", args.needle_dir, "--out", str(out), "--install-status", str(STATUS),
              "--command", command]
    if not status.get("kvpress", {}).get("ok"):
        runner.append("--no-kvpress")
    backends = [b for b, step in (("quanto", "optimum-quanto"), ("hqq", "hqq")) if status.get(step, {}).get("ok")]
    if "--quant-backends" not in passthrough:
        runner += ["--quant-backends", *backends]
    rc = subprocess.run(runner + passthrough, cwd=REPO).returncode
    if rc != 0:
        print(f"[peers] the runner failed (exit {rc})", file=sys.stderr)
        return rc
    return subprocess.run([str(venv_python()), __file__, "--render-only", "--out", str(out),
                           "--results-md", str(results_md or "")]).returncode


if __name__ == "__main__":
    raise SystemExit(main())

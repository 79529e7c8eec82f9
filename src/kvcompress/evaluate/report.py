"""Result dict -> table rows -> rich table, Markdown, JSON files and the Pareto figure."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _needle_counts(row: dict, mode: str, n: int) -> str:
    tasks = [t for t in row.get("needle", {}).get("tasks", []) if t["mode"] == mode and t["context_len"] == n]
    return f"{sum(t['hit'] for t in tasks)}/{len(tasks)}" if tasks else "-"


def _ruler_cell(cell: dict | None) -> str:
    """``{"score", "se", "n"}`` -> "63.2 ± 4.7" (points)."""
    return "-" if not cell else f"{cell['score']:.1f} ± {cell['se']:.1f}"


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows: method, bytes ratio after prefill / at the end, ppl, Δppl %, KL, agreement,
    needle hits per context length (aware · agnostic), TTFT ratio, decode ratio."""
    cfg = result["config"]
    needle = cfg.get("needle") or {}
    lens, modes = needle.get("context_lens", []), needle.get("modes", [])
    mode_tag = " · ".join({"aware": "aware", "agnostic": "agn."}[m] for m in modes)
    header = ["method", "bytes ratio @P", "bytes ratio @P+C", "ppl", "Δppl %", "KL", "top-1 agree"]
    header += [f"needle {n} ({mode_tag})" for n in lens]
    at = f" @{cfg['speed']['context']}" if cfg.get("speed") else ""
    header += [f"TTFT ratio{at}", f"decode ratio{at}"]
    ruler = cfg.get("ruler") or {}
    r_lens, r_modes = ruler.get("context_lens", []), ruler.get("modes", [])
    r_tag = " · ".join({"aware": "aware", "agnostic": "agn."}[m] for m in r_modes)
    header += [f"RULER {n} ({r_tag})" for n in r_lens]
    out = []
    for row in result["methods"]:
        ppl, mem, speed = row.get("ppl", {}), row.get("memory", {}), row.get("speed", {})
        cells = [
            row["spec"] + (" (ref)" if row.get("reference") else ""),
            _fmt(mem.get("after_prefill", {}).get("ratio"), ".2f", "x"),
            _fmt(mem.get("after_decode", {}).get("ratio"), ".2f", "x"),
            _fmt(ppl.get("ppl"), ".3f"),
            _fmt(ppl.get("dppl_pct"), "+.2f"),
            _fmt(ppl.get("kl"), ".3g"),
            _fmt(None if ppl.get("agreement") is None else 100 * ppl["agreement"], ".1f", " %"),
        ]
        cells += [" · ".join(_needle_counts(row, m, n) for m in modes) for n in lens]
        if speed.get("reference"):
            cells += ["1 (ref)", "1 (ref)"]
        else:
            cells += [_fmt(speed.get("ttft_ratio"), ".2f", "x"), _fmt(speed.get("decode_ratio"), ".2f", "x")]
        scores = row.get("ruler", {}).get("scores", {})
        cells += [" · ".join(_ruler_cell(scores.get(m, {}).get(str(n))) for m in r_modes) for n in r_lens]
        out.append(cells)
    for s in result.get("skipped", []):  # a method that refused: its row says why, every measurement "-"
        out.append([f"{s['method']} -- not run: {_short_reason(s['reason'])}"] + ["-"] * (len(header) - 1))
    return header, out


def _short_reason(reason: str, limit: int = 170) -> str:
    """The first sentence(s) of a refusal, up to ``limit`` characters (the full text is in the JSON)."""
    reason = " ".join(reason.split()).replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 3].rstrip() + "..."


def verdict(result: dict, min_ratio: float = 4.0, max_loss: float = 1.0) -> list[str]:
    """The closing lines: the lowest-loss row at >= ``min_ratio`` x and the most compressing row at <= ``max_loss`` %
    Δppl (ratio after the prefill; the reference excluded), or that there is none."""
    rows = [r for r in result["methods"] if not r.get("reference") and "ppl" in r and "memory" in r]
    if not rows:
        return []

    def show(r):
        return f"`{r['spec']}` ({r['memory']['after_prefill']['ratio']:.2f}x, Δppl {r['ppl']['dppl_pct']:+.2f} %)"

    big = [r for r in rows if r["memory"]["after_prefill"]["ratio"] >= min_ratio]
    low = [r for r in rows if r["ppl"]["dppl_pct"] <= max_loss]
    a = (f"best at >= {min_ratio:g}x: {show(min(big, key=lambda r: r['ppl']['dppl_pct']))}" if big
         else f"no row reaches {min_ratio:g}x")
    b = (f"best at <= {max_loss:g} % loss: "
         f"{show(max(low, key=lambda r: (r['memory']['after_prefill']['ratio'], -r['ppl']['dppl_pct'])))}" if low
         else f"no row loses <= {max_loss:g} % (the least: {show(min(rows, key=lambda r: r['ppl']['dppl_pct']))})")
    return [f"{a}; {b}. (`kvcompress tune` searches settings for your own model and text.)"]


def describe_setup(result: dict) -> str:
    """One line: model, data, P/C/windows, needle and speed settings, seed."""
    cfg = result["config"]
    parts = [
        f"model {result['model']['name']}",
        f"data {result['data']['source']} (sha256 {result['data']['sha256'][:12]}, {result['data']['tokens']} tokens)",
    ]
    if cfg["windows"]:
        parts.append(f"P = {cfg['prompt_len']}, C = {cfg['cont_len']}, {cfg['windows']} windows")
    if cfg.get("needle"):
        nd = cfg["needle"]
        parts.append(
            f"needle at {', '.join(map(str, nd['context_lens']))} tokens, depths {nd['depths']}, "
            f"{nd['per_depth']} per depth, haystack {nd['haystack']}"
        )
    if cfg.get("ruler"):
        ru = cfg["ruler"]
        parts.append(
            f"RULER at {', '.join(map(str, ru['context_lens']))} tokens, {ru['per_task']} tasks per family and length "
            f"({len(ru['families'])} families), haystack {ru['haystack']}"
        )
    if cfg.get("speed"):
        sp = cfg["speed"]
        parts.append(
            f"speed at {sp['context']} tokens: the method prefilled once, then {sp['repeats']} rounds of {sp['steps']} "
            "decode steps interleaved with a shared full cache (median; the reference is prefilled again every "
            f"{3 * sp['steps'] * sp['repeats']} tokens it grows)" if sp.get("form") == "bursts" else
            f"speed at {sp['context']} tokens + {sp['steps']} decode steps, median of {sp['repeats']} interleaved rounds"
        )
    parts.append(f"seed {result['seed']}")
    if result.get("host"):
        parts.append(f"torch {result['host']['torch']}, {result['host']['threads']} thread(s)")
    return "; ".join(parts)


def rich_table(result: dict):
    from rich.table import Table

    header, rows = table_rows(result)
    table = Table(title=f"kvcompress eval vs {result['config']['reference']}", caption=describe_setup(result))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    return table


def ruler_tables(result: dict) -> list[str]:
    """Markdown lines: per mode and context length (and over all lengths), a table of methods x families with
    score ± binomial SE in points, the overall score and the mean bytes ratio over the tasks."""
    ruler = result["config"].get("ruler") or {}
    if not ruler:
        return []
    fams = ruler["families"]
    keys = [str(n) for n in ruler["context_lens"]] + (["all"] if len(ruler["context_lens"]) > 1 else [])
    lines = []
    for mode in ruler["modes"]:
        for key in keys:
            title = f"{key} tokens" if key != "all" else "all lengths"
            lines += ["", f"RULER, {title}, query-{mode} (score ± SE in points; n tasks per row in the overall cell):", ""]
            header = ["method"] + fams + ["overall", "n", "bytes ratio"]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            for row in result["methods"]:
                cell = row.get("ruler", {}).get("scores", {}).get(mode, {}).get(key)
                if not cell:
                    continue
                cells = [row["spec"] + (" (ref)" if row.get("reference") else "")]
                cells += [_ruler_cell(cell["families"].get(f)) for f in fams]
                cells += [_ruler_cell(cell), str(cell["n"]), _fmt(cell.get("bytes_ratio"), ".2f", "x")]
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "RULER score of a task = share of its expected strings in the greedy output (whole words, case-insensitive); "
        "a cell = mean over its tasks in points ± the binomial standard error 100·sqrt(p(1-p)/n) (an upper bound for "
        "the partial-credit families). bytes ratio = fp16 reference bytes / bytes held, at the end of each task.",
    ]
    return lines


def markdown(result: dict) -> str:
    """Markdown: the exact command, the setup line, the table, notes (skipped methods, what ratios mean)."""
    header, rows = table_rows(result)
    lines = []
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    lines += [describe_setup(result), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "bytes ratio = fp16 reference bytes / bytes actually held by the cache, after the P-token prefill (@P) and "
        "after the teacher-forced steps (@P+C: P+C-1 tokens fed). ppl over the C continuation tokens only; Δppl, KL "
        "(full || method, mean per step) and top-1 agreement against the reference row on the same windows. "
        "needle: exact-match hits / tasks, query-aware · query-agnostic. TTFT / decode ratio = reference time / "
        "method time (> 1 = faster): decode the median of interleaved rounds, TTFT (in the default, cheap form) one "
        "prefill pair; absolute timings are noisy on a shared CPU.",
    ]
    lines += ruler_tables(result)
    for s in result.get("skipped", []):
        lines.append(f"- not run `{s['method']}`: {s['reason']}")
    if result.get("skipped"):
        lines.append("")
    lines += verdict(result)
    wall = result["timings"].get("total_s", sum(result["timings"].values()))  # partial / merged runs: the parts
    lines.append(f"\npeak RSS {(result['peak_rss_bytes'] or 0) / 2**20:.0f} MiB; wall {wall:.0f} s.")
    return "\n".join(lines) + "\n"


def write_json(result: dict, path: Path) -> None:
    """JSON written atomically (a temporary file renamed), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)


def write_outputs(result: dict, out: str | Path) -> dict:
    """Write results.json, results.md and pareto.png under ``out``; returns their paths."""
    from ..plots import pareto_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "pareto.png"}
    if pareto_plot(result, paths["plot"]) is None:  # no perplexity measured: nothing to plot
        del paths["plot"]
    files = {k: str(v) for k, v in paths.items()}
    result = dict(result, files=files)
    write_json(result, paths["json"])
    paths["markdown"].write_text(markdown(result))
    return files


def merge(results: list[dict]) -> dict:
    """Combine runs of the same model and seed that measured different parts (e.g. ``--needle 0 --no-speed``,
    then ``--windows 0 --no-speed``, then ``--windows 0 --needle 0``) into one result; rows are matched by spec.
    Each part (ppl + memory, needle, speed) is taken from the run that measured it; the commands are all kept."""
    if not results:
        raise ValueError("nothing to merge")
    base = results[0]
    for r in results[1:]:
        for key in ("seed",):
            if r[key] != base[key]:
                raise ValueError(f"cannot merge runs with different {key}: {r[key]!r} vs {base[key]!r}")
        if r["model"]["name"] != base["model"]["name"]:
            raise ValueError(f"cannot merge runs of different models: {r['model']['name']} vs {base['model']['name']}")
        if r["config"]["reference"] != base["config"]["reference"]:
            raise ValueError("cannot merge runs with different reference caches")
    out = json.loads(json.dumps(base, default=str))
    out["command"] = "\n".join(r["command"] for r in results if r.get("command"))
    out["config"] = dict(out["config"], windows=0, needle=None, speed=None, ruler=None)
    out["timings"] = {}
    rows: dict[str, dict] = {}
    parts = {"ppl": ("ppl", "memory"), "needle": ("needle",), "speed": ("speed",), "ruler": ("ruler",)}
    for r in results:
        cfg = r["config"]
        has = {"ppl": bool(cfg["windows"]), "needle": bool(cfg.get("needle")), "speed": bool(cfg.get("speed")),
               "ruler": bool(cfg.get("ruler"))}
        for part, present in has.items():
            if not present:
                continue
            if part == "ppl":
                if out["config"]["windows"]:
                    raise ValueError("two runs both measured perplexity")
                out["config"].update(prompt_len=cfg["prompt_len"], cont_len=cfg["cont_len"], windows=cfg["windows"])
                out["data"] = r["data"]
            else:
                if out["config"][part]:
                    raise ValueError(f"two runs both measured {part}")
                out["config"][part] = cfg[part]
        for row in r["methods"]:
            dst = rows.setdefault(row["spec"], {k: v for k, v in row.items() if k not in ("ppl", "memory", "needle", "speed", "ruler")})
            for part, present in has.items():
                if present:
                    dst.update({k: row[k] for k in parts[part] if k in row})
        for k, v in r.get("timings", {}).items():
            out["timings"][k] = out["timings"].get(k, 0.0) + v
    out["methods"] = list(rows.values())
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] or 0 for r in results)
    out["merged_from"] = len(results)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m kvcompress.evaluate.report RESULTS.json [...] [--merge] [--out DIR]``: print the Markdown of
    saved results; with ``--merge``, of one result combining the runs (and write it under DIR if given)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvcompress.evaluate.report")
    p.add_argument("results", nargs="+")
    p.add_argument("--merge", action="store_true", help="combine runs that measured different parts")
    p.add_argument("--out", default=None, help="with --merge: write results.json/.md and pareto.png here")
    args = p.parse_args(argv)
    loaded = [json.loads(Path(x).read_text()) for x in args.results]
    if args.merge:
        merged = merge(loaded)
        if args.out:
            merged["files"] = write_outputs(merged, args.out)
        print(markdown(merged))
    else:
        for r in loaded:
            print(markdown(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

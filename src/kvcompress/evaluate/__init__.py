"""One evaluation protocol for every method (DESIGN.md, "One evaluation protocol for all").

    result = kvcompress.evaluate("smollm2-135m", ["full", "kivi:bits=2", "snapkv:budget=0.2"],
                                 data="../shared/data/wikitext-2-raw/wiki.test.raw", out="results/run1")

- ppl.py    compressed-context perplexity, KL(full || method), top-1 agreement
- needle.py needle in a haystack, query-aware and query-agnostic
- ruler.py  RULER's synthetic long-context tasks (needle variants, variable tracking, word extraction), built offline
- speed.py  TTFT and decode ratios vs the full cache, interleaved in one process
- memory.py stored / reference bytes after prefill and after decoding, peak RSS
- report.py rich table, Markdown, JSON; plots.py the Pareto figure

Every input is checked (and every method's cache built once) before any evaluation work; bad input raises one
KVCompressError. Results are deterministic given ``seed`` (timings aside).
"""

from __future__ import annotations

import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import __version__
from ..cache import ModelGeometry
from ..data import DEFAULT_SOURCE, encode, load_text, make_needle_tasks, text_sha256, windows_from_ids
from ..registry import KVCompressError, build_config, get_method
from . import memory as _memory
from . import needle as _needle
from . import ppl as _ppl
from . import ruler as _ruler
from . import speed as _speed
from .spec import MethodSpec, default_specs, parse_spec, validate_specs

__all__ = ["run_eval", "pool_windows", "MethodSpec", "parse_spec", "NEEDLE_MODES"]

NEEDLE_MODES = {"aware": ("aware",), "agnostic": ("agnostic",), "both": ("aware", "agnostic")}


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVCompressError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def _same_config(a: MethodSpec, b: MethodSpec) -> bool:
    return a.name == b.name and build_config(get_method(a.name), a.kwargs) == build_config(get_method(b.name), b.kwargs)


def pool_windows(per_window: dict, mems: dict, ref_label: str) -> dict:
    """Per method label: ``{"ppl": pooled ppl/KL/agreement with dppl_pct vs ``ref_label``, "memory": after_prefill /
    after_decode}``. ``per_window[label]``: :func:`ppl.compare` dicts; ``mems[label]``: (prefill reports, end
    reports). Labels keep their order; the reference must be among them."""
    ref_ppl = _ppl.summarize(per_window[ref_label])["ppl"]
    out = {}
    for label, windows in per_window.items():
        summary = _ppl.summarize(windows)
        summary["dppl_pct"] = 100.0 * (summary["ppl"] / ref_ppl - 1.0)
        out[label] = {
            "ppl": summary,
            "memory": {"after_prefill": _memory.summarize(mems[label][0]), "after_decode": _memory.summarize(mems[label][1])},
        }
    return out


def _in_order(jobs: int, fn, items):
    """``fn`` over ``items``, results in order; with ``jobs > 1`` up to ``jobs`` at once in threads (kvcompress caches
    used from several threads on one model do not see each other; torch releases the GIL inside its ops)."""
    if jobs <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(fn, items)


def run_eval(
    model="smollm2-135m",
    methods=None,
    *,
    tokenizer=None,
    data: str | Path = DEFAULT_SOURCE,
    prompt_len: int = 512,
    cont_len: int = 128,
    windows: int = 2,
    needle=(1024,),
    needle_dir: str | Path | None = None,
    needle_depths=(0.1, 0.5, 0.9),
    needle_per_depth: int = 1,
    needle_mode: str = "aware",
    needle_tokens: int = 12,
    speed: bool = True,
    speed_context: int = 2048,
    speed_steps: int = 16,
    speed_repeats: int = 2,
    ruler=(),
    ruler_dir: str | Path | None = None,
    ruler_per_task: int = _ruler.DEFAULT_PER_TASK,
    ruler_mode: str = "aware",
    ruler_families=None,
    reference: str = "full",
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    jobs: int = 1,
) -> dict:
    """Evaluate ``methods`` (spec strings ``"name[:opt=value,...]"``; default: every registered method at its
    operating point of :data:`spec.EVAL_POINTS`, a method that refuses listed with its reason) against ``reference``
    on ``model``.

    ``model``: a name/path for :func:`kvcompress.load_model`, or a loaded model (then pass ``tokenizer``).
    ``windows=0``, ``needle=()`` / ``(0,)``, ``speed=False`` skip a part. ``ruler``: RULER context lengths (``True``:
    1k-8k clamped to the model), ``ruler_per_task`` tasks per family and length, families ``ruler_families`` (default
    all), haystack ``ruler_dir`` (default pydoc prose), ``ruler_mode`` aware / agnostic / both. Returns the result dict (also written
    as results.json / results.md / pareto.png under ``out`` when given). ``jobs``: methods run at once (threads,
    each with its own cache) in the perplexity and needle phases; the speed phase always runs one at a time.
    """
    started = time.perf_counter()
    # -- cheap checks first: numbers, modes, method names, data -------------------------------------------------------
    _check_int(prompt_len, "prompt_len", 1)
    _check_int(cont_len, "cont_len", 1)
    _check_int(windows, "windows", 0)
    _check_int(needle_per_depth, "needle_per_depth", 1)
    _check_int(needle_tokens, "needle_tokens", 1)
    _check_int(speed_context, "speed_context", 1)
    _check_int(speed_steps, "speed_steps", 1)
    _check_int(speed_repeats, "speed_repeats", 1)
    _check_int(ruler_per_task, "ruler_per_task", 1)
    if ruler_mode not in NEEDLE_MODES:
        raise KVCompressError(f"ruler_mode must be one of {sorted(NEEDLE_MODES)}, got {ruler_mode!r}")
    ruler_fams = _ruler.check_families(ruler_families)
    ruler_gen = max(_ruler.MAX_NEW_TOKENS[f] for f in ruler_fams)
    _ruler.resolve_lengths(ruler, None, ruler_gen)  # bad values raise before the model loads
    if needle_mode not in NEEDLE_MODES:
        raise KVCompressError(f"needle_mode must be one of {sorted(NEEDLE_MODES)}, got {needle_mode!r}")
    needle_lens = sorted({_check_int(n, "needle context length", 0) for n in (needle or ())} - {0})
    depths = tuple(float(d) for d in needle_depths)
    if needle_lens and not depths:
        raise KVCompressError("needle depths are empty")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise KVCompressError(f"needle depth {d!r} is outside [0, 1]")
    ref_spec = parse_spec(reference)
    specs = None if methods is None else [parse_spec(m) for m in methods]
    text = load_text(data)
    haystack = (load_text(needle_dir) if needle_dir is not None else load_text(DEFAULT_SOURCE)) if needle_lens else None
    ruler_text = (load_text(ruler_dir) if ruler_dir is not None else load_text(DEFAULT_SOURCE)) if ruler else None

    # -- model, context limits, every cache built once -----------------------------------------------------------------
    from ..models import model_and_tokenizer

    model, tokenizer, model_name = model_and_tokenizer(model, tokenizer, "run_eval", progress)
    geometry = ModelGeometry.from_model(model)
    limit = geometry.max_positions
    needs = {"prompt_len + cont_len": prompt_len + cont_len if windows else 0}
    needs.update({f"needle context {n}": n + needle_tokens for n in needle_lens})
    if speed:
        needs["speed_context + speed_steps x speed_repeats"] = speed_context + speed_steps * speed_repeats
    ruler_lens = _ruler.resolve_lengths(ruler, limit, ruler_gen)  # too long for the model -> KVCompressError
    for what, n in needs.items():
        if limit is not None and n > limit:
            raise KVCompressError(f"{what} = {n} tokens exceeds the model's maximum of {limit} positions")
    skipped: list[dict] = []
    if specs is None:
        specs, skipped = default_specs(model)
    # the reference is always the first row; a requested spec with the reference's config is that row
    ref_label = next((s.label for s in specs if _same_config(s, ref_spec)), ref_spec.label)
    rows = [ref_spec] + [s for s in specs if not _same_config(s, ref_spec)]
    described = validate_specs(rows, model)
    result_rows = {
        s.label: {
            "spec": ref_label if s is ref_spec else s.label,
            "method": s.name,
            "options": s.kwargs,
            "describe": d,
            "reference": s is ref_spec,
        }
        for s, d in zip(rows, described)
    }

    # -- every input built before any model work -----------------------------------------------------------------------
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    ppl_windows = windows_from_ids(ids, prompt_len + cont_len, windows, seed) if windows else None
    modes = NEEDLE_MODES[needle_mode]
    tasks = [t for n in needle_lens for t in make_needle_tasks(tokenizer, haystack, n, depths, needle_per_depth, seed)]
    speed_ids = windows_from_ids(ids, speed_context, 1, seed)[0].view(1, -1) if speed else None
    ruler_modes = NEEDLE_MODES[ruler_mode]
    ruler_tasks = _ruler.make_all(tokenizer, ruler_text, ruler_lens, ruler_fams, ruler_per_task, seed) if ruler_lens else []
    timings: dict = {}
    result = {
        "kvcompress_version": __version__,
        "command": command,
        "seed": seed,
        "model": {
            "name": str(model_name) if model_name is not None else geometry.model_id,
            "id": geometry.model_id,
            "layers": geometry.num_layers,
            "heads": geometry.num_heads,
            "kv_heads": geometry.num_kv_heads,
            "head_dim": geometry.head_dim,
            "dtype": str(geometry.dtype),
            "max_positions": geometry.max_positions,
        },
        "data": {"source": str(data), "sha256": text_sha256(text), "tokens": int(ids.numel())},
        "config": {
            "prompt_len": prompt_len,
            "cont_len": cont_len,
            "windows": windows,
            "needle": {
                "haystack": str(needle_dir) if needle_dir is not None else DEFAULT_SOURCE,
                "haystack_sha256": text_sha256(haystack),
                "context_lens": needle_lens,
                "depths": list(depths),
                "per_depth": needle_per_depth,
                "modes": list(modes),
                "max_new_tokens": needle_tokens,
            }
            if needle_lens
            else None,
            "speed": {"context": speed_context, "steps": speed_steps, "repeats": speed_repeats, "form": "bursts"}
            if speed
            else None,
            "ruler": {
                "haystack": str(ruler_dir) if ruler_dir is not None else DEFAULT_SOURCE,
                "haystack_sha256": text_sha256(ruler_text),
                "context_lens": ruler_lens,
                "families": list(ruler_fams),
                "per_task": ruler_per_task,
                "modes": list(ruler_modes),
                "max_new_tokens": {f: _ruler.MAX_NEW_TOKENS[f] for f in ruler_fams},
            }
            if ruler_lens
            else None,
            "reference": ref_label,
        },
        "methods": list(result_rows.values()),  # the row dicts are filled in place, phase by phase
        "skipped": skipped,
        "peak_rss_bytes": None,
        "timings": timings,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }

    def checkpoint(phase: str) -> None:
        """After each phase, results.partial.json under ``out`` (a killed run keeps what it finished)."""
        result["peak_rss_bytes"] = _memory.peak_rss_bytes()
        if out is not None:
            from .report import write_json

            write_json(dict(result, completed=phase), Path(out) / "results.partial.json")

    # -- perplexity, KL, agreement (the reference once per window, reused for every method) -------------------------
    if ppl_windows is not None:
        t0 = time.perf_counter()
        per_window = {s.label: [] for s in rows}
        mems = {s.label: ([], []) for s in rows}
        bar = _progress(len(ppl_windows) * len(rows), "perplexity", progress)
        def teacher_forced(s, window):
            torch.manual_seed(seed)
            with s.make(model) as cache:
                return _ppl.teacher_force(model, cache, window, prompt_len)

        for window in ppl_windows:
            targets = window[prompt_len:]
            ref_out = teacher_forced(ref_spec, window)
            outs = _in_order(jobs, lambda s: ref_out if s is ref_spec else teacher_forced(s, window), rows)
            for s, got in zip(rows, outs):
                per_window[s.label].append(_ppl.compare(ref_out.logprobs, got.logprobs, targets))
                mems[s.label][0].append(got.memory_prefill)
                mems[s.label][1].append(got.memory_end)
                bar.update(1)
            del ref_out
        bar.close()
        for label, pooled in pool_windows(per_window, mems, ref_spec.label).items():
            result_rows[label].update(pooled)
        timings["ppl_s"] = time.perf_counter() - t0
        checkpoint("ppl")

    # -- needle in a haystack ------------------------------------------------------------------------------------------
    if needle_lens:
        t0 = time.perf_counter()
        found = {s.label: [] for s in rows}
        bar = _progress(len(tasks) * len(modes) * len(rows), "needle", progress)
        runs = [(task, mode, s) for task in tasks for mode in modes for s in rows]

        def needle_run(run):
            task, mode, s = run
            torch.manual_seed(seed)
            return _needle.run_task(model, tokenizer, s, task, mode, needle_tokens)

        for (_, _, s), hit in zip(runs, _in_order(jobs, needle_run, runs)):
            found[s.label].append(hit)
            bar.update(1)
        bar.close()
        for s in rows:
            result_rows[s.label]["needle"] = {"accuracy": _needle.summarize(found[s.label]), "tasks": found[s.label]}
        timings["needle_s"] = time.perf_counter() - t0
        checkpoint("needle")

    # -- RULER: every task through every method (all methods see the same tasks), checkpointed after each task ---------
    if ruler_lens:
        t0 = time.perf_counter()
        got = {s.label: [] for s in rows}
        bar = _progress(len(ruler_tasks) * len(ruler_modes) * len(rows), "ruler", progress)
        for i, task in enumerate(ruler_tasks):
            for mode in ruler_modes:
                for s in rows:
                    torch.manual_seed(seed)
                    got[s.label].append(_ruler.run_task(model, tokenizer, s, task, mode))
                    bar.update(1)
            for s in rows:
                result_rows[s.label]["ruler"] = {"scores": _ruler.summarize(got[s.label]), "tasks": got[s.label]}
            timings["ruler_s"] = time.perf_counter() - t0
            checkpoint(f"ruler {i + 1}/{len(ruler_tasks)} tasks")
        bar.close()

    # -- speed: method and reference interleaved -----------------------------------------------------------------------
    if speed:
        t0 = time.perf_counter()
        others = [s for s in rows if s is not ref_spec]
        bar = _progress(len(others), "speed", progress)
        shared = _speed.SharedReference(model, ref_spec, speed_ids, slack=3 * speed_steps * speed_repeats)
        try:
            for s in others:
                torch.manual_seed(seed)
                result_rows[s.label]["speed"] = _speed.compare_bursts(model, s, shared, speed_ids, speed_steps, speed_repeats)
                bar.update(1)
        finally:
            shared.close()
        bar.close()
        result_rows[ref_spec.label]["speed"] = {"ttft_ratio": 1.0, "decode_ratio": 1.0, "reference": True}
        timings["speed_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - started
    result["peak_rss_bytes"] = _memory.peak_rss_bytes()
    if out is not None:
        from .report import write_outputs

        result["files"] = write_outputs(result, out)
        (Path(out) / "results.partial.json").unlink(missing_ok=True)
    return result


class _CallableModule(type(sys)):
    """``kvcompress.evaluate`` is this package *and* the function: ``kvcompress.evaluate(model, methods, ...)`` runs
    :func:`run_eval`, while ``kvcompress.evaluate.ppl`` etc. stay importable. (A plain function named like the
    package would be replaced by the package the first time the package is imported.)"""

    def __call__(self, *args, **kwargs):
        return run_eval(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

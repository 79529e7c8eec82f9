"""``kvcompress tune``: which method and setting, for *this* model and *this* text, compresses the KV cache most while
losing at most ``max_loss`` % perplexity (and, if asked, compressing at least ``min_ratio`` x)?

    result = kvcompress.tune("smollm2-135m", data="wiki.test.raw", max_loss="2%", min_ratio=4, budget_minutes=10)
    print(result["best"]["make_cache"])        # kvcompress.make_cache("snapkv", model, budget=0.5, storage="kivi", bits=4)

Every candidate is measured with the evaluation protocol (:mod:`kvcompress.evaluate.ppl`): P prompt tokens through
the candidate's cache, C tokens teacher-forced one step at a time, Δppl against the full cache run on the same
windows in the same call; the ratio is ``memory_report()`` after the prefill (fp16 bytes / bytes held).

The search (:func:`search`, pure: it only sees ``probe``/``measure``/``estimate`` callables and a clock):

1. **coarse**: each *family* (a method, or a composition such as SnapKV with KIVI storage) walks its grid from the
   mildest setting to the most aggressive one, all families in turn, the cheapest estimated first. A family stops at
   its first setting over ``max_loss`` (its more aggressive settings are listed as pruned). Before paying for a
   measurement each candidate is *probed* (one prefill: the exact ratio, or the method's refusal): below
   ``min_ratio`` it is deferred, at or below the best ratio already found it waits behind the others.
2. **refine**: between a family's last setting within the loss and its first one over it, bisect a continuous knob
   (budgets: geometric mean, twice) or try the family's in-between settings (e.g. KIVI 4-bit keys + 2-bit values,
   a shorter fp16 residual); past the grid's end, one step further.
3. **deferred** candidates (below ``min_ratio``) last, for the frontier only.

Cost: the first measurement of a family gives its seconds per window relative to the full cache; before that a prior
(decode-speed ratios measured in benchmarks/RESULTS.md). A candidate starts only if its estimate fits the time left;
a measurement checks the clock before each window and gives up when the next would not fit. Whatever was not run is
returned with the reason (budget, pruned, refused, below min ratio).
"""

from __future__ import annotations

import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .registry import KVCompressError

DEFAULT_PROMPT_LEN, DEFAULT_CONT_LEN, DEFAULT_WINDOWS = 512, 128, 2
DEFAULT_BUDGET_MINUTES = 10.0
REFINE_STEPS = 2  # bisections per continuous family
KVQUANT_CALIBRATION_WINDOWS = 25.0  # prior: first-use calibration ~ this many full-cache windows (P=512, C=128)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


def parse_loss(value) -> float:
    """``"2%"``, ``"2"``, ``2`` or ``2.0`` -> 2.0 (percent of perplexity increase allowed), in [0, 100]."""
    if isinstance(value, bool):
        raise KVCompressError(f"max loss must be a percentage such as 2% (0 to 100), got {value!r}")
    if isinstance(value, (int, float)):
        pct = float(value)
    else:
        text = str(value).strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%?", text)
        if not m:
            raise KVCompressError(f"max loss must be a percentage such as 2% (0 to 100), got {value!r}")
        pct = float(m.group(1))
    if not math.isfinite(pct) or not 0.0 <= pct <= 100.0:
        raise KVCompressError(f"max loss must be a percentage between 0% and 100%, got {value!r}")
    return pct


def _check_min_ratio(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1.0:
        raise KVCompressError(f"min ratio must be a number >= 1 (stored-bytes ratio vs fp16), got {value!r}")
    return float(value)


def _check_budget(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise KVCompressError(f"time budget must be a positive number of minutes, got {value!r}")
    return float(value) * 60.0


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVCompressError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------------------------------


def spec_string(method: str, options: dict) -> str:
    """``("snapkv", {"budget": 0.25, "storage": "kivi"})`` -> ``"snapkv:budget=0.25,storage=kivi"`` (what
    ``kvcompress eval --methods`` and :func:`kvcompress.evaluate.parse_spec` read back)."""
    if not options:
        return method
    return method + ":" + ",".join(f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in options.items())


def make_cache_call(method: str, options: dict) -> str:
    """The Python call that builds this cache: ``kvcompress.make_cache("kivi", model, bits=4)``."""
    args = [f'"{method}"', "model"] + [f"{k}={v!r}".replace("'", '"') for k, v in options.items()]
    return f"kvcompress.make_cache({', '.join(args)})"


def _round(x: float) -> float:
    """Three significant digits (budgets found by bisection)."""
    return float(f"{x:.3g}")


@dataclass(frozen=True)
class Family:
    """A method (or a composition) and the one knob the search moves. Lower knob values are more aggressive.

    ``grid``: coarse values, mildest first. ``continuous``: bisect between values when refining (else ``between``
    gives the in-between option sets). ``extend``: options one step past the most aggressive value within the loss.
    ``milder``: options tried once when the mildest value is already over the loss. ``cost``: prior seconds per
    window relative to the full cache. ``calibrates``: the first build may calibrate (kvquant ``calibration="auto"``).
    """

    name: str
    method: str
    knob: str
    grid: tuple
    fixed: tuple = ()  # options every candidate of the family carries, as (name, value) pairs
    continuous: bool = False
    cost: float = 1.0
    calibrates: bool = False
    tie: Callable[[float], dict] | None = None  # extra options derived from the knob value
    between: Callable[[object, object], list] | None = None  # discrete: (ok, bad) -> option dicts
    extend: Callable[[object], list] | None = None  # discrete: ok (the most aggressive value) -> option dicts
    milder: tuple = ()  # discrete: option dicts tried when the mildest grid value is over the loss

    def options(self, value) -> dict:
        opts = {self.knob: value}
        if self.tie is not None:
            opts.update(self.tie(value))
        opts.update(dict(self.fixed))
        return opts


def _kivi_between(ok, bad) -> list:
    return [{"key_bits": ok, "value_bits": bad}, {"bits": ok, "residual": 32}]


def _fastkv_tie(budget: float) -> dict:
    return {"tsp_rate": max(budget, 0.2)}  # the KV budget is clamped to the propagated set (fastkv.py)


_BUDGETS = (0.5, 0.25, 0.125)

FAMILIES: tuple[Family, ...] = (
    # storage only (every token kept, fewer bits)
    Family("kivi", "kivi", "bits", (4, 2), cost=1.7, between=_kivi_between,
           extend=lambda ok: [{"bits": ok, "residual": 32}], milder=({"bits": 8},)),
    Family("logquant", "logquant", "bits", (4, 2), cost=1.6, between=lambda ok, bad: [{"bits": bad, "window": 84}],
           extend=lambda ok: [{"bits": ok, "window": 21}]),
    Family("kvquant", "kvquant", "bits", (4, 3, 2), fixed=(("calibration", "auto"),), cost=3.4, calibrates=True),
    # eviction (which tokens)
    Family("streaming", "streaming", "budget", _BUDGETS, continuous=True, cost=1.0),
    Family("h2o", "h2o", "budget", _BUDGETS, continuous=True, cost=1.7),
    Family("snapkv", "snapkv", "budget", _BUDGETS, continuous=True, cost=1.0),
    Family("fastkv", "fastkv", "budget", _BUDGETS, continuous=True, cost=1.0, tie=_fastkv_tie),
    Family("fastgen", "fastgen", "recovery", (0.95, 0.9), cost=1.6, milder=({"recovery": 0.99},)),
    # merging (where tokens live)
    Family("minicache", "minicache", "storage", ("fp16",), cost=1.3),
    # compositions: eviction x storage, merge x storage
    # (kept tokens in KIVI-4 with a 32-token fp16 residual: the paper's 128 would hold most of a small budget in fp16)
    Family("snapkv+kivi4", "snapkv", "budget", (0.5, 0.25), fixed=(("storage", "kivi"), ("bits", 4), ("residual", 32)),
           continuous=True, cost=1.7),
    Family("fastkv+kivi4", "fastkv", "budget", (0.5, 0.25), fixed=(("storage", "kivi"), ("bits", 4), ("residual", 32)),
           continuous=True, cost=1.7, tie=_fastkv_tie),
    Family("minicache+kivi4", "minicache", "storage", ("kivi",), fixed=(("bits", 4),), cost=2.0),
)


@dataclass
class Candidate:
    """One setting to measure."""

    family: str
    method: str
    options: dict
    stage: str  # coarse | refine | deferred
    value: object = None  # the knob value (None for an in-between option set)
    ratio: float | None = None  # from the probe

    @property
    def spec(self) -> str:
        return spec_string(self.method, self.options)


# ----------------------------------------------------------------------------------------------------------------------
# Pure search logic
# ----------------------------------------------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(ratio, loss)`` that no other point beats (ratio >= and loss <=, one strictly),
    sorted by ratio. Equal points are all kept."""
    front = []
    for i, (r, d) in enumerate(points):
        if not any((r2 >= r and d2 <= d) and (r2 > r or d2 < d) for j, (r2, d2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def pick_best(rows: list[dict], max_loss: float, min_ratio: float | None = None) -> dict | None:
    """The measured row (reference excluded) with the highest ratio among those with ``dppl_pct <= max_loss`` and
    ``ratio >= min_ratio``; ties go to the lower loss. None if no row qualifies."""
    ok = [r for r in rows if not r.get("reference") and r["dppl_pct"] <= max_loss
          and (min_ratio is None or r["ratio"] >= min_ratio)]
    return max(ok, key=lambda r: (r["ratio"], -r["dppl_pct"])) if ok else None


@dataclass
class _FamilyState:
    fam: Family
    grid_i: int = 0
    ok: object = None  # most aggressive knob value within the loss
    bad: object = None  # mildest knob value over the loss
    refines: int = 0
    extras: list | None = None  # discrete: option dicts still to try
    measured: int = 0
    seen: list = field(default_factory=list)  # option dicts already generated (no candidate twice)
    per_window: list = field(default_factory=list)  # seconds per window / reference seconds per window
    done: str | None = None  # why the family stopped early (refused, ...)
    pending: Candidate | None = None

    def make(self, options: dict, stage: str, value=None) -> Candidate | None:
        if options in self.seen:
            return None
        self.seen.append(options)
        return Candidate(self.fam.name, self.fam.method, options, stage, value)

    def next(self) -> Candidate | None:
        """The family's next candidate (coarse grid, then refinement), or None when it has nothing left."""
        fam = self.fam
        if self.done:
            return None
        if self.pending is not None:
            return self.pending
        if self.grid_i < len(fam.grid) and self.bad is None:
            value = fam.grid[self.grid_i]
            self.grid_i += 1
            self.pending = self.make(fam.options(value), "coarse", value)
            return self.pending if self.pending is not None else self.next()
        if fam.continuous:
            if self.refines >= REFINE_STEPS:
                return None
            if self.ok is not None and self.bad is not None:
                value = _round(math.sqrt(self.ok * self.bad))
            elif self.ok is not None:
                value = _round(self.ok / 2)
            elif self.bad is not None and self.refines == 0:
                value = _round(min(1.0, self.bad * 1.5))
            else:
                return None
            if value in (self.ok, self.bad) or value >= 1.0:
                return None
            self.refines += 1
            self.pending = self.make(fam.options(value), "refine", value)
            return self.pending if self.pending is not None else self.next()
        if self.extras is None:
            if self.ok is not None and self.bad is not None and fam.between is not None:
                self.extras = list(fam.between(self.ok, self.bad))
            elif self.ok is not None and self.bad is None and fam.extend is not None:
                self.extras = list(fam.extend(self.ok))
            elif self.ok is None and self.bad is not None:
                self.extras = list(fam.milder)
            else:
                self.extras = []
            self.extras = [dict(e, **dict(fam.fixed)) for e in self.extras]
        while self.extras:
            self.pending = self.make(self.extras.pop(0), "refine")
            if self.pending is not None:
                return self.pending
        return None

    def record(self, cand: Candidate, loss_ok: bool) -> None:
        """A measurement of ``cand`` (within the loss or not) moves the family's bounds."""
        self.pending = None
        self.measured += 1
        if cand.value is None:
            return
        if loss_ok:
            self.ok = cand.value if self.ok is None else min(self.ok, cand.value)
        else:
            self.bad = cand.value if self.bad is None else max(self.bad, cand.value)

    def untried(self) -> list[str]:
        """Specs of the coarse grid never generated (for the 'not tried' list)."""
        return [spec_string(self.fam.method, self.fam.options(v)) for v in self.fam.grid[self.grid_i:]]


def search(
    families,
    *,
    probe: Callable[[Candidate], float],
    measure: Callable[[Candidate, float], dict | None],
    estimate: Callable[[Candidate, float | None], float],
    max_loss: float,
    min_ratio: float | None,
    deadline: float,
    clock: Callable[[], float] = time.perf_counter,
    on_step: Callable[[str, Candidate], None] | None = None,
) -> dict:
    """Run the search (module docstring) until nothing is left or the next candidate does not fit before
    ``deadline`` (a ``clock()`` value).

    ``probe(c)`` -> stored-bytes ratio after one prefill (raises KVCompressError if the method refuses);
    ``measure(c, deadline)`` -> row dict with at least ``ratio``, ``dppl_pct``, ``seconds_per_window`` (relative to
    the reference), or None if it gave up at the deadline; ``estimate(c, factor)`` -> seconds, ``factor`` the measured
    cost per window relative to the reference (None before the family's first measurement).
    Returns ``{"rows", "refused", "not_tried", "stopped_by_budget"}``."""
    states = [_FamilyState(f) for f in families]
    rows: list[dict] = []
    refused: list[dict] = []
    not_tried: list[dict] = []
    deferred: list[tuple[_FamilyState, Candidate]] = []
    stopped = False

    def factor(st: _FamilyState) -> float | None:
        return sum(st.per_window) / len(st.per_window) if st.per_window else None

    def best_ratio() -> float:
        b = pick_best(rows, max_loss, min_ratio)
        return b["ratio"] if b else 0.0

    def ready(st: _FamilyState) -> Candidate | None:
        """The family's next candidate that is worth measuring now (probing it, deferring it below min_ratio)."""
        while True:
            cand = st.next()
            if cand is None or cand.ratio is not None:
                return cand
            if clock() + estimate(cand, factor(st)) > deadline:
                return cand  # will not fit: not probed (a probe may calibrate), listed as not tried below
            try:
                cand.ratio = float(probe(cand))
            except KVCompressError as exc:
                refused.append({"spec": cand.spec, "family": st.fam.name, "reason": str(exc)})
                st.done = f"refused: {exc}"
                st.pending = None
                for spec in st.untried():
                    not_tried.append({"spec": spec, "reason": f"{st.fam.method} refused (see refused)"})
                st.grid_i = len(st.fam.grid)
                return None
            if min_ratio is not None and cand.ratio < min_ratio:
                cand.stage = "deferred"
                deferred.append((st, cand))
                st.pending = None
                continue  # the next (more aggressive) setting of the family
            return cand

    while True:
        pending = [(st, c) for st in states if (c := ready(st)) is not None]
        if not pending:
            break
        now, bratio = clock(), best_ratio()

        def key(item):
            st, c = item
            stage = {"coarse": 0, "refine": 1}[c.stage]
            return (stage, c.ratio is not None and c.ratio <= bratio, st.measured, estimate(c, factor(st)))

        pending.sort(key=key)
        fits = [(st, c) for st, c in pending if now + estimate(c, factor(st)) <= deadline]
        if not fits:
            stopped = True
            for st, c in pending:
                not_tried.append({"spec": c.spec, "probed_ratio": c.ratio,
                                  "reason": f"time budget (estimated {estimate(c, factor(st)):.0f} s, "
                                            f"{max(deadline - now, 0):.0f} s left)"})
                st.pending, st.done = None, "budget"
                not_tried.extend({"spec": s, "reason": "time budget"} for s in st.untried())
            break
        st, cand = fits[0]
        if on_step:
            on_step("measure", cand)
        row = measure(cand, deadline)
        if row is None:
            stopped = True
            not_tried.append({"spec": cand.spec, "reason": "time budget (stopped during its measurement)"})
            st.pending, st.done = None, "budget"
            not_tried.extend({"spec": s, "reason": "time budget"} for s in st.untried())
            for other in states:
                if other is not st and not other.done:
                    if other.pending is not None:
                        not_tried.append({"spec": other.pending.spec, "reason": "time budget"})
                    not_tried.extend({"spec": s, "reason": "time budget"} for s in other.untried())
                    other.pending, other.done = None, "budget"
            break
        row = dict(row, family=st.fam.name, stage=cand.stage, spec=cand.spec, method=cand.method,
                   options=dict(cand.options))
        rows.append(row)
        st.per_window.append(row["seconds_per_window"])
        loss_ok = row["dppl_pct"] <= max_loss
        st.record(cand, loss_ok)
        if not loss_ok and st.grid_i < len(st.fam.grid) and cand.stage == "coarse":
            worse = st.untried()
            not_tried.extend({"spec": s, "reason": f"pruned: the milder {cand.spec} already lost "
                                                   f"{row['dppl_pct']:+.2f} % > {max_loss:g} %"} for s in worse)
            st.grid_i = len(st.fam.grid)
        if on_step:
            on_step("done", cand)

    # deferred (below min_ratio): the frontier only, cheapest first, while time is left
    for st, cand in sorted(deferred, key=lambda sc: estimate(sc[1], factor(sc[0]))):
        if stopped or clock() + estimate(cand, factor(st)) > deadline:
            not_tried.append({"spec": cand.spec, "reason": f"below min ratio ({cand.ratio:.2f}x < {min_ratio:g}x), "
                                                           "not measured: time budget"})
            continue
        if on_step:
            on_step("measure", cand)
        row = measure(cand, deadline)
        if row is None:
            stopped = True
            not_tried.append({"spec": cand.spec, "reason": "time budget (stopped during its measurement)"})
            continue
        st.per_window.append(row["seconds_per_window"])
        rows.append(dict(row, family=st.fam.name, stage="deferred", spec=cand.spec, method=cand.method,
                         options=dict(cand.options)))
        if on_step:
            on_step("done", cand)
    return {"rows": rows, "refused": refused, "not_tried": not_tried, "stopped_by_budget": stopped}


# ----------------------------------------------------------------------------------------------------------------------
# Measuring on the model (the evaluation protocol)
# ----------------------------------------------------------------------------------------------------------------------


class _Bench:
    """The windows, the full cache's log-probabilities on each, and the protocol for one candidate."""

    def __init__(self, model, windows: torch.Tensor, prompt_len: int, seed: int = 0, clock=time.perf_counter):
        self.model, self.windows, self.prompt_len, self.seed, self.clock = model, windows, prompt_len, seed, clock
        self.ref: list[torch.Tensor] = []
        self.ref_seconds = None  # per window

    def _run(self, spec: str, window: torch.Tensor):
        from .evaluate import parse_spec
        from .evaluate.ppl import teacher_force

        with parse_spec(spec).make(self.model) as cache:
            return teacher_force(self.model, cache, window, self.prompt_len)

    def reference(self) -> dict:
        from .evaluate.ppl import compare, summarize
        from .evaluate.memory import summarize as mem

        t0 = self.clock()
        got = [self._run("full", w) for w in self.windows]
        self.ref = [g.logprobs for g in got]
        self.ref_seconds = (self.clock() - t0) / len(self.windows)
        per = [compare(r, r, w[self.prompt_len:]) for r, w in zip(self.ref, self.windows)]
        return {"ppl": summarize(per)["ppl"], "ratio": mem([g.memory_prefill for g in got])["ratio"],
                "seconds_per_window": 1.0, "seconds": self.ref_seconds * len(self.windows)}

    def probe(self, cand: Candidate) -> float:
        import torch

        from .compat import cache_kwargs
        from .evaluate import parse_spec

        ids = self.windows[0, : self.prompt_len].view(1, -1)
        with torch.inference_mode(), parse_spec(cand.spec).make(self.model) as cache:
            self.model(input_ids=ids, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1)
            return cache.memory_report().ratio

    def measure(self, cand: Candidate, deadline: float, factor: float | None, prior: float) -> dict | None:
        import torch

        from .evaluate.memory import summarize as mem
        from .evaluate.ppl import compare, summarize

        per, pre, end = [], [], []
        t0 = self.clock()
        for i, w in enumerate(self.windows):
            spent = (self.clock() - t0) / i if i else self.ref_seconds * (factor or prior)
            if self.clock() + spent > deadline:
                return None
            torch.manual_seed(self.seed)
            got = self._run(cand.spec, w)
            per.append(compare(self.ref[i], got.logprobs, w[self.prompt_len:]))
            pre.append(got.memory_prefill)
            end.append(got.memory_end)
        seconds = self.clock() - t0
        s = summarize(per)
        return {
            "ratio": mem(pre)["ratio"],
            "ratio_end": mem(end)["ratio"],
            "ppl": s["ppl"],
            "kl": s["kl"],
            "agreement": s["agreement"],
            "seconds": seconds,
            "seconds_per_window": seconds / len(self.windows) / self.ref_seconds,
            "_nll": s["nll"],
        }


def _calibrated(model) -> bool:
    try:
        from .calibration.kvquant import auto_calibration_path

        return auto_calibration_path(model).is_file()
    except Exception:  # noqa: BLE001 -- no calibration module / fingerprint: treat as not calibrated
        return False


def tune(
    model="smollm2-135m",
    data=None,
    *,
    max_loss="2%",
    min_ratio: float | None = None,
    budget_minutes: float = DEFAULT_BUDGET_MINUTES,
    tokenizer=None,
    families=None,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    cont_len: int = DEFAULT_CONT_LEN,
    windows: int = DEFAULT_WINDOWS,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Search methods, settings and compositions for ``model`` on ``data`` (a file, directory, ``pydoc``, ...; see
    :func:`kvcompress.data.load_text`) and return the frontier and the best setting within ``max_loss`` (percent,
    ``"2%"`` or 2) and ``min_ratio`` (x), stopping within ``budget_minutes`` (model loading included).

    ``families``: names from :data:`FAMILIES` to search (default all). ``model``: a name for
    :func:`kvcompress.load_model`, or a loaded model with its ``tokenizer``. Writes ``tune.json`` (+ ``pareto.png``)
    under ``out`` when given. Bad input raises one KVCompressError before any model work."""
    import torch

    started = clock()
    max_loss = parse_loss(max_loss)
    min_ratio = _check_min_ratio(min_ratio)
    budget_s = _check_budget(budget_minutes)
    deadline = started + budget_s
    _check_int(prompt_len, "prompt_len", 1)
    _check_int(cont_len, "cont_len", 2)
    _check_int(windows, "windows", 1)
    if data is None:
        raise KVCompressError("tune needs data: your own text (a file, a directory of .txt, or 'pydoc')")
    known = {f.name: f for f in FAMILIES}
    if families is None:
        fams = list(FAMILIES)
    else:
        bad = [f for f in families if f not in known]
        if bad or not families:
            raise KVCompressError(f"unknown famil(ies) {', '.join(map(repr, bad)) or '(none given)'}; "
                                  f"known: {', '.join(known)}")
        fams = [known[f] for f in families]
    from . import __version__
    from .data import encode, load_text, text_sha256, windows_from_ids

    text = load_text(data)
    from .models import model_and_tokenizer

    model, tokenizer, model_name = model_and_tokenizer(model, tokenizer, "tune", progress)
    from .cache import ModelGeometry

    geometry = ModelGeometry.from_model(model)
    if geometry.max_positions is not None and prompt_len + cont_len > geometry.max_positions:
        raise KVCompressError(f"prompt_len + cont_len = {prompt_len + cont_len} tokens exceeds the model's maximum "
                              f"of {geometry.max_positions} positions")
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    wins = windows_from_ids(ids, prompt_len + cont_len, windows, seed)
    load_s = clock() - started

    bench = _Bench(model, wins, prompt_len, seed, clock)
    bar = _bar(progress, budget_s)
    ref = bench.reference()
    ref_row = {"spec": "full", "method": "full", "options": {}, "family": "full", "stage": "reference",
               "reference": True, "ratio": ref["ratio"], "ratio_end": ref["ratio"], "ppl": ref["ppl"], "kl": 0.0,
               "agreement": 1.0, "dppl_pct": 0.0, "seconds": ref["seconds"], "seconds_per_window": 1.0}
    _bar_to(bar, clock() - started, "full (reference)")
    ref_ppl = ref["ppl"]
    calibration = {"needed": any(f.calibrates for f in fams) and not _calibrated(model), "seconds": None}
    fam_by_name = {f.name: f for f in fams}

    def estimate(cand: Candidate, factor: float | None) -> float:
        fam = fam_by_name[cand.family]
        s = bench.ref_seconds * len(wins) * (factor if factor is not None else fam.cost)
        if fam.calibrates and calibration["needed"]:
            s += bench.ref_seconds * KVQUANT_CALIBRATION_WINDOWS
        return s

    def probe(cand: Candidate) -> float:
        fam = fam_by_name[cand.family]
        if fam.calibrates and calibration["needed"]:
            need = estimate(cand, None)
            if clock() + need > deadline:
                raise KVCompressError(f"{fam.method} needs its first-use calibration (estimated {need:.0f} s with one "
                                      "measurement) and that does not fit the time left; run `kvcompress calibrate "
                                      f"{fam.method}` or make_cache(..., calibration='auto') once, then tune again")
            t0 = clock()
            try:
                return bench.probe(cand)
            finally:
                calibration.update(needed=False, seconds=clock() - t0)
        return bench.probe(cand)

    def measure(cand: Candidate, dl: float) -> dict | None:
        fam = fam_by_name[cand.family]
        factors = [r["seconds_per_window"] for r in rows_so_far if r["family"] == fam.name]
        got = bench.measure(cand, dl, sum(factors) / len(factors) if factors else None, fam.cost)
        if got is None:
            return None
        got["dppl_pct"] = 100.0 * (math.exp(got.pop("_nll")) / ref_ppl - 1.0)
        rows_so_far.append(dict(got, family=fam.name))
        return got

    rows_so_far: list[dict] = []

    def on_step(what: str, cand: Candidate) -> None:
        if what == "measure":
            bar.set_postfix_str(cand.spec[:60])
        else:
            _bar_to(bar, clock() - started, cand.spec)

    found = search(fams, probe=probe, measure=measure, estimate=estimate, max_loss=max_loss, min_ratio=min_ratio,
                   deadline=deadline, clock=clock, on_step=on_step)
    bar.close()

    rows = [ref_row] + found["rows"]
    for r in rows:
        r["meets"] = bool(not r.get("reference") and r["dppl_pct"] <= max_loss
                          and (min_ratio is None or r["ratio"] >= min_ratio))
    front = pareto_front([(r["ratio"], r["dppl_pct"]) for r in rows])
    for i, r in enumerate(rows):
        r["frontier"] = i in front
    best = pick_best(rows, max_loss, min_ratio)
    result = {
        "kvcompress_version": __version__,
        "command": command,
        "model": {"name": str(model_name) if model_name is not None else geometry.model_id, "id": geometry.model_id,
                  "dtype": str(geometry.dtype)},
        "data": {"source": str(data), "sha256": text_sha256(text), "tokens": int(ids.numel())},
        "config": {"max_loss_pct": max_loss, "min_ratio": min_ratio, "budget_s": budget_s, "prompt_len": prompt_len,
                   "cont_len": cont_len, "windows": windows, "seed": seed, "families": [f.name for f in fams],
                   "threads": torch.get_num_threads(), "ratio": "stored-bytes ratio after the prefill (memory_report)"},
        "reference": {"spec": "full", "ppl": ref_ppl, "seconds": ref["seconds"]},
        "rows": rows,
        "frontier": [rows[i]["spec"] for i in front],
        "best": _best_entry(best),
        "refused": found["refused"],
        "not_tried": found["not_tried"],
        "stopped_by_budget": found["stopped_by_budget"],
        "calibration": calibration,
        "timings": {"load_s": load_s, "total_s": clock() - started},
    }
    if out is not None:
        result["files"] = write_outputs(result, out)
    return result


def _best_entry(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"spec": row["spec"], "make_cache": make_cache_call(row["method"], row["options"]), "ratio": row["ratio"],
            "dppl_pct": row["dppl_pct"], "ppl": row["ppl"], "family": row["family"]}


def _bar(progress: bool, budget_s: float):
    from tqdm.auto import tqdm

    return tqdm(total=round(budget_s), desc="tune (s of budget)", unit="s", disable=not progress, file=sys.stderr,
                leave=False, dynamic_ncols=True)


def _bar_to(bar, elapsed: float, what: str) -> None:
    bar.n = min(round(elapsed), bar.total)
    bar.set_postfix_str(f"done {what}"[:60])
    bar.refresh()


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


def summary_lines(result: dict) -> list[str]:
    """Plain-text closing lines: the best choice (make_cache call and CLI spec), or why there is none."""
    cfg = result["config"]
    want = f"Δppl <= {cfg['max_loss_pct']:g} %" + (f" and ratio >= {cfg['min_ratio']:g}x" if cfg["min_ratio"] else "")
    best = result["best"]
    if best is None:
        lines = [f"no measured setting meets {want}."]
        near = [r for r in result["rows"] if r["frontier"] and not r.get("reference")]
        if near:
            lines.append("frontier: " + "; ".join(f"{r['spec']} {r['ratio']:.2f}x {r['dppl_pct']:+.2f} %" for r in near))
    else:
        lines = [
            f"best within {want}: {best['spec']} -- {best['ratio']:.2f}x smaller, Δppl {best['dppl_pct']:+.2f} % "
            f"(ppl {best['ppl']:.3f} vs full {result['reference']['ppl']:.3f}, same windows, same run)",
            f"  python: {best['make_cache']}",
            f"  cli:    kvcompress eval --methods full {shlex.quote(best['spec'])}",
        ]
    n = len(result["not_tried"])
    if n:
        why: dict[str, int] = {}
        for t in result["not_tried"]:
            k = t["reason"].split(":")[0].split(" (")[0]
            why[k] = why.get(k, 0) + 1
        lines.append(f"not tried: {n} ({', '.join(f'{v} {k}' for k, v in why.items())}; the list is in the JSON)")
    for r in result["refused"]:
        lines.append(f"refused: {r['spec']}: {r['reason'][:160]}")
    return lines


def rich_table(result: dict):
    """Measured rows by ratio: frontier marked ``*``, the best ``best``."""
    from rich.table import Table

    cfg = result["config"]
    t = Table(title=f"kvcompress tune: {result['model']['name']} on {result['data']['source']}",
              caption=f"P = {cfg['prompt_len']}, C = {cfg['cont_len']}, {cfg['windows']} windows; ratio = fp16 bytes / "
                      "bytes held after the prefill; Δppl vs full on the same windows")
    for h in ("", "spec", "stage", "ratio", "Δppl %", "KL", "top-1", "s/window (x full)"):
        t.add_column(h, justify="left" if h in ("", "spec", "stage") else "right")
    best = (result["best"] or {}).get("spec")
    for r in sorted(result["rows"], key=lambda r: (r["ratio"], -r["dppl_pct"])):
        mark = "best" if r["spec"] == best else ("*" if r["frontier"] else "")
        t.add_row(mark, r["spec"], r["stage"], f"{r['ratio']:.2f}x", f"{r['dppl_pct']:+.2f}", f"{r['kl']:.3g}",
                  f"{100 * r['agreement']:.1f} %", f"{r['seconds_per_window']:.2f}")
    return t


def markdown(result: dict) -> str:
    """The frontier and best choice as Markdown (for RESULTS.md / the README)."""
    cfg = result["config"]
    lines = []
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    lines.append(f"model {result['model']['name']}; data {result['data']['source']} (sha256 "
                 f"{result['data']['sha256'][:12]}); P = {cfg['prompt_len']}, C = {cfg['cont_len']}, "
                 f"{cfg['windows']} windows; max loss {cfg['max_loss_pct']:g} %"
                 + (f", min ratio {cfg['min_ratio']:g}x" if cfg["min_ratio"] else "")
                 + f"; budget {cfg['budget_s'] / 60:g} min, used {result['timings']['total_s'] / 60:.1f} min; "
                 f"{cfg['threads']} thread(s)")
    lines += ["", "| | spec | stage | ratio | Δppl % | KL | top-1 |", "|---|---|---|---:|---:|---:|---:|"]
    best = (result["best"] or {}).get("spec")
    for r in sorted(result["rows"], key=lambda r: (r["ratio"], -r["dppl_pct"])):
        mark = "**best**" if r["spec"] == best else ("frontier" if r["frontier"] else "")
        lines.append(f"| {mark} | `{r['spec']}` | {r['stage']} | {r['ratio']:.2f}x | {r['dppl_pct']:+.2f} | "
                     f"{r['kl']:.3g} | {100 * r['agreement']:.1f} % |")
    lines += [""] + summary_lines(result)
    if result["not_tried"]:
        lines += ["", "Not tried:"] + [f"- `{t['spec']}`: {t['reason']}" for t in result["not_tried"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out) -> dict:
    """``tune.json``, ``tune.md`` and ``pareto.png`` under ``out``; returns their paths."""
    from .evaluate.report import write_json
    from .plots import frontier_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "tune.json"), "markdown": str(out / "tune.md"), "plot": str(out / "pareto.png")}
    pts = [(r["ratio"], r["dppl_pct"], r["spec"]) for r in result["rows"]]
    cfg = result["config"]
    title = (f"kvcompress tune: {result['model']['name']}, P={cfg['prompt_len']}, C={cfg['cont_len']}, "
             f"{cfg['windows']} windows")
    frontier_plot(pts, files["plot"], title=title, max_loss=cfg["max_loss_pct"], min_ratio=cfg["min_ratio"],
                  best=(result["best"] or {}).get("spec"), label="frontier")
    result = dict(result, files=files)
    write_json(result, Path(files["json"]))
    Path(files["markdown"]).write_text(markdown(result))
    return files


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, .gguf file, local directory or HF id")
    p.add_argument("--data", required=True, help="your text: a file, a directory of .txt, 'pydoc' or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--max-loss", default="2%", help="perplexity increase allowed vs the full cache, e.g. 2%% (default 2%%)")
    p.add_argument("--min-ratio", type=float, default=None, help="smallest stored-bytes ratio accepted, e.g. 4")
    p.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                   help=f"stop within this many minutes, model loading included (default {DEFAULT_BUDGET_MINUTES:g})")
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="search only these (default all): " + " ".join(f.name for f in FAMILIES))
    p.add_argument("--prompt-len", type=int, default=DEFAULT_PROMPT_LEN, help=f"P (default {DEFAULT_PROMPT_LEN})")
    p.add_argument("--cont-len", type=int, default=DEFAULT_CONT_LEN, help=f"C (default {DEFAULT_CONT_LEN})")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help=f"P+C windows (default {DEFAULT_WINDOWS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default results/tune-<timestamp>)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from rich.console import Console

    from .config import set_threads

    set_threads(args.threads)
    out = args.out or f"results/tune-{time.strftime('%Y%m%d-%H%M%S')}"
    result = tune(args.model, args.data, max_loss=args.max_loss, min_ratio=args.min_ratio,
                  budget_minutes=args.budget_minutes, families=args.families, prompt_len=args.prompt_len,
                  cont_len=args.cont_len, windows=args.windows, seed=args.seed, out=out,
                  progress=not args.no_progress, command=shlex.join(["kvcompress"] + sys.argv[1:]))
    console = Console(width=max(Console().width, 140))
    console.print(rich_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False, markup=False)
    console.print(f"wrote {', '.join(result['files'].values())} ({result['timings']['total_s']:.0f} s of "
                  f"{result['config']['budget_s']:.0f} s)")
    return 0


class _CallableModule(type(sys)):
    """``kvcompress.tune`` is this module *and* the function: ``kvcompress.tune(model, data, ...)`` runs :func:`tune`
    (importing the module would otherwise replace a function of that name on the package)."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

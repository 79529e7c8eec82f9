"""Method spec strings ``"name[:opt=value,opt=value]"`` -> validated :class:`MethodSpec`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..cache import make_cache
from ..registry import KVCompressError, get_method, list_methods

# split "a=1,b=(1,2),c='x'" on the commas that start a new ``name=`` pair
_PAIR_SPLIT = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")


@dataclass(frozen=True)
class MethodSpec:
    """One method with its options. ``label`` is the spec string as the user wrote it (the row name)."""

    name: str
    options: tuple[tuple[str, object], ...]
    label: str

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    def make(self, model):
        """A fresh cache for ``model`` (use as a context manager: methods with hooks remove them on close)."""
        return make_cache(self.name, model, **self.kwargs)


def parse_spec(text: str) -> MethodSpec:
    """``"kivi:bits=2,residual=64"`` -> ``MethodSpec("kivi", (("bits", 2), ("residual", 64)))``.

    Values go through ``ast.literal_eval`` (strings may be left unquoted), like ``kvcompress generate -o``."""
    from ..cli import parse_options

    label = str(text).strip()
    name, _, rest = label.partition(":")
    name = name.strip()
    if not name:
        raise KVCompressError(f"bad method spec {text!r}; write name[:opt=value,opt=value]")
    get_method(name)  # unknown method -> one clear error listing the known ones
    pairs = [p for p in _PAIR_SPLIT.split(rest) if p.strip()] if rest.strip() else []
    options = parse_options(pairs)
    return MethodSpec(name, tuple(options.items()), label)


def validate_specs(specs: list[MethodSpec], model) -> list[str]:
    """Build each cache once (config + model checks happen in ``make_cache``) before any evaluation work.
    Returns ``describe()`` strings; raises the method's KVCompressError on bad options."""
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise KVCompressError(f"method spec(s) given twice: {', '.join(dup)}")
    described = []
    for spec in specs:
        with spec.make(model) as cache:
            described.append(cache.method.describe())
    return described


def needs_calibration(method_cls) -> bool:
    """True if the method cannot run with default options: it says so (``requires_calibration``) or its
    Config has a field without a default."""
    if getattr(method_cls, "requires_calibration", False):
        return True
    return any(
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        for f in dataclasses.fields(method_cls.Config)
    )


# `make eval`'s rows: every registered method at one documented operating point. Budgets are shares of the prompt,
# so no row keeps the whole P-token prompt (streaming's own default, a 2000-token window, would); the eviction rows
# sit at 4x, next to the 2-4 bit storage rows, and one composition shows eviction x storage. A method not listed here
# runs with its defaults (plus its ``default_options``).
EVAL_POINTS: dict[str, tuple[str, ...]] = {
    "full": ("full",),
    "kivi": ("kivi:bits=4",),  # the low-loss row (the paper's 2 bits: logquant's row shows 2-bit storage)
    "streaming": ("streaming:budget=0.25",),  # sinks + recent window = 1/4 of the prompt (4x)
    "h2o": ("h2o:budget=0.25",),  # 1/8 heavy hitters + 1/8 recent (4x)
    "snapkv": (
        "snapkv:budget=0.25",  # 4x
        "snapkv:budget=0.5,storage=kivi,bits=4,residual=32",  # composition: half the prompt, kept in KIVI-4
    ),
    "kvquant": ("kvquant:calibration=auto",),  # 3-bit nuq + 1 % outliers, calibrated once per model (cached)
    "logquant": ("logquant",),  # 2-bit + log-spaced fp16 tokens (the paper's)
    "minicache": ("minicache",),  # merges only adjacent layers measured similar; else refuses (reason in the table)
    "fastgen": ("fastgen",),  # recovery 0.95 (the paper's)
    "fastkv": ("fastkv:budget=0.25,tsp_rate=0.25",),  # 4x (the KV budget is clamped to the propagated set)
}


def default_specs(model) -> tuple[list[MethodSpec], list[dict]]:
    """Every registered method at its operating point of :data:`EVAL_POINTS` (else its default options plus the
    method's ``default_options``, e.g. kvquant's ``calibration="auto"``: calibrated once per model on first use,
    cached); a method that cannot be built that way on this model (it needs a calibration file, or refuses the model,
    as MiniCache does when no adjacent layers are similar) is returned with the reason instead."""
    from ..registry import _METHOD_MODULES

    specs, skipped = [], []
    order = {n: i for i, n in enumerate(_METHOD_MODULES)}
    for name, cls in sorted(list_methods().items(), key=lambda kv: order.get(kv[0], len(order))):
        if name in EVAL_POINTS:
            points = [parse_spec(p) for p in EVAL_POINTS[name]]
        else:
            extra = dict(getattr(cls, "default_options", None) or {})
            if needs_calibration(cls) and not extra:
                skipped.append({"method": name, "reason": "needs a calibration file (no default); pass it explicitly"})
                continue
            label = name + (":" + ",".join(f"{k}={v}" for k, v in extra.items()) if extra else "")
            points = [MethodSpec(name, tuple(extra.items()), label)]
        for spec in points:
            try:
                with spec.make(model):
                    pass
            except KVCompressError as exc:
                skipped.append({"method": spec.label, "reason": f"refused: {exc}"})
                continue
            specs.append(spec)
    return specs, skipped

"""Method registry: ``name -> method class``.

Each method module defines a frozen config dataclass and a :class:`kvcompress.cache.Method` subclass and
registers it with ``@register("name")``. ``make_cache`` looks methods up here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .cache import Method

_METHODS: dict[str, type["Method"]] = {}

# Modules that register methods when imported (kept explicit: no import-time magic beyond this list).
_METHOD_MODULES = (
    "full",
    "kivi",
    "streaming",
    "h2o",
    "snapkv",
    "kvquant",
    "logquant",
    "minicache",
    "fastgen",
    "fastkv",
)


class KVCompressError(ValueError):
    """One clear error for bad input: unknown method, bad config values, unsupported architecture..."""


def register(name: str):
    """Class decorator: ``@register("kivi")`` on a ``Method`` subclass."""

    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise KVCompressError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(f"kvcompress.methods.{mod}")
        except ModuleNotFoundError as exc:  # a method not written yet is simply not registered
            if exc.name != f"kvcompress.methods.{mod}":
                raise


def list_methods() -> dict[str, type["Method"]]:
    """All registered methods, ``name -> class``, sorted by name order of registration."""
    _load_all()
    return dict(_METHODS)


def get_method(name: str) -> type["Method"]:
    methods = list_methods()
    if name not in methods:
        known = ", ".join(sorted(methods))
        raise KVCompressError(f"unknown method {name!r}; known methods: {known}")
    return methods[name]


def build_config(method_cls: type["Method"], options: dict):
    """Instantiate ``method_cls.Config`` from keyword options, with one clear error for unknown names."""
    fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise KVCompressError(
            f"unknown option(s) {', '.join(unknown)} for method {method_cls.name!r}; "
            f"its options are: {', '.join(sorted(fields))}"
        )
    try:
        return method_cls.Config(**options)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, KVCompressError):
            raise
        raise KVCompressError(f"bad config for method {method_cls.name!r}: {exc}") from exc


def config_defaults(method_cls: type["Method"]) -> dict:
    """``{field: default}`` of a method's config (for ``kvcompress list``)."""
    out = {}
    for f in dataclasses.fields(method_cls.Config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out

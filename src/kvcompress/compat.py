"""The one place that knows how transformers spells the cache between releases.

transformers up to 5.2x passes the cache to models and attention modules as ``past_key_values=``; newer
releases call it ``cache=`` (the old name is deprecated with a warning). kvcompress reads whichever is there
(:func:`cache_in`) and passes the one the installed release expects (:func:`cache_kwargs`), so a user sees no
deprecation warning caused by us.
"""

from __future__ import annotations

import functools
import inspect

NAMES = ("cache", "past_key_values")


def cache_in(kwargs: dict):
    """The cache a forward (or forward pre-hook) received, under either name; ``None`` if none."""
    for name in NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def uses_cache(kwargs: dict, cache) -> bool:
    """Does the forward whose keyword arguments are ``kwargs`` use ``cache``?"""
    return cache is not None and cache_in(kwargs) is cache


@functools.lru_cache(maxsize=None)
def _keyword_of(fn) -> str:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return default_keyword()
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return default_keyword()


@functools.lru_cache(maxsize=1)
def default_keyword() -> str:
    """``"cache"`` where the installed transformers' generation API names it so, else ``"past_key_values"``."""
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model=None) -> str:
    """The keyword ``model.forward`` / ``model.generate`` take the cache under in the installed transformers."""
    if model is None:
        return default_keyword()
    forward = getattr(type(model), "forward", None)
    return _keyword_of(forward) if forward is not None else default_keyword()


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model`` expects:
    ``model(input_ids=ids, **cache_kwargs(model, cache))``, ``model.generate(**inputs, **cache_kwargs(model, cache))``."""
    return {cache_keyword(model): cache}

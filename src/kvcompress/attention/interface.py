"""kvcompress's attention function, registered through transformers' public ``AttentionInterface``.

:func:`install` (called by ``make_cache``) sets the model's attention implementation to ``kvcompress_<inner>``,
where ``<inner>`` is what the model used (``sdpa`` or ``eager``). The registered function looks at the keys it is
handed: a cache layer that attends by itself (``KVLayer.attends``) returns the step's new keys from ``update()``
marked with itself, and the function answers with ``layer.attend(...)``. Anything else — a forward with another
cache or none, or a layer that leaves attention to transformers — goes to the inner implementation with the
same arguments, so its result is the inner one's, bit for bit.

The mask function is the inner one; when the forward has a 2-D padding mask, the built mask carries it as an
attribute, so a layer knows which of the step's new tokens are padding. Nothing global is touched at import and
no state is shared between calls: the mark travels with the keys, so two caches used from two threads on one
model never see each other.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..registry import KVCompressError

INNER = ("sdpa", "eager")
PREFIX = "kvcompress_"
LAYER_MARK = "_kvcompress_layer"  # attribute of the keys a self-attending layer returns from update()
PADDING_MARK = "_kvcompress_padding"  # attribute of the mask: the forward's 2-D padding mask (batch, tokens)


def implementation_name(inner: str) -> str:
    return PREFIX + inner


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _inner_function(inner: str):
    return _eager if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]


def kvcompress_attention(module, query, key, value, attention_mask, *, inner: str, **kwargs):
    """The registered attention function (see the module docstring). ``query (b, heads, q, d)``."""
    layer = getattr(key, LAYER_MARK, None)
    if layer is None:
        return _inner_function(inner)(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None:
        raise KVCompressError("kvcompress attention does not implement logit soft-capping (Gemma-2 style models)")
    padding = getattr(attention_mask, PADDING_MARK, None) if attention_mask is not None else None
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return layer.attend(query, key, value, padding, float(scaling)), None


def kvcompress_mask(*args, inner: str, attention_mask=None, **kwargs):
    """The inner mask, carrying the forward's 2-D padding mask ``(batch, tokens)`` bool when there is one."""
    mask = ALL_MASK_ATTENTION_FUNCTIONS[inner](*args, attention_mask=attention_mask, **kwargs)
    if isinstance(mask, torch.Tensor) and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        setattr(mask, PADDING_MARK, attention_mask.to(torch.bool))
    return mask


def register(inner: str) -> str:
    """Register ``kvcompress_<inner>`` (idempotent) and return its name."""
    if inner not in INNER:
        raise KVCompressError(
            f"kvcompress attends through the model's sdpa or eager attention; this model uses {inner!r} "
            "(load it with attn_implementation='sdpa')"
        )
    name = implementation_name(inner)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, partial(kvcompress_attention, inner=inner))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, partial(kvcompress_mask, inner=inner))
    return name


def _configs(model):
    seen, out = set(), []
    for cfg in (model.config, model.config.get_text_config(decoder=True)):
        if id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def install(model) -> str:
    """Route ``model``'s attention through kvcompress (idempotent). Forwards that do not use a kvcompress cache
    still get the model's own implementation, with the same arguments. Returns the implementation name."""
    names = []
    for cfg in _configs(model):
        current = cfg._attn_implementation or "eager"
        if current.startswith(PREFIX):
            names.append(current)
            continue
        name = register(current)
        cfg._attn_implementation = name
        names.append(name)
    return names[-1]


def _own_implementation(cfg) -> str:
    """``cfg``'s attention implementation without kvcompress's prefix."""
    current = cfg._attn_implementation or "eager"
    return current[len(PREFIX) :] if current.startswith(PREFIX) else current


def uninstall(model) -> None:
    """Give ``model`` its own attention implementation back (caches made for it stop attending by themselves)."""
    for cfg in _configs(model):
        if (cfg._attn_implementation or "").startswith(PREFIX):
            cfg._attn_implementation = _own_implementation(cfg)


def inner_of(model) -> str:
    """The model's own implementation (``sdpa`` / ``eager``), whether or not kvcompress is installed."""
    return _own_implementation(model.config.get_text_config(decoder=True))

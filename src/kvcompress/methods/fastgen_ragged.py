"""Ragged attention for FastGen: KV heads holding different numbers of tokens, in one transformers forward.

transformers builds one mask per forward and calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the K/V the cache layer returned. A FastGen layer returns ``(batch, kv_heads, Lmax + q, head_dim)``: each
head's kept past tokens, zero-padded to the longest head, then the ``q`` new tokens. The attention function
registered here (``kvcompress_ragged_sdpa`` / ``kvcompress_ragged_eager``) gives the padded slots no weight with a
per-head mask ``(batch, heads, q, Lmax + q)`` and then calls the model's own implementation (sdpa), or an eager
softmax when the layer needs this step's attention probabilities (the frequent policy). A layer with nothing
dropped gets the original call with transformers' own mask (bit-exact with the full cache).

:class:`FastGenHooks` switches ``config._attn_implementation`` to the ragged name only during the forward passes
that use *its* cache (decoder pre-hook / always-called post-hook restore it), captures the token ids and the 2-D
padding mask of the step, and hands each attention call its cache layer as the ``kvcompress_layer`` keyword
(attention-module pre-hook). Nothing in transformers is patched; two caches on one model do not see each other.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..attention.interface import inner_of
from ..compat import uses_cache
from ..observe import attention_modules
from ..registry import KVCompressError

INNER = ("sdpa", "eager")


def ragged_name(inner: str) -> str:
    return f"kvcompress_ragged_{inner}"


def register(inner: str) -> str:
    """Register the ragged attention (and its mask function: the inner one's) under :func:`ragged_name`."""
    if inner not in INNER:
        raise KVCompressError(f"fastgen runs on sdpa or eager attention; this model uses {inner!r}")
    name = ragged_name(inner)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, partial(ragged_attention, inner=inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def eager_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """Softmax attention returning ``(output (b, q, heads, d), probabilities (b, heads, q, k))``.

    ``query (b, heads, q, d)``, ``key``/``value (b, kv_heads, k, d)``: the query heads of a KV group are folded
    into the rows of one matmul (no repeated K/V). ``attention_mask``: additive float or bool (True = attend),
    ``(b or 1, heads or 1, q, k)``. Softmax in fp32, as transformers' eager path."""
    b, h, q, d = query.shape
    kv, k = key.shape[1], key.shape[2]
    weights = torch.matmul(query.reshape(b, kv, h // kv * q, d), key.transpose(2, 3)).view(b, h, q, k) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.view(b, kv, h // kv * q, k), value).view(b, h, q, -1)
    return out.transpose(1, 2).contiguous(), weights


def ragged_mask(attention_mask, lengths: torch.Tensor, past: int, q: int, group: int) -> torch.Tensor:
    """Bool mask ``(b, kv_heads * group, q, past + q)``: past slot ``j`` of KV head ``h`` is visible iff
    ``j < lengths[b, h]``; the new-token block comes from transformers' mask (its last ``q`` columns), or is
    causal when transformers skipped the mask."""
    b, kv = lengths.shape
    dev = lengths.device
    if attention_mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=dev).tril()[None, None]
    else:
        new = attention_mask[..., -q:]
        new = new if new.dtype == torch.bool else new == 0
    new = new.expand(b, kv * group, q, q)
    held = torch.arange(past, device=dev)[None, None, :] < lengths[:, :, None]  # (b, kv, past)
    held = held[:, :, None, None, :].expand(b, kv, group, q, past).reshape(b, kv * group, q, past)
    return torch.cat([held, new.to(dev)], dim=-1)


def ragged_attention(module, query, key, value, attention_mask, *, inner: str, kvcompress_layer=None, **kwargs):
    """The attention interface FastGen switches to. ``kvcompress_layer`` (the cache layer of this module, handed
    in by :class:`FastGenHooks`) says which past slots each head really holds and receives what it needs after
    attention: the queries/keys at the prompt (profiling), the probabilities at decode steps (frequent)."""
    call = eager_attention if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
    layer = kvcompress_layer
    if layer is None:  # sliding-window layers and anything FastGen does not manage
        return call(module, query, key, value, attention_mask, **kwargs)
    plan = layer.attention_plan()
    q = query.shape[2]
    dense = plan.dense and (attention_mask is None or attention_mask.shape[-1] == key.shape[2])
    if dense and not plan.needs_probs:
        out, weights = call(module, query, key, value, attention_mask, **kwargs)
        layer.after_attention(query, key, None, kwargs["scaling"])
        return out, weights
    mask = ragged_mask(attention_mask, plan.lengths, key.shape[2] - q, q, query.shape[1] // key.shape[1])
    if plan.needs_probs:
        out, weights = eager_attention(module, query, key, value, mask, **kwargs)
        layer.after_attention(query, key, weights, kwargs["scaling"])
        return out, weights
    if inner == "eager":
        out, weights = eager_attention(module, query, key, value, mask, **kwargs)
    else:
        out, weights = call(module, query, key, value, mask, **kwargs)
    layer.after_attention(query, key, None, kwargs["scaling"])
    return out, weights


# --------------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------------


class StepInputs:
    """Token ids ``(b, q)`` and real-token flags ``(b, q)`` (False = padding) of the forward pass in flight, and
    their token classes. ``tokens``: ``(special ids, punct ids)`` int32 or None."""

    def __init__(self, tokens=None):
        self.tokens = tokens
        self.clear()

    def set(self, ids: torch.Tensor, attention_mask) -> None:
        q = ids.shape[1]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.real = attention_mask[:, -q:].to(device=ids.device, dtype=torch.bool)
            self.all_real = bool(self.real.all())
        else:  # no 2-D padding mask: every token is real
            self.real = torch.ones_like(ids, dtype=torch.bool)
            self.all_real = True
        self.ids = ids

    def clear(self) -> None:
        self.ids = self.real = self._classes = None
        self.all_real = True

    def classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(special, punct)`` bool ``(b, q)`` of this step's tokens (computed once per forward)."""
        if self._classes is None:
            if self.tokens is None:
                none = torch.zeros_like(self.ids, dtype=torch.bool)
                self._classes = (none, none)
            else:
                special = torch.isin(self.ids, self.tokens[0].to(self.ids.device))
                self._classes = (special, torch.isin(self.ids, self.tokens[1].to(self.ids.device)) & ~special)
        return self._classes

    def get(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ids is None:
            raise KVCompressError(
                "fastgen saw K/V without the step's token ids: pass the cache to the model (cache=...) and the "
                "tokens as input_ids (not inputs_embeds), and do not use a closed cache"
            )
        if self.ids.shape[1] != q:
            raise KVCompressError(f"fastgen: {self.ids.shape[1]} token ids for {q} new K/V positions")
        return self.ids, self.real


class FastGenHooks:
    """The hooks of one FastGen cache (removed by :meth:`remove`, which the cache calls on ``close()``)."""

    def __init__(self, model, cache, inputs: StepInputs, layers: list[int]):
        self._cache_ref = weakref.ref(cache)
        self.inputs = inputs
        modules = attention_modules(model)
        self.config = modules[layers[0]].config if layers else model.config
        self.name = register(inner_of(model))
        self._saved: str | None = None
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self._handles = [
            decoder.register_forward_pre_hook(self._enter, with_kwargs=True),
            decoder.register_forward_hook(self._exit, with_kwargs=True, always_call=True),
        ]
        self._handles += [modules[i].register_forward_pre_hook(partial(self._hand_layer, i), with_kwargs=True) for i in layers]

    def _ours(self, kwargs) -> bool:
        return uses_cache(kwargs, self._cache_ref())

    def _enter(self, module, args, kwargs):
        if not self._ours(kwargs):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise KVCompressError("fastgen needs input_ids (its special/punctuation policies go by token id), not inputs_embeds")
        self.inputs.set(ids, kwargs.get("attention_mask"))
        self._saved = self.config._attn_implementation
        self.config._attn_implementation = self.name
        return None

    def _exit(self, module, args, kwargs, output):
        if self._saved is not None:
            self.config._attn_implementation = self._saved
            self._saved = None
            self.inputs.clear()
        return None

    def _hand_layer(self, layer_idx, module, args, kwargs):
        if not self._ours(kwargs):
            return None
        return args, {**kwargs, "kvcompress_layer": self._cache_ref().layers[layer_idx]}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved is not None:
            self.config._attn_implementation = self._saved
            self._saved = None
        self.inputs.clear()

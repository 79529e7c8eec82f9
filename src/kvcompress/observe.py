"""How a method sees what the cache API does not hand it: the inputs of each attention module.

An :class:`Observer` registers forward pre-hooks on the model's own attention modules. For every forward
pass that uses *its* cache (:func:`cache_hook` runs a cache's hooks in those only), it keeps the module's input
``hidden_states (batch, q, hidden)`` and ``position_embeddings`` (cos, sin: ``(batch, q, head_dim)``).
Because the pre-hook of layer ``l`` runs before that layer calls ``cache.update(..., l)``, a cache layer can
ask, inside ``update``, for the current step's query states (post-RoPE) and cos/sin. Hooks are removed by
:meth:`Observer.remove` (the cache calls it on ``close()``, or when it is collected unclosed); nothing in
transformers is patched.

Every cache's hooks go through :func:`cache_hook`: one real hook per (module, kind) however many caches are alive,
which runs only the functions of the cache the forward uses. With a hook per cache, each forward ran every live
cache's hooks (20 live KVQuant caches: 1200 hooks on SmolLM2, now 60; session 33).
"""

from __future__ import annotations

import threading
import weakref
from functools import partial

import torch
from torch import nn

from .compat import cache_in
from .registry import KVCompressError
from .rope import apply_rope


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``layer_idx -> attention module`` (modules with ``layer_idx``, ``q_proj`` and ``k_proj``)."""
    found = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            found[int(module.layer_idx)] = module
    if not found:
        raise KVCompressError(
            "could not find the model's attention modules (modules with layer_idx, q_proj and k_proj); "
            "this method needs a llama-like attention layout"
        )
    return found


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, in order (modules that own a ``self_attn`` child)."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, "self_attn", None), nn.Module)]
    if not blocks:
        raise KVCompressError("could not find the model's decoder layers (modules with a self_attn child)")
    return blocks


class _Dispatch:
    """The one real hook of one kind on one module (forward pre-hook, or forward hook with or without
    ``always_call``), shared by every cache that registered a function there: a forward runs the functions of the
    cache it uses, in the order they were registered, each seeing what the previous one returned (as torch chains
    hooks). Removed from the module with the last function."""

    def __init__(self, module: nn.Module, key: tuple):
        self.module, self.key = module, key
        self.by_cache: dict[int, tuple[weakref.ref, tuple]] = {}  # id(cache) -> (cache ref, functions)
        self.handle = None
        self._register()

    def _register(self) -> None:
        if self.key[0] == "pre":
            self.handle = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self.handle = self.module.register_forward_hook(self._post, with_kwargs=True, always_call=self.key[1])

    def _functions(self, kwargs) -> tuple:
        cache = cache_in(kwargs)
        entry = self.by_cache.get(id(cache)) if cache is not None else None
        return entry[1] if entry is not None and entry[0]() is cache else ()

    def _pre(self, module, args, kwargs):
        changed = None
        for fn in self._functions(kwargs):
            result = fn(module, args, kwargs)
            if result is not None:
                changed = args, kwargs = result
        return changed

    def _post(self, module, args, kwargs, output):
        changed = None
        for fn in self._functions(kwargs):
            result = fn(module, args, kwargs, output)
            if result is not None:
                changed = output = result
        return changed

    def add(self, cache, fn) -> None:
        entry = self.by_cache.get(id(cache))
        fns = entry[1] if entry is not None and entry[0]() is cache else ()
        self.by_cache[id(cache)] = (weakref.ref(cache), (*fns, fn))
        if self.handle is None:  # taken off meanwhile: a collected cache's finalizer ran inside this call
            self._register()
            _DISPATCH.setdefault(self.module, {})[self.key] = self

    def discard(self, cache_id: int, fn) -> None:
        with _DISPATCH_LOCK:
            self._discard(cache_id, fn)

    def _discard(self, cache_id: int, fn) -> None:
        entry = self.by_cache.get(cache_id)
        if entry is None:
            return
        fns = tuple(f for f in entry[1] if f is not fn)
        if fns:
            self.by_cache[cache_id] = (entry[0], fns)
        else:
            del self.by_cache[cache_id]
        if not self.by_cache and self.handle is not None:
            self.handle.remove()
            self.handle = None
            hooks = _DISPATCH.get(self.module)
            if hooks is not None and hooks.get(self.key) is self:
                del hooks[self.key]


_DISPATCH: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Dispatch]]" = weakref.WeakKeyDictionary()
# caches made and closed from several threads: a function is never added to a dispatch whose real hook another thread
# is taking off. Reentrant: a collected cache's finalizer (which takes its hooks off) can run inside cache_hook.
_DISPATCH_LOCK = threading.RLock()


class CacheHook:
    """What :func:`cache_hook` returns: ``remove()`` takes the function off (the real hook goes with the last one)."""

    def __init__(self, dispatch: _Dispatch, cache_id: int, fn):
        self._dispatch, self._cache_id, self._fn = dispatch, cache_id, fn

    def remove(self) -> None:
        if self._dispatch is not None:
            self._dispatch.discard(self._cache_id, self._fn)
            self._dispatch = None


def cache_hook(module: nn.Module, cache, fn, pre: bool, always_call: bool = False) -> CacheHook:
    """Run ``fn`` as a forward pre-hook (``fn(module, args, kwargs)``, ``pre``) or forward hook (``fn(module, args,
    kwargs, output)``; ``always_call``: also when the forward raised) of ``module``, keyword arguments included, in
    the forwards that use ``cache`` only (:func:`kvcompress.compat.cache_in`). The cache is held weakly."""
    key = ("pre",) if pre else ("post", bool(always_call))
    with _DISPATCH_LOCK:
        hooks = _DISPATCH.setdefault(module, {})
        dispatch = hooks.get(key)
        if dispatch is None:
            dispatch = hooks[key] = _Dispatch(module, key)
        dispatch.add(cache, fn)
    return CacheHook(dispatch, id(cache), fn)


class Observer:
    """Captures the attention inputs of the forward passes that use ``cache``.

    ``layers``: which layer indices to watch (default: all). ``keep``: keep a layer's inputs after its attention
    module returns (until the next forward; for a caller that reads them after the forward, e.g. a profile). By
    default they are dropped as the module returns: a cache must not hold the model's activations between steps
    (after a prompt, one ``(batch, prompt, hidden)`` tensor per layer -- more than a compressed cache holds)."""

    def __init__(self, model: nn.Module, cache, layers=None, keep: bool = False):
        self._cache_ref = weakref.ref(cache)
        self.modules = attention_modules(model)
        watch = sorted(self.modules) if layers is None else sorted(layers)
        self._inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = [cache_hook(self.modules[i], cache, partial(self._capture, i), pre=True) for i in watch]
        if not keep:
            self._handles += [cache_hook(self.modules[i], cache, partial(self._release, i), pre=False, always_call=True)
                              for i in watch]

    def _release(self, layer_idx, module, args, kwargs, output):
        """After the attention module of ``layer_idx`` (also when it raised): forget its inputs."""
        self._forget(layer_idx)
        return None

    def _forget(self, layer_idx: int) -> None:
        self._inputs.pop(layer_idx, None)

    def _capture(self, layer_idx, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        pos = kwargs.get("position_embeddings")
        if pos is None and len(args) > 1:
            pos = args[1]
        self._inputs[layer_idx] = (hidden, pos)
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._inputs.clear()

    # -- what methods ask for ----------------------------------------------------------------------------------------
    def _get(self, layer_idx):
        if layer_idx not in self._inputs:
            raise KVCompressError(
                f"no attention inputs were captured for layer {layer_idx}: the cache must be passed to the "
                "model (cache=... or past_key_values=...), and not be closed"
            )
        return self._inputs[layer_idx]

    def rope(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the current step, ``(batch, q, head_dim)``."""
        pos = self._get(layer_idx)[1]
        if pos is None:
            raise KVCompressError(f"layer {layer_idx} received no position_embeddings (not a RoPE model?)")
        return pos

    def query_states(self, layer_idx: int, last: int | None = None) -> torch.Tensor:
        """Post-RoPE queries of the current step (the last ``last`` positions): ``(batch, heads, q, head_dim)``,
        recomputed with the module's own projections (and ``q_norm`` where the model has one)."""
        module = self.modules[layer_idx]
        hidden, (cos, sin) = self._get(layer_idx)
        if last is not None:
            hidden, cos, sin = hidden[:, -last:], cos[:, -last:], sin[:, -last:]
        b, q, _ = hidden.shape
        with torch.no_grad():
            query = module.q_proj(hidden).view(b, q, -1, module.head_dim).transpose(1, 2)
            q_norm = getattr(module, "q_norm", None)
            if q_norm is not None:
                query = q_norm(query)
            return apply_rope(query, cos, sin)

    def scaling(self, layer_idx: int) -> float:
        module = self.modules[layer_idx]
        return float(getattr(module, "scaling", module.head_dim**-0.5))

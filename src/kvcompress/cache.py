"""The compressed cache: a transformers ``Cache`` made of one layer per model layer, and ``make_cache``.

The pieces live in their own modules (re-exported here): :mod:`.geometry` (``ModelGeometry``), :mod:`.layers`
(``KVLayer`` and the plain layers), :mod:`.method` (``Method``), :mod:`.memory` (``MemoryReport``).
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache

from .attention.interface import install as install_attention
from .geometry import ModelGeometry
from .layers import FP16_BYTES, FullLayer, KVLayer, SlidingWindowLayer, StorageLayer, tensors_nbytes
from .memory import LayerMemory, MemoryReport, attention_path
from .method import Method
from .registry import KVCompressError, build_config, get_method

__all__ = [
    "FP16_BYTES", "CompressedCache", "FullLayer", "KVLayer", "LayerMemory", "MemoryReport", "Method", "ModelGeometry",
    "SlidingWindowLayer", "StorageLayer", "check_model", "make_cache", "tensors_nbytes",
]


class CompressedCache(Cache):
    """A transformers ``Cache`` whose layers store K/V compressed. Use as a context manager (or call
    :meth:`close`) when the method installs hooks on the model; a cache dropped unclosed removes them when it is
    garbage-collected (they would otherwise stay on the model, and every later forward would run them)."""

    def __init__(self, model, method: Method):
        self.method = method
        self.geometry = method.geometry
        self._closed = False
        layers = method.build_layers(self)
        if len(layers) != self.geometry.num_layers:
            raise KVCompressError(f"{method.name} built {len(layers)} layers for a {self.geometry.num_layers}-layer model")
        super().__init__(layers=layers)
        if any(layer.attends for layer in layers):
            install_attention(model)
        self.observer = method.install_hooks(self)
        # the hooks hold the cache only weakly: when it is collected unclosed, this takes them off the model
        self._remove_hooks = weakref.finalize(self, self.observer.remove) if self.observer is not None else None

    # -- accounting --------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds between steps (shared per-cache tensors counted once)."""
        own = sum(layer.nbytes() for layer in self.layers)
        return own + tensors_nbytes(self.shared_tensors())

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors shared by several layers (e.g. codebooks), counted once. Methods may override."""
        return list(getattr(self.method, "shared_tensors", lambda: [])())

    def reference_nbytes(self) -> int:
        return sum(layer.reference_nbytes() for layer in self.layers)

    def memory_report(self) -> MemoryReport:
        rows = [
            LayerMemory(i, layer.reference_tokens(), layer.nbytes(), layer.reference_nbytes(), attention_path(layer))
            for i, layer in enumerate(self.layers)
        ]
        shared = tensors_nbytes(self.shared_tensors())
        if shared:
            rows.append(LayerMemory(-1, 0, shared, 0))
        return MemoryReport(
            method=self.method.describe(),
            layers=rows,
            peak_transient_bytes=max((layer.peak_transient_bytes for layer in self.layers), default=0),
        )

    # -- hooks lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._remove_hooks is not None:
            self._remove_hooks()  # (runs once: later calls and the collection of the cache do nothing)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._closed and self.observer is not None:
            raise KVCompressError("this cache was closed (its hooks are removed); make a new one")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def make_cache(method: str, model, **options) -> CompressedCache:
    """Build a compressed cache for ``model``: ``make_cache("kivi", model, bits=2)``.

    The config is validated against the model before any work; bad input raises one
    :class:`kvcompress.KVCompressError`.
    """
    method_cls = get_method(method)
    config = build_config(method_cls, options)
    check_model(model)
    return CompressedCache(model, method_cls(model, config))


def check_model(model) -> None:
    """A loaded transformers causal LM (a torch module with a ``config``), or one clear error."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        got = "None" if model is None else type(model).__name__
        raise KVCompressError(
            f"make_cache needs a loaded transformers model (e.g. model, tok = kvcompress.load_model('smollm2-135m')), "
            f"got {got}"
        )

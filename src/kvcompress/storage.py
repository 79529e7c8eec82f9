"""How a sequence of K/V vectors is stored, independent of *which* tokens are kept or *where* they live.

Composition (DESIGN.md): eviction picks tokens, merging picks layers, a ``KVStore`` picks the representation.
``make_store("kivi", geometry, bits=4)`` gives a store any method can put its kept tokens in.

Shapes: ``keys``/``values`` are ``(batch, kv_heads, n, head_dim)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .registry import KVCompressError

_STORES: dict[str, Callable[..., "KVStore"]] = {}


def register_store(name: str):
    def deco(cls):
        _STORES[name] = cls
        return cls

    return deco


def make_store(name: str, geometry, **options) -> "KVStore":
    """A store by name: ``fp16`` (2-byte floats) or any quantizing store a method registered (``kivi``)."""
    from .registry import list_methods

    list_methods()  # import method modules so their stores register
    if name not in _STORES:
        raise KVCompressError(f"unknown storage {name!r}; known storages: {', '.join(sorted(_STORES))}")
    return _STORES[name](geometry, **options)


class KVStore:
    """Append-only store of per-token K/V vectors. ``dtype``: the 2-byte float its exact tokens are held in
    (new tokens are rounded to it before attention, so a step sees what later steps will read back)."""

    dtype: torch.dtype = torch.float16

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, dequantized: ``(batch, kv_heads, n, head_dim)`` each (a transient copy)."""
        raise NotImplementedError

    def held_tensors(self) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def parts(self) -> list:
        """The stored tokens as :class:`kvcompress.attention.KVPart` s in token order (read chunk by chunk by the
        attention path). Default: one dense part over :meth:`read` (a store without a chunked reader)."""
        from .attention import KVPart

        if not len(self):
            return []
        k, v = self.read(torch.float32)
        return [KVPart.dense(k, v, kind=type(self).__name__)]

    def __len__(self) -> int:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.held_tensors() if t is not None)


@register_store("fp16")
class FP16Store(KVStore):
    """Plain 2-byte floats (bfloat16 when the model computes in bfloat16)."""

    def __init__(self, geometry, **options):
        if options:
            raise KVCompressError(f"fp16 storage takes no options, got {sorted(options)}")
        self.dtype = geometry.storage_dtype
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, keys, values):
        k, v = keys.to(self.dtype), values.to(self.dtype)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)

    def read(self, dtype=torch.float32):
        return self.k.to(dtype), self.v.to(dtype)

    def parts(self):
        from .attention import KVPart

        return [] if self.k is None else [KVPart.dense(self.k, self.v, kind="fp16")]

    def held_tensors(self):
        return [self.k, self.v]

    def __len__(self):
        return 0 if self.k is None else self.k.shape[-2]

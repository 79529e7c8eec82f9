"""How a sequence of K/V vectors is stored, independent of *which* tokens are kept or *where* they live.

Composition (DESIGN.md): eviction picks tokens, merging picks layers, a ``TokenStorage`` picks the representation.
``make_storage("kivi", geometry, bits=4)`` gives a store any method can put its kept tokens in.

Shapes: ``keys``/``values`` are ``(batch, kv_heads, n, head_dim)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .registry import KVCompressError

_STORAGES: dict[str, Callable[..., "TokenStorage"]] = {}


def register_storage(name: str):
    def deco(cls):
        _STORAGES[name] = cls
        return cls

    return deco


def make_storage(name: str, geometry, **options) -> "TokenStorage":
    """A store by name: ``fp16`` (2-byte floats) or any quantizing store a method registered (``kivi``)."""
    from .registry import list_methods

    list_methods()  # import method modules so their stores register
    if name not in _STORAGES:
        raise KVCompressError(f"unknown storage {name!r}; known storages: {', '.join(sorted(_STORAGES))}")
    return _STORAGES[name](geometry, **options)


class TokenStorage:
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

    def attend_one_token(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float):
        """A store's own fast path for a one-token step without padding: attend ``query (b, heads, 1, d)`` over the
        stored tokens and the step's ``keys``/``values (b, h, 1, d)``, and append those. Returns ``(output (b, 1,
        heads, d), transient bytes)``, or None (nothing appended, the default): the caller attends over :meth:`parts`
        and appends."""
        return None

    def __len__(self) -> int:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.held_tensors() if t is not None)


class TokenRuns:
    """Tensors that grow along the token axis without copying their past: kept as a few contiguous runs whose
    lengths strictly decrease (a binary counter: appending merges the last runs while the newer is not shorter).
    A token is copied O(log n) times over its life instead of once per step as ``torch.cat`` onto the whole past
    would, there are O(log n) runs, and nothing is allocated beyond what is held (no capacity slack to count).

    ``append(*tensors)`` takes aligned tensors (e.g. keys and values ``(batch, heads, n, ...)``); ``runs`` is the
    list of aligned tuples, oldest first. ``dims``: the token axis of each tensor (default 2 for all); a run's
    length is the size of its first tensor along its axis (the others may hold any number of entries per token,
    e.g. sparse outliers)."""

    def __init__(self, dims: tuple[int, ...] | None = None):
        self.runs: list[tuple[torch.Tensor, ...]] = []
        self.dims = dims

    def _dim(self, i: int) -> int:
        return 2 if self.dims is None else self.dims[i]

    def run_length(self, run: tuple[torch.Tensor, ...]) -> int:
        return run[0].shape[self._dim(0)]

    def append(self, *tensors: torch.Tensor) -> None:
        if not tensors[0].shape[self._dim(0)]:
            return
        self.runs.append(tuple(tensors))
        while len(self.runs) >= 2 and self.run_length(self.runs[-1]) >= self.run_length(self.runs[-2]):
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(tuple(torch.cat([a, b], dim=self._dim(i)) for i, (a, b) in enumerate(zip(older, newer))))

    def __len__(self) -> int:
        return sum(self.run_length(run) for run in self.runs)

    def tensors(self) -> list[torch.Tensor]:
        return [t for run in self.runs for t in run]

    def joined(self) -> tuple[torch.Tensor, ...] | None:
        """Every run concatenated (a transient copy when there are several runs); None when empty."""
        if not self.runs:
            return None
        if len(self.runs) == 1:
            return self.runs[0]
        return tuple(torch.cat(parts, dim=self._dim(i)) for i, parts in enumerate(zip(*self.runs)))

    def replace(self, *tensors: torch.Tensor) -> None:
        """Hold ``tensors`` as the only run (after the caller cut or rewrote the joined past)."""
        self.runs = [tuple(tensors)] if tensors[0].shape[self._dim(0)] else []


class GrowingTokens:
    """One tensor that grows along its token axis (dim 2) in place: a buffer ``(…, capacity, …)`` of which the first
    ``length`` entries are held, grown geometrically (by ``max(min_grow, length // GROW_SHARE)`` entries when full).
    Appending one token copies O(1) entries amortized instead of the whole past; :meth:`view` is the held prefix (a
    view, never a copy; the fused kernels read it in place). The spare capacity is memory held, so :meth:`tensors`
    returns the whole buffer and it is counted. The first append holds its tensor at its exact size (no slack after a
    prefill). ``limit``: grow no further than this many entries unless one append needs more (0: always exact-sized,
    each append a copy of what is held: for a store bounded by a sliding window)."""

    GROW_SHARE = 32  # spare capacity <= length / 32 (+ min_grow) after a growth

    def __init__(self, min_grow: int = 16):
        self.buffer: torch.Tensor | None = None
        self._array = None  # the buffer as numpy (made when asked for)
        self._bits = None  # a 2-byte float buffer's bits as flat uint16 numpy (made when asked for)
        self._bytes = None  # an integer buffer as its little-endian bytes (made when asked for)
        self.length = 0
        self.min_grow = min_grow
        self.limit: int | None = None  # grow no further than this many entries unless one append needs more

    def append(self, x: torch.Tensor) -> bool:
        """Append ``x`` along the token axis. Returns True when the buffer was replaced (made or grown)."""
        n = x.shape[2]
        if not n:
            return False
        if self.buffer is None:  # held at its exact size; a view of a larger tensor would keep that one alive
            exact = x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size()
            self._hold(x if exact else x.contiguous().clone())
            self.length = n
            return True
        grown = self._make_room(self.length + n)
        self.buffer[:, :, self.length : self.length + n] = x
        self.length += n
        return grown

    def reserve(self, n: int, shape: tuple, dtype: torch.dtype) -> bool:
        """Room for ``n`` more entries, as :meth:`append` would make it (a first buffer ``shape`` with ``n`` along the
        token axis, exact-sized), to be written in place (:meth:`array`) and then :meth:`commit` ted. Returns True
        when the buffer was replaced (made or grown)."""
        if self.buffer is None:
            self._hold(torch.empty((*shape[:2], n, *shape[3:]), dtype=dtype))
            return True
        return self._make_room(self.length + n)

    def commit(self, n: int) -> None:
        """The ``n`` entries after the held ones (written into the room :meth:`reserve` made) are held now."""
        self.length += n

    def array(self):
        """The whole buffer as a numpy array (the same memory; made once per buffer): what kernels write into."""
        if self._array is None:
            self._array = self.buffer.numpy()
        return self._array

    def bits_array(self):
        """A buffer of 2-byte floats ``(b, h, capacity, w)`` as its bits, flattened per (batch, head): uint16 numpy
        ``(b, h, capacity * w)``, the same memory, made once per buffer (how the kernels read fp16 statistics)."""
        if self._bits is None:
            a = self.buffer.view(torch.int16).numpy().view(np.uint16)
            self._bits = a.reshape(a.shape[0], a.shape[1], -1)
        return self._bits

    def bytes_array(self):
        """An integer buffer (uint8 / int16 / int32) as its little-endian bytes ``(*shape, itemsize)`` uint8 numpy, the
        same memory, made once per buffer (how the kernels read and write small integers of any width in place)."""
        if self._bytes is None:
            a = self.array()
            self._bytes = a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize)
        return self._bytes

    def _hold(self, buffer: torch.Tensor) -> None:
        self.buffer, self._array, self._bits, self._bytes = buffer, None, None, None

    def _make_room(self, need: int) -> bool:
        if need <= self.buffer.shape[2]:
            return False
        capacity = need + max(self.min_grow, need // self.GROW_SHARE)
        if self.limit is not None:  # e.g. a sliding window: it never holds more than its window
            capacity = max(need, min(capacity, self.limit))
        grown = self.buffer.new_empty((*self.buffer.shape[:2], capacity, *self.buffer.shape[3:]))
        grown[:, :, : self.length] = self.buffer[:, :, : self.length]
        self._hold(grown)
        return True

    def view(self) -> torch.Tensor | None:
        """The held entries ``(…, length, …)``: a view of the buffer (None when empty)."""
        return None if self.buffer is None else self.buffer[:, :, : self.length]

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` oldest entries; what stays moves into a new buffer (the dropped bytes are freed with the
        old one) with the same spare, or up to ``limit``."""
        if n >= self.length:
            self._hold(None)
            self.length = 0
            return
        if n:
            rest = self.length - n
            capacity = rest + self.buffer.shape[2] - self.length
            if self.limit is not None:
                capacity = max(rest, min(self.buffer.shape[2], self.limit))
            kept = self.buffer.new_empty((*self.buffer.shape[:2], capacity, *self.buffer.shape[3:]))
            kept[:, :, :rest] = self.buffer[:, :, n : self.length]
            self._hold(kept)
            self.length = rest

    def spare_nbytes(self) -> int:
        """Bytes of the spare capacity (allocated, held, not yet filled)."""
        if self.buffer is None:
            return 0
        return (self.buffer.shape[2] - self.length) * self.buffer[:, :, :1].numel() * self.buffer.element_size()

    def tensors(self) -> list[torch.Tensor | None]:
        """The whole buffer, spare capacity included (what is held)."""
        return [self.buffer]


@register_storage("fp16")
class FP16Store(TokenStorage):
    """Plain 2-byte floats (bfloat16 when the model computes in bfloat16)."""

    def __init__(self, geometry, **options):
        if options:
            raise KVCompressError(f"fp16 storage takes no options, got {sorted(options)}")
        self.dtype = geometry.storage_dtype
        self.kv = TokenRuns()  # (keys, values) runs, each (b, h, n_i, d)

    def append(self, keys, values):
        self.kv.append(keys.to(self.dtype), values.to(self.dtype))

    def read(self, dtype=torch.float32):
        k, v = self.kv.joined()
        return k.to(dtype), v.to(dtype)

    def parts(self):
        from .attention import KVPart

        return [KVPart.dense(k, v, kind="fp16") for k, v in self.kv.runs]

    def held_tensors(self):
        return self.kv.tensors()

    def __len__(self):
        return len(self.kv)

"""What ``memory_report()`` returns: stored vs fp16-reference bytes per layer and in total, the peak transient, and
which attention path each layer takes (:func:`attention_path`); and :func:`release_free_memory`, which hands the C
heap's free pages back to the system."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from collections import Counter
from dataclasses import dataclass


def attention_path(layer) -> str:
    """How attention reads ``layer``'s past at the next step: ``"fused-numba"`` / ``"fused-triton"`` (a kernel straight
    on the codes), ``"chunked"`` (codes dequantized a chunk at a time), ``"dense"`` (full-precision K/V: held as such,
    or read back whole for the step -- layers that hand K/V to transformers). A padded batch
    whose rows run alone joins its rows' paths with ``+``. Asks the layer (``attention_path()``, layers that hold
    codes themselves: KVQuant, LogQuant, MiniCache's merged pairs) or its store (``layer.kv``, or ``layer.storage`` once an evicting layer
    committed to it)."""
    rows = getattr(layer, "_rows", None)
    if rows:
        return "+".join(sorted({attention_path(row) for row in rows}))
    if not getattr(layer, "attends", False):
        return "dense"
    own = getattr(layer, "attention_path", None)
    if callable(own):
        return own()
    store = getattr(layer, "kv", None)
    if store is None and getattr(layer, "committed", False):
        store = getattr(layer, "storage", None)
    path = getattr(store, "attention_path", None)
    return path() if callable(path) else "dense"


@dataclass
class LayerMemory:
    layer: int
    tokens: int
    stored_bytes: int
    reference_bytes: int
    attention: str = ""  # :func:`attention_path` of the layer; "" where it does not apply (shared tensors, peers)

    @property
    def ratio(self) -> float:
        return self.reference_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass
class MemoryReport:
    method: str
    layers: list[LayerMemory]
    peak_transient_bytes: int

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.layers)

    @property
    def reference_bytes(self) -> int:
        return sum(r.reference_bytes for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.reference_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    @property
    def attention(self) -> dict[str, int]:
        """Layers per attention path, e.g. ``{"fused-numba": 30}`` (see :func:`attention_path`)."""
        return dict(Counter(r.attention for r in self.layers if r.attention))

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "stored_bytes": self.stored_bytes,
            "reference_bytes": self.reference_bytes,
            "ratio": self.ratio,
            "peak_transient_bytes": self.peak_transient_bytes,
            "attention": self.attention,
            "layers": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in self.layers],
        }

    def __str__(self) -> str:
        paths = ", ".join(f"{path} x{count}" for path, count in self.attention.items())
        return (
            f"{self.method}: {self.stored_bytes / 2**20:.3f} MiB stored vs {self.reference_bytes / 2**20:.3f} MiB "
            f"fp16 reference -> {self.ratio:.2f}x (peak transient {self.peak_transient_bytes / 2**20:.3f} MiB)"
            + (f"; attention: {paths}" if paths else "")
        )


def resident_bytes() -> int | None:
    """The process's resident set in bytes (``/proc/self/statm``), or ``None`` where there is no such file."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim():
    """glibc's ``malloc_trim`` from the process's own C library, or ``None`` where it has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> int | None:
    """Give the free pages of the C heap back to the system (glibc's ``malloc_trim(0)``) and return by how many bytes
    the process's resident set shrank; ``None`` where the C library has no ``malloc_trim``.

    A cache's ``nbytes()`` is what its tensors hold. What the *process* holds can be far more in a program that keeps
    caches alive while it runs more prefills: glibc keeps the freed temporaries of every prefill as free heap blocks
    fragmented around the kept caches' small objects and does not return them (session 33, SmolLM2, 2k-token caches:
    36-446 MiB of resident growth per kept cache against 9.5-15 MiB counted). Calling this after each prefill kept the
    growth at the count there, at 8-36 ms a call; with kept caches the prefills themselves got faster too (fewer fresh
    pages to fault in). A program that keeps no cache between prefills gains nothing from it: its next prefill reuses
    the free blocks, and would fault in whatever this handed back. Process-wide: it trims every thread's heap."""
    trim = _malloc_trim()
    if trim is None:
        return None
    before = resident_bytes()
    trim(0)
    after = resident_bytes()
    return max(0, before - after) if before is not None and after is not None else 0

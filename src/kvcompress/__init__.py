"""kvcompress: KV-cache compression for Hugging Face transformers, with memory counted from the tensors
actually stored.

    model, tok = kvcompress.load_model("smollm2-135m")
    with kvcompress.make_cache("kivi", model, bits=2) as cache:
        out = model.generate(**tok("Hello", return_tensors="pt"), cache=cache, max_new_tokens=32)
        print(cache.memory_report())
"""

from .cache import CompressedCache, KVLayer, MemoryReport, Method, ModelGeometry, make_cache
from .memory import release_free_memory
from .models import load_model
from .registry import KVCompressError, list_methods, register

__all__ = [
    "CompressedCache",
    "KVCompressError",
    "KVLayer",
    "MemoryReport",
    "Method",
    "ModelGeometry",
    "list_methods",
    "load_model",
    "make_cache",
    "register",
    "release_free_memory",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``kvcompress.evaluate`` (the evaluation protocol: call it, or import its modules) and ``kvcompress.tune`` (the
    setting search) are loaded on first use."""
    if name in ("evaluate", "tune"):  # both are callable modules: kvcompress.tune(model, data, max_loss="2%")
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

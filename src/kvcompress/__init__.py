"""kvcompress: KV-cache compression for Hugging Face transformers, with memory counted from the tensors
actually stored.

    model, tok = kvcompress.load_model("smollm2-135m")
    with kvcompress.make_cache("kivi", model, bits=2) as cache:
        out = model.generate(**tok("Hello", return_tensors="pt"), past_key_values=cache, max_new_tokens=32)
        print(cache.memory_report())
"""

from .cache import CompressedCache, KVLayer, MemoryReport, Method, ModelGeometry, make_cache
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
]
__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """Run the evaluation protocol (see :func:`kvcompress.evaluate.run_eval`)."""
    from .evaluate import run_eval

    return run_eval(*args, **kwargs)

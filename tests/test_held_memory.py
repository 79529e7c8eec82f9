"""Memory is counted from the tensors actually stored: after a prompt and decode steps (batch 2, then a left-padded
batch; fp32 and bf16 tiny llama, and tiny Gemma-3 with its sliding-window layers), every tensor or numpy array
reachable from a cache's objects lies inside a tensor the cache counts (``nbytes()``: the layers' ``held_tensors``
and the shared ones), and no counted tensor is a view that keeps a larger storage alive. Excluded: the model itself
(its modules, parameters and buffers -- e.g. the rotary module's ``inv_freq`` a kernel reads in place) and a
method's calibration file (per model, like the weights). What this caught when it was written: the observer kept
every layer's attention inputs of the last forward (after a prompt, ``(batch, prompt, hidden)`` per layer);
KVQuant's sink held as a strided copy whose contiguous bits were an uncounted copy; FastGen's region offsets and
FastKV's selected positions were held and not counted; a padded batch's layer counted its rows but not its own
codebooks, and each row kept its last step's token index; LogQuant's sliding-window layers held their full-precision
run as a slice of a larger tensor (the tokens that had left the window stayed allocated)."""

from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest
import torch
from torch import nn

from kvcompress import make_cache, memory, release_free_memory
from kvcompress.compat import cache_kwargs
from kvcompress.registry import get_method, list_methods


def reachable_memory(root, skip_ids: set[int]):
    """``[(path, address, nbytes)]`` of every tensor storage and numpy array reachable from ``root`` through object
    attributes, slots, containers (modules and the objects in ``skip_ids`` not entered)."""
    seen, out, stack = set(), [], [(root, "cache")]
    while stack:
        obj, path = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (nn.Module, type)) or id(obj) in skip_ids:
            continue
        if isinstance(obj, torch.Tensor):
            out.append((path, obj.data_ptr(), obj.numel() * obj.element_size(), obj.untyped_storage().nbytes()))
        elif isinstance(obj, np.ndarray):
            out.append((path, obj.__array_interface__["data"][0], obj.nbytes, obj.nbytes))
        elif isinstance(obj, dict):
            stack.extend((v, f"{path}[{k!r}]") for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
        elif not isinstance(obj, (str, bytes, int, float, bool, complex)):
            if hasattr(obj, "__dict__"):
                stack.extend((v, f"{path}.{k}") for k, v in vars(obj).items())
            for slot in getattr(type(obj), "__slots__", ()):
                stack.append((getattr(obj, slot, None), f"{path}.{slot}"))
    return out


def counted_tensors(layer) -> list[torch.Tensor]:
    """What ``layer.nbytes()`` counts: its held tensors, and its rows' (a padded batch keeps one layer per row)."""
    own = [t for t in layer.held_tensors() if t is not None]
    if getattr(layer, "_rows", None) is not None:
        return own + [t for row in layer._rows for t in counted_tensors(row)]
    return own


def unheld(cache, model) -> list[str]:
    held = [t for layer in cache.layers for t in counted_tensors(layer)] + list(cache.shared_tensors())
    counted = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in held]
    counted += [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                for t in [*model.parameters(), *model.buffers()]]
    skip = {id(model)}
    if getattr(cache.method, "calibration", None) is not None:
        skip.add(id(cache.method.calibration))
    bad = [f"{path} ({nbytes} bytes)" for path, ptr, nbytes, _ in reachable_memory(cache, skip)
           if nbytes and not any(a <= ptr and ptr + nbytes <= z for a, z in counted)]
    bad += [f"counted view of a larger storage: {tuple(t.shape)} {t.dtype}" for t in held
            if t.untyped_storage().nbytes() > t.numel() * t.element_size()]
    return bad


@pytest.mark.parametrize("which,dtype", [("tiny_model", torch.float32), ("tiny_model", torch.bfloat16),
                                         ("tiny_gemma", torch.float32)])
@pytest.mark.parametrize("name", list_methods())
@torch.no_grad()
def test_everything_a_cache_keeps_is_counted(request, which, name, dtype):
    model = copy.deepcopy(request.getfixturevalue(which)).to(dtype)  # the session's fixture keeps its fp32 weights
    options = dict(get_method(name).test_options or {})
    if which == "tiny_gemma" and name == "fastkv":
        pytest.skip("fastkv refuses tiny_gemma (no full-attention layer to select tokens at; tested elsewhere)")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (2, 70), generator=gen)
    padded = torch.ones_like(ids)
    padded[1, :9] = 0
    for mask in (torch.ones_like(ids), padded):
        cache = make_cache(name, model, **options)
        model(ids[:, :50], attention_mask=mask[:, :50], **cache_kwargs(model, cache))
        for t in range(50, 70):
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(model, cache))
        assert unheld(cache, model) == []
        cache.close()


def test_release_free_memory_hands_freed_heap_pages_back(monkeypatch):
    """200 MiB in 64 KiB blocks (under glibc's mmap threshold: carved from the heap), written, then freed except the
    last block (it pins the heap's top, so glibc's own top trim cannot give them back, as with a kept cache): they stay
    resident until :func:`kvcompress.release_free_memory`, which must report at least 150 MiB released. Where the C
    library has no ``malloc_trim`` it returns ``None``."""
    if memory._malloc_trim() is None or memory.resident_bytes() is None:
        pytest.skip("not glibc on Linux")
    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    block, count = 64 * 1024, 3200
    release_free_memory()  # whatever was free before, so that what follows counts the blocks alone
    blocks = [libc.malloc(block) for _ in range(count)]
    assert all(blocks)
    try:
        for b in blocks:
            ctypes.memset(b, 1, block)
        for b in blocks[:-1]:
            libc.free(b)
        released = release_free_memory()
        again = release_free_memory()
    finally:
        libc.free(blocks[-1])
    assert released >= 150 * 2**20, released / 2**20
    assert again < 50 * 2**20, again / 2**20  # nothing left to give back
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert release_free_memory() is None

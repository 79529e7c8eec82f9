"""Fused attention over packed KV parts: ``(acc, m, l)`` of one part computed from its codes, never dequantized.

A quantized store exposes such a kernel as ``KVPart.fused`` (see :mod:`kvcompress.attention.parts`); the attention
path merges it with the other parts by log-sum-exp. Today: KIVI's layout (keys per channel in groups of ``G`` tokens,
values per token in groups of ``Gv`` channels, fp16 scale/zero, codes of 1..8 bits packed by
:func:`kvcompress.quant.pack_bits`) on the CPU with numba (:mod:`.cpu`).

Where no kernel applies -- numba missing, a CUDA tensor, the switch off -- stores give a chunked part instead
(``KVPart.kind`` says which: ``"kivi-fused"`` vs ``"kivi"``). Switch off for a block of code with
``with kernels.fused(False): ...`` (tests and benchmarks compare both paths).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

try:  # numba is a dependency, but a platform without a wheel still works (chunked path)
    from . import cpu as _cpu

    AVAILABLE, UNAVAILABLE_REASON = True, ""
except ImportError as exc:  # pragma: no cover - exercised only where numba is missing
    _cpu, AVAILABLE, UNAVAILABLE_REASON = None, False, f"numba could not be imported ({exc})"

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "enabled", "fused", "kivi_attention", "kivi_fused_applies"]

_state = {"enabled": True}
#: numba's default (workqueue) thread pool must not be entered by two Python threads at once: the second runs serial
_PARALLEL = threading.Lock()
#: below this many (batch * kv_heads * tokens) a thread-pool launch costs more than it saves
MIN_PARALLEL_WORK = 8192


def enabled() -> bool:
    """True when fused kernels are available and switched on."""
    return AVAILABLE and _state["enabled"]


@contextmanager
def fused(on: bool):
    """Switch the fused kernels on or off for the ``with`` block (process-wide; restores the previous setting)."""
    before = _state["enabled"]
    _state["enabled"] = bool(on)
    try:
        yield
    finally:
        _state["enabled"] = before


def kivi_fused_applies(device: torch.device, key_bits: int, value_bits: int, head_dim: int, value_group: int) -> bool:
    """Whether :func:`kivi_attention` serves a KIVI part on ``device``: CPU tensors, codes of 1..8 bits, and value
    groups that never split a packing unit (:func:`kvcompress.kernels.cpu.value_layout_ok`; KIVI's own groups of
    ``G`` channels always qualify for 2/4/8 bits with an even ``G``)."""
    return (enabled() and device.type == "cpu" and 1 <= key_bits <= 8 and 1 <= value_bits <= 8
            and _cpu.value_layout_ok(value_bits, head_dim, value_group))


@lru_cache(maxsize=64)
def _layout(k_bits: int, v_bits: int, d: int, v_group: int):
    return _cpu.plane_channels(k_bits, d), _cpu.plane_channels(v_bits, d)


def _rows_view(t: torch.Tensor) -> np.ndarray:
    """``t (b, h, n, w)`` whose rows ``(n, w)`` are contiguous as a C-contiguous numpy array ``(b, h, cap, w)`` with
    ``cap >= n`` (the capacity of a preallocated buffer ``t`` is a prefix of; never copied then), else a copy."""
    t = t.detach()
    if t.is_contiguous():
        return t.numpy()
    b, h, _, w = t.shape
    s = t.stride()
    if s[3] == 1 and s[2] == w and s[1] % w == 0 and s[0] == h * s[1]:
        try:
            return torch.as_strided(t, (b, h, s[1] // w, w), (s[0], s[1], w, 1)).numpy()
        except RuntimeError:  # the buffer ends before the capacity the strides suggest
            pass
    return t.contiguous().numpy()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _halves(t: torch.Tensor) -> np.ndarray:
    """fp16 stats ``(b, h, rows, w)`` as their uint16 bits, flattened per (batch, head): ``(b, h, cap * w)``."""
    a = _rows_view(t.view(torch.int16))
    return a.reshape(a.shape[0], a.shape[1], -1).view(np.uint16)


def kivi_attention(qg: torch.Tensor, n: int, k_packed: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                   k_bits: int, k_group: int, v_packed: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                   v_bits: int, v_group: int, valid: torch.Tensor | None = None):
    """Attention partials of ``qg`` over the first ``n`` tokens of KIVI codes (the ``KVPart.fused`` contract).

    ``qg (b, kv_heads, rows, d)`` fp32, already scaled; ``k_packed (b, kv_heads, >= n, ceil(d*k_bits/8))`` uint8,
    ``k_scale``/``k_zero (b, kv_heads, >= ceil(n/k_group), d)`` fp16 (per channel, groups of ``k_group`` tokens);
    ``v_packed (b, kv_heads, >= n, ceil(d*v_bits/8))`` uint8, ``v_scale``/``v_zero (b, kv_heads, >= n, d // v_group)``
    fp16 (per token, groups of ``v_group`` channels); ``valid (b, kv_heads | 1, n)`` bool or None.
    Returns fp32 ``acc (b, kv_heads, rows, d) = sum_j exp(s_j - m) v_j``, ``m (b, kv_heads, rows)`` (-inf where no
    token is visible), ``l (b, kv_heads, rows) = sum_j exp(s_j - m)``, with ``s_j = qg . dequantized key_j``.
    """
    b, h, rows, d = qg.shape
    q = qg.detach().float().contiguous().numpy()
    acc = np.empty((b, h, rows, d), np.float32)
    m = np.empty((b, h, rows), np.float32)
    l = np.empty((b, h, rows), np.float32)
    kchan, vchan = _layout(k_bits, v_bits, d, v_group)
    if valid is None:
        vmask = np.ones((1, 1, 0), np.bool_)
    else:
        vmask = valid.detach().to(torch.bool).contiguous().numpy()
    threads = min(torch.get_num_threads(), _cpu.numba.config.NUMBA_NUM_THREADS)
    parallel = threads > 1 and b * h * n >= MIN_PARALLEL_WORK and _PARALLEL.acquire(blocking=False)
    try:
        splits = 1
        if parallel:  # a multiple of the threads in all, at least two ranges per thread
            splits = max(1, 2 * threads // math.gcd(b * h, 2 * threads))
        span = _ceil(_ceil(n, splits), k_group) * k_group  # tokens per range, a multiple of the key group
        items = b * h * _ceil(n, span)
        pacc = np.empty((items, rows, d), np.float32)
        pm, pl = np.empty((items, rows), np.float32), np.empty((items, rows), np.float32)
        args = (q, _rows_view(k_packed), _halves(k_scale), _halves(k_zero), k_bits, k_group, kchan,
                _rows_view(v_packed), _halves(v_scale), _halves(v_zero), v_bits, v_group, vchan, vmask,
                n, span, pacc, pm, pl, acc, m, l)
        if parallel:
            _cpu.numba.set_num_threads(threads)
            _cpu.kivi_layer_parallel(*args)
        else:
            _cpu.kivi_layer_serial(*args)
    finally:
        if parallel:
            _PARALLEL.release()
    return torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(l)

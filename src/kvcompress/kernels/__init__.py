"""Fused attention over packed KV parts: ``(acc, m, l)`` of one part computed from its codes, never dequantized.

A quantized store exposes such a kernel as ``KVPart.fused`` (see :mod:`kvcompress.attention.parts`); the attention
path merges it with the other parts by log-sum-exp. Today: KIVI's layout (keys per channel in groups of ``G`` tokens,
or per token like the values; values per token in groups of ``Gv`` channels; fp16 scale/zero; codes of 1..8 bits
packed by :func:`kvcompress.quant.pack_bits`), with one backend per device (:func:`backend`): CPU tensors with numba
(:mod:`.cpu`), CUDA tensors with Triton (:mod:`.gpu`; tested only in Triton's interpreter so far).

Where no kernel applies -- the JIT of the tensors' device missing (numba for CPU, triton for CUDA), another device, the
switch off, a value group that splits a byte of codes on the CPU -- stores give a chunked part instead
(``KVPart.kind`` says which: ``"kivi-fused"`` vs ``"kivi"``). Switch off for a block of code with ``with
kernels.fused(False): ...`` (tests and benchmarks compare both paths); ``kernels.fused(True, backend="triton")`` runs
the Triton kernel whatever the device (CPU tensors need ``TRITON_INTERPRET=1`` set before triton is first imported:
before torch._dynamo is, i.e. before transformers). A fused part asked for more than :data:`MAX_FUSED_ROWS` query rows
(a long prefill chunk) computes its partials by :func:`chunked_partials` instead, where BLAS wins (on either device).

Why numba: a JIT with wheels on every platform (no compiler on the user's machine), ``prange`` threads, and loops
written in Python that LLVM's loop vectorizer turns into AVX2 once they are shaped for it (see :mod:`.cpu`). The
alternative at hand, torch ops on the codes, is the chunked path: 2-7x slower than this kernel
(``benchmarks/attention_microbench.py``). A C/C++ extension was not tried: it needs a compiler at install.
"""

from __future__ import annotations

import math
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

try:  # numba is a dependency, but a platform without a wheel still works (chunked path)
    from . import cpu as _cpu
    from . import kvquant_cpu as _kvq_cpu
    from . import uniform_cpu as _uniform_cpu

    AVAILABLE, UNAVAILABLE_REASON = True, ""

    def _launch_numba_threads() -> None:
        """Start numba's thread pool now, keeping torch's thread count. The first call of compiled code that can run a
        ``prange`` starts the pool; numba's OpenMP layer then sets the process's OpenMP thread count to
        ``NUMBA_NUM_THREADS``, and torch (the same OpenMP runtime) reads its intra-op count from there: a user's
        ``torch.set_num_threads(1)`` came back as 2 after the first decode step (measured, session 23)."""
        before = torch.get_num_threads()
        try:
            _cpu.numba.get_num_threads()  # (public API: launches the threading layer)
        except Exception:  # noqa: BLE001 - e.g. NUMBA_THREADING_LAYER naming a missing one: numba raises it again
            return  # where a threaded kernel first runs, as it did before this launch was added
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

    _launch_numba_threads()
except ImportError as exc:  # pragma: no cover - exercised only where numba is missing
    _cpu = _kvq_cpu = _uniform_cpu = None
    AVAILABLE, UNAVAILABLE_REASON = False, f"numba could not be imported ({exc})"

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "CodebookCodes", "RotaryPositions", "backend", "chunked_partials",
           "enabled", "fused", "kivi_attention", "kivi_decode", "kivi_fused_applies", "kvquant_attention",
           "kvquant_decode", "kvquant_fused_applies", "triton_status"]

_state = {"enabled": True, "backend": None}
#: numba's workqueue threading layer (its fallback without TBB or OpenMP) must not be entered by two Python threads at
#: once: a second caller runs the serial kernel instead of waiting
_PARALLEL = threading.Lock()
#: below this many (batch * kv_heads * tokens) a thread-pool launch costs more than it saves. A decode step on two
#: threads (SmolLM2, 3 KV heads) was 4-8 % faster threaded at 2k tokens; at 1k the four methods moved by -4..+3 %,
#: within the host's noise, so 1k stays serial (session 23)
MIN_PARALLEL_WORK = 4096
#: above this many query rows per KV head (query heads of a group x query tokens) a chunked dequantize + matmul
#: (BLAS) beats the kernel: measured crossover ~190 rows (SmolLM2 shapes, 4k tokens, 4-bit, 1 thread)
MAX_FUSED_ROWS = 128


def enabled() -> bool:
    """True when fused kernels are available and switched on."""
    return AVAILABLE and _state["enabled"]


@contextmanager
def fused(on: bool, backend: str | None = None):
    """Switch the fused kernels on or off for the ``with`` block (process-wide; restores the previous settings).
    ``backend``: ``"numba"`` or ``"triton"`` forces that kernel for tensors of any device (None: by device)."""
    if backend not in (None, "numba", "triton"):
        raise ValueError(f"backend must be None, 'numba' or 'triton', got {backend!r}")
    before = dict(_state)
    _state.update(enabled=bool(on), backend=backend)
    try:
        yield
    finally:
        _state.update(before)


@lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """``(True, version)`` when the Triton kernel (:mod:`.gpu`) imports, else ``(False, why)``; tried once."""
    try:
        from . import gpu  # noqa: F401  (imports triton)
        import triton
    except Exception as exc:  # ImportError, or a triton build that fails on this platform
        return False, f"triton could not be imported ({type(exc).__name__}: {exc})"
    return True, triton.__version__


def backend(device: torch.device) -> str | None:
    """The fused kernel for tensors on ``device``: ``"numba"`` (CPU), ``"triton"`` (CUDA), or None (switched off, the
    JIT missing, another device: the chunked path)."""
    if not _state["enabled"]:
        return None
    want = _state["backend"] or {"cpu": "numba", "cuda": "triton"}.get(torch.device(device).type)
    if want == "numba":
        return "numba" if AVAILABLE else None
    if want == "triton":
        return "triton" if triton_status()[0] else None
    return None


def numba_serves_cpu() -> bool:
    """``backend(cpu) == "numba"``, asked the short way (every decode step of every layer asks)."""
    return _state["enabled"] and AVAILABLE and _state["backend"] in (None, "numba")


def kivi_fused_applies(device: torch.device, key_bits: int, value_bits: int, head_dim: int, value_group: int,
                       key_token_group: int | None = None) -> bool:
    """Whether :func:`kivi_attention` serves a KIVI-layout part on ``device``: a backend for the device
    (:func:`backend`), codes of 1..8 bits, value groups dividing ``head_dim`` and, for numba, never splitting a packing
    unit (:func:`kvcompress.kernels.cpu.value_layout_ok`; KIVI's own groups of ``G`` channels always qualify for 2/4/8
    bits with an even ``G``). ``key_token_group``: the keys are quantized per token in groups of that many channels
    (LogQuant's ``key_axis="token"``), held to the same rules as the values; None: per channel."""
    which = backend(device)
    return which is not None and _kivi_layout_ok(which, key_bits, value_bits, head_dim, value_group, key_token_group)


@lru_cache(maxsize=256)
def _kivi_layout_ok(which: str, key_bits: int, value_bits: int, head_dim: int, value_group: int,
                    key_token_group: int | None) -> bool:
    """The layout half of :func:`kivi_fused_applies` for backend ``which`` (asked once per layout: every decode step
    of every layer asks)."""
    if not (1 <= key_bits <= 8 and 1 <= value_bits <= 8) or head_dim % value_group:
        return False
    if key_token_group is not None and (key_token_group < 1 or head_dim % key_token_group):
        return False
    if which == "triton":
        return True
    keys_ok = key_token_group is None or _cpu.value_layout_ok(key_bits, head_dim, key_token_group)
    return keys_ok and _cpu.value_layout_ok(value_bits, head_dim, value_group)


@lru_cache(maxsize=64)
def _layout(k_bits: int, v_bits: int, d: int):
    return _cpu.unpacked_channels(k_bits, d), _cpu.unpacked_channels(v_bits, d)


def _np(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array without a copy when it is contiguous (its storage, detached)."""
    if t.requires_grad:
        t = t.detach()
    return t.numpy() if t.is_contiguous() else t.contiguous().numpy()


def _np32(t: torch.Tensor) -> np.ndarray:
    """``t`` as a float32 numpy array (:func:`_np`; a copy only when it is not float32 or not contiguous)."""
    return _np(t if t.dtype == torch.float32 else t.float())


def _rows_view(t: torch.Tensor) -> np.ndarray:
    """``t (b, h, n, w)`` whose rows ``(n, w)`` are contiguous as a C-contiguous numpy array ``(b, h, cap, w)`` with
    ``cap >= n`` (the capacity of a preallocated buffer ``t`` is a prefix of; never copied then), else a copy."""
    if t.requires_grad:
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
    a = _rows_view(t).view(np.uint16)
    return a.reshape(a.shape[0], a.shape[1], -1)


_ALL_VALID = np.ones((1, 1, 0), np.bool_)
_NO_MULT = np.ones((1, 1, 2, 0), np.float32)


def _tail(t: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    """Tokens held as floats ``(b, h, r, d)`` as float32 numpy (a small copy: at most a residual)."""
    if t is None:
        b, h, _, d = like.shape
        return np.zeros((b, h, 0, d), np.float32)
    return _np(t.float() if t.dtype != torch.float32 else t)


def _codes(t: torch.Tensor | None, b: int, h: int, width: int, dtype) -> np.ndarray:
    return np.zeros((b, h, 0, width), dtype) if t is None else _rows_view(t)


def kivi_attention(qg: torch.Tensor, n: int, k_packed: torch.Tensor | None, k_scale: torch.Tensor | None,
                   k_zero: torch.Tensor | None, k_bits: int, k_group: int, v_packed: torch.Tensor | None,
                   v_scale: torch.Tensor | None, v_zero: torch.Tensor | None, v_bits: int, v_group: int,
                   valid: torch.Tensor | None = None, k_tail: torch.Tensor | None = None,
                   v_tail: torch.Tensor | None = None, k_per_token: bool = False, mult: torch.Tensor | None = None):
    """Attention partials of ``qg`` over ``n`` tokens held as KIVI codes, then floats (the ``KVPart.fused`` contract).

    ``qg (b, kv_heads, rows, d)`` fp32, already scaled. Keys: the first ``nk = n - len(k_tail)`` tokens from
    ``k_packed (b, kv_heads, >= nk, ceil(d*k_bits/8))`` uint8 with ``k_scale``/``k_zero (b, kv_heads, >=
    ceil(nk/k_group), d)`` fp16 (per channel, groups of ``k_group`` tokens), then ``k_tail (b, kv_heads, r_k, d)``
    (floats: a residual; None = none). Values: the first ``nv = n - len(v_tail)`` from ``v_packed (b, kv_heads, >= nv,
    ceil(d*v_bits/8))`` with ``v_scale``/``v_zero (b, kv_heads, >= nv, d // v_group)`` fp16 (per token, groups of
    ``v_group`` channels), then ``v_tail``. Codes may be None when no token uses them. ``valid (b, kv_heads | 1, n)``
    bool or None. ``k_per_token``: the keys are quantized like the values instead (per token, ``k_scale``/``k_zero
    (b, kv_heads, >= nk, d // k_group)``: groups of ``k_group`` channels; LogQuant's ``key_axis="token"``).
    ``mult (b, kv_heads, 2, n)`` float or None: token ``j``'s key counts as ``mult[:, :, 0, j]`` times the stored one
    and its value as ``mult[:, :, 1, j]`` times (MiniCache's per-layer magnitudes over a shared stored direction).

    Returns fp32 ``acc (b, kv_heads, rows, d) = sum_j exp(s_j - m) v_j``, ``m (b, kv_heads, rows)`` (-inf where no
    token is visible), ``l (b, kv_heads, rows) = sum_j exp(s_j - m)``, with ``s_j = qg . key_j`` over the dequantized
    keys. The context is split over ``torch.get_num_threads()`` numba threads when the work is large enough. Runs
    the Triton kernel (:func:`kvcompress.kernels.gpu.kivi_attention`, same contract) where :func:`backend` says so
    (CUDA tensors).
    """
    if backend(qg.device) == "triton":
        from . import gpu

        return gpu.kivi_attention(qg, n, k_packed, k_scale, k_zero, k_bits, k_group, v_packed, v_scale, v_zero,
                                  v_bits, v_group, valid, k_tail, v_tail, k_per_token=k_per_token, mult=mult)
    b, h, _, d = qg.shape
    q = _np32(qg)
    kp = _codes(k_packed, b, h, (d * k_bits + 7) // 8, np.uint8)
    vp = _codes(v_packed, b, h, (d * v_bits + 7) // 8, np.uint8)
    ks, kz = (_halves(t) if t is not None else _no_stats(b, h) for t in (k_scale, k_zero))
    vs, vz = (_halves(t) if t is not None else _no_stats(b, h) for t in (v_scale, v_zero))
    vmask = _ALL_VALID if valid is None else _np(valid if valid.dtype == torch.bool else valid.bool())
    mu = _NO_MULT if mult is None else _np(mult.float())
    acc, m, l = _kivi_numba(q, n, (kp, ks, kz), k_bits, k_group, (vp, vs, vz), v_bits, v_group, _tail(k_tail, qg),
                            _tail(v_tail, qg), k_per_token, vmask, mu)
    return torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(l)


def _no_stats(b: int, h: int) -> np.ndarray:
    return np.zeros((b, h, 0), np.uint16)


def _no_stream(b: int, h: int, d: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scale bits, zero bits)`` of a stream with no token coded yet (what the kernel reads for none)."""
    return _codes(None, b, h, (d * bits + 7) // 8, np.uint8), _no_stats(b, h), _no_stats(b, h)


def _kivi_numba(q: np.ndarray, n: int, k_arrays, k_bits: int, k_group: int, v_arrays, v_bits: int, v_group: int,
                kr: np.ndarray, vr: np.ndarray, k_per_token: bool, vmask: np.ndarray = _ALL_VALID,
                mu: np.ndarray = _NO_MULT):
    """The numba half of :func:`kivi_attention`, on numpy arrays: ``q (b, h, rows, d)`` float32; ``k_arrays`` /
    ``v_arrays``: ``(codes (b, h, >= nk, bytes) uint8, scale, zero (b, h, *) uint16 fp16 bits)``; ``kr``/``vr (b, h,
    r, d)`` float32 tails. Returns numpy ``(acc, m, l)``."""
    b, h, rows, d = q.shape
    nk, nv = n - kr.shape[2], n - vr.shape[2]
    acc = np.empty((b, h, rows, d), np.float32)
    m = np.empty((b, h, rows), np.float32)
    l = np.empty((b, h, rows), np.float32)
    kchan, vchan = _layout(k_bits, v_bits, d)
    (kp, ks, kz), (vp, vs, vz) = k_arrays, v_arrays
    block = _cpu.TOKEN_BLOCK if k_per_token else k_group

    def args(splits):  # tokens per range: a multiple of the kernel's token block (the key group for per-channel keys)
        span = _ceil(_ceil(n, splits), block) * block
        return (q, kp, ks, kz, k_bits, k_group, bool(k_per_token), kchan, nk, kr, vp, vs, vz, v_bits, v_group, vchan,
                nv, vr, vmask, mu, n, span, acc, m, l)

    _run_layer(_cpu.kivi_layer_serial, _cpu.kivi_layer_parallel, args, b * h, b * h * n)
    return acc, m, l


def kivi_decode(query: torch.Tensor, scaling: float, n: int, k_arrays, k_bits: int, k_group: int, v_arrays,
                v_bits: int, v_group: int, k_tail: torch.Tensor, v_tail: torch.Tensor,
                k_per_token: bool = False) -> torch.Tensor:
    """A whole one-query decode step over ``n`` tokens held as one run of KIVI codes then floats, with the numba kernel
    (where :func:`backend` says ``"numba"``): what :func:`kvcompress.attention.attend_parts` computes over the one
    fused part (the same operations, so the same output bit for bit) without building parts, torch partials or a
    merge -- a store's fast path, where the per-call overhead is a sizeable share of a short context's step.

    ``query (b, heads, 1, d)``; ``k_arrays``/``v_arrays``: ``(codes (b, h, >= nk, bytes) uint8, scale bits, zero bits
    (b, h, *) uint16)`` numpy views of the held buffers (capacity included: read in place,
    :meth:`kvcompress.storage.GrowingTokens.array`, ``bits_array``), ``None`` for a stream with no codes yet;
    ``k_tail``/``v_tail (b, h, r, d)``: the tokens after the codes (2-byte floats: residual and the step's own);
    other arguments as :func:`kivi_attention`. Returns the output ``(b, 1, heads, d)`` in the query's dtype."""
    b, heads, _, d = query.shape
    h = k_tail.shape[1]
    k_arrays = k_arrays or _no_stream(b, h, d, k_bits)
    v_arrays = v_arrays or _no_stream(b, h, d, v_bits)
    two_byte = k_tail.dtype in _TWO_BYTE and v_tail.dtype == k_tail.dtype
    # one numba call for everything (each torch / numpy call between the model's matmuls runs with cold caches: ~0.1 ms
    # apiece inside a forward, measured), threaded where _kivi_numba would be (unless another Python thread is inside
    # numba's pool: then the general path, serial)
    with _kernel_threads(b * h * n) as threads:
        if two_byte and threads:
            (kp, ks, kz), (vp, vs, vz) = k_arrays, v_arrays
            kres, vres = _bits16(k_tail), _bits16(v_tail)
            kchan, vchan = _layout(k_bits, v_bits, d)
            block = _cpu.TOKEN_BLOCK if k_per_token else k_group
            splits = _ranges_per_unit(b * h, threads)  # _kivi_numba's token ranges: the same partials, merged alike
            out = np.empty((b, heads, d), np.float32)
            _cpu.kivi_decode_step(_np32(query).reshape(b, heads, d),
                                  float(scaling), kp, ks, kz, k_bits, k_group, bool(k_per_token), kchan,
                                  n - kres.shape[2], kres, vp, vs, vz, v_bits, v_group, vchan, n - vres.shape[2], vres,
                                  k_tail.dtype == torch.bfloat16, n, _ceil(_ceil(n, splits), block) * block, out)
            return torch.from_numpy(out).view(b, 1, heads, d).to(query.dtype)
    q = _np32(query).reshape(b, h, heads // h, d) * np.float32(scaling)
    acc, _, l = _kivi_numba(q, n, k_arrays, k_bits, k_group, v_arrays, v_bits, v_group, _tail(k_tail, query),
                            _tail(v_tail, query), k_per_token)
    acc /= np.maximum(l, _TINY)[..., None]  # as attend_parts: acc / l.clamp_min(tiny), in float32
    return torch.from_numpy(acc).view(b, 1, heads, d).to(query.dtype)


_TWO_BYTE = (torch.float16, torch.bfloat16)


def _bits16(t: torch.Tensor) -> np.ndarray:
    """A 2-byte float tensor's bits as uint16 numpy (C-contiguous; a copy only if ``t`` is not contiguous)."""
    return (t if t.is_contiguous() else t.contiguous()).view(torch.int16).numpy().view(np.uint16)


_TINY = np.finfo(np.float32).tiny


def _run_layer(serial, parallel, args, units: int, work: int) -> None:
    """Run a layer kernel: the threaded twin when more than one thread is allowed, the work (``batch * kv_heads *
    tokens``) is large enough and no other Python thread is inside numba's thread pool (the workqueue layer must not be
    entered twice); else the serial twin. ``args(splits)`` gives the kernel's arguments for ``splits`` token ranges
    per unit of ``units`` (a multiple of the threads in all, at least two ranges per thread)."""
    with _kernel_threads(work) as threads:
        if threads > 1:
            parallel(*args(_ranges_per_unit(units, threads)))
        else:
            serial(*args(1))


@contextmanager
def _kernel_threads(work: int):
    """The numba threads a layer kernel over ``work = batch * kv_heads * tokens`` runs on, held for the block: 1 below
    :data:`MIN_PARALLEL_WORK` or on one thread; else torch's thread count (at most numba's), numba's pool held by this
    Python thread and set to that many -- or 0 where another Python thread holds the pool (the workqueue layer must
    not be entered twice: the caller runs serially, or takes a path that does)."""
    threads = 1 if work < MIN_PARALLEL_WORK else min(torch.get_num_threads(), _cpu.numba.config.NUMBA_NUM_THREADS)
    if threads == 1:
        yield 1
        return
    if not _PARALLEL.acquire(blocking=False):
        yield 0
        return
    try:
        _cpu.numba.set_num_threads(threads)
        yield threads
    finally:
        _PARALLEL.release()


def _ranges_per_unit(units: int, threads: int) -> int:
    """Token ranges per unit (of ``units`` independent ones) so that there are a multiple of ``threads`` ranges in all,
    at least two per thread; one with one thread."""
    if threads <= 1:
        return 1
    return max(1, 2 * threads // math.gcd(units, 2 * threads))


def _fold(qg: torch.Tensor, acc, m, l, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None):
    """Online softmax: partials ``(acc, m, l)`` of ``qg (b, h, rows, d)`` extended by fp32 ``keys``/``values (b, h, nt,
    d)`` (``valid (b, h|1, nt)`` bool or None); a row that has seen nothing keeps ``m = -inf``, ``l = 0``."""
    s = torch.matmul(qg, keys.transpose(-1, -2))  # (b, h, rows, nt)
    if valid is not None:
        s = s.masked_fill(~valid[:, :, None, :].to(torch.bool), float("-inf"))
    m_new = torch.maximum(m, s.amax(dim=-1))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - safe.unsqueeze(-1))
    alpha = torch.exp(m - safe)
    return acc * alpha.unsqueeze(-1) + torch.matmul(p, values), m_new, l * alpha + p.sum(dim=-1)


def _with_dense(qg: torch.Tensor, partials, keys: torch.Tensor, values: torch.Tensor):
    """``partials = (acc, m, l)`` of ``qg (b, h, rows, d)`` merged with dense ``keys``/``values (b, h, nt, d)`` every
    row sees (torch; the numba kernel folds them in itself)."""
    if not keys.shape[2]:
        return partials
    return _fold(qg, *partials, keys.float(), values.float())


def chunked_partials(qg: torch.Tensor, read, n: int, chunk: int, valid: torch.Tensor | None = None,
                     mult: torch.Tensor | None = None):
    """The ``KVPart.fused`` contract computed by dequantizing ``chunk`` tokens at a time and two matmuls per chunk:
    ``read(start, stop, torch.float32) -> (keys, values)`` each ``(b, kv_heads, stop - start, d)``; ``qg``, ``valid``
    ``mult`` and the returned ``(acc, m, l)`` as in :func:`kivi_attention`. What a fused part falls back to for many
    query rows (a long prefill chunk), where BLAS beats the kernel."""
    b, h, rows, d = qg.shape
    acc = qg.new_zeros(b, h, rows, d)
    m = qg.new_full((b, h, rows), float("-inf"))
    l = qg.new_zeros(b, h, rows)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        k, v = read(start, stop, torch.float32)
        if mult is not None:
            k, v = k * mult[:, :, 0, start:stop, None], v * mult[:, :, 1, start:stop, None]
        acc, m, l = _fold(qg, acc, m, l, k, v, None if valid is None else valid[:, :, start:stop])
    return acc, m, l


def float_partials(qg: torch.Tensor, read, n: int, chunk: int, valid: torch.Tensor | None = None,
                   mult: torch.Tensor | None = None):
    """:func:`chunked_partials` (same arguments and result) where the numba kernel takes each chunk: the chunk read as
    floats is the kernel's float tail (:func:`kivi_attention` with no codes), so scores, masking, the per-token
    multipliers and the online softmax are one call instead of ~a dozen torch ops per chunk; the chunks' partials
    merged by log-sum-exp. For 2-byte tokens attended with multipliers (MiniCache's fp16 directions)."""
    if backend(qg.device) != "numba":
        return chunked_partials(qg, read, n, chunk, valid, mult)
    from ..attention.parts import _merge_partials

    d = qg.shape[-1]
    partials = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        k, v = read(start, stop, torch.float32)
        partials.append(kivi_attention(qg, stop - start, None, None, None, 8, _FLOAT_BLOCK, None, None, None, 8, d,
                                       None if valid is None else valid[:, :, start:stop], k_tail=k, v_tail=v,
                                       mult=None if mult is None else mult[:, :, :, start:stop]))
    if not partials:
        return chunked_partials(qg, read, 0, 1)
    return _merge_partials(partials)


_FLOAT_BLOCK = 32  # the kernel's token block over float tokens


def scattered_partials(qg: torch.Tensor, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       seen: torch.Tensor | None = None):
    """The ``KVPart.fused`` partials of ``qg (b, h, rows, d)`` fp32 (scaled) over entries of several (batch, KV head)
    rows held in one list (MiniCache's retained entries): entry ``e`` belongs to row ``idx[e] % (b * h)`` (``idx
    (r,)`` int, in any order), with key ``keys[e]`` and value ``values[e]`` (``(r, d)`` float), visible where ``seen
    (r,)`` bool (None: all). Returns ``(acc (b, h, rows, d), m, l (b, h, rows))`` fp32. One numba call on the CPU
    (:func:`kvcompress.kernels.cpu.scattered_partials`); elsewhere the entries are laid out per row and attended in
    torch."""
    b, h, rows, d = qg.shape
    if backend(qg.device) == "numba":
        acc = np.empty((b, h, rows, d), np.float32)
        m = np.empty((b, h, rows), np.float32)
        l = np.empty((b, h, rows), np.float32)
        _cpu.scattered_partials(_np32(qg), _np(idx.to(torch.int32)), _np32(keys), _np32(values),
                                _NO_SEEN if seen is None else _np(seen.to(torch.bool)), acc, m, l)
        return torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(l)
    row = idx.long() % (b * h)
    counts = torch.bincount(row, minlength=b * h)
    width = int(counts.max()) if row.numel() else 0
    order = torch.argsort(row, stable=True)
    row = row[order]
    slot = torch.arange(row.numel(), device=row.device) - (torch.cumsum(counts, 0) - counts)[row]
    laid_k = qg.new_zeros(b * h, width, d)
    laid_v = laid_k.clone()
    ok = torch.zeros(b * h, width, dtype=torch.bool, device=qg.device)
    laid_k[row, slot] = keys[order].float()
    laid_v[row, slot] = values[order].float()
    ok[row, slot] = True if seen is None else seen[order]
    laid_k, laid_v = laid_k.view(b, h, width, d), laid_v.view(b, h, width, d)
    return chunked_partials(qg, lambda a, z, dt: (laid_k[:, :, a:z], laid_v[:, :, a:z]), width, max(width, 1),
                            ok.view(b, h, width))


def scattered_mask(idx: torch.Tensor, b: int, h: int, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, h, n)`` bool, contiguous: True except at the entries ``idx (r,)`` (position * b*h + row, positions below
    ``n``) and where ``valid (b, 1|h, n)`` bool is False (None: nowhere)."""
    if backend(idx.device) == "numba":
        out = torch.empty(b, h, n, dtype=torch.bool)
        _cpu.scattered_mask(_np(idx.to(torch.int32)), b, h, n,
                            _ALL_VALID if valid is None else _np(valid.to(torch.bool)), _np(out))
        return out
    flat = torch.ones(n * b * h, dtype=torch.bool, device=idx.device)
    flat[idx.long()] = False
    out = flat.view(n, b, h).permute(1, 2, 0)
    return (out if valid is None else out & valid.to(torch.bool)).contiguous()


_NO_SEEN = np.ones(0, np.bool_)


# --------------------------------------------------------------------------------------------------------------------
# KVQuant's layout: codebook levels, per-channel or per-token ranges, CSR outliers, pre-RoPE keys
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CodebookCodes:
    """Tokens quantized to codebook levels, as KVQuant stores them (views of the held buffers, never copies).

    A token's element ``c`` of KV head ``hh`` is ``levels[code] * scale + offset``, unless an outlier of its row
    replaces it. ``planes``: ``[(b, h, >= n, d*bits/8)]`` uint8 for 1/2/4/8 bits, ``[low (2-bit), high (1-bit)]`` for 3
    bits (code = low | high << 2); packed as :func:`kvcompress.quant.pack_bits`. ``levels (2**bits,)`` float32.
    ``per_channel``: ``scale``/``offset (1|b, h*d)`` fp16 (one range per channel); else ``(b, 1|h, >= n, 1)`` fp16
    (one per token, over all KV heads or per head). Outliers (None: none): CSR rows, row = (token, batch row)
    token-major, width ``h*d``: ``counts (b, 1, >= n)`` per row, ``cols (>= nnz,)`` the column, ``vals (>= nnz,)``
    fp16 the exact value."""

    planes: list
    bits: int
    levels: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    per_channel: bool
    counts: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    vals: torch.Tensor | None = None
    _arrays: tuple | None = field(default=None, init=False, repr=False, compare=False)  # numpy views (first use)


@dataclass
class RotaryPositions:
    """How pre-RoPE keys are rotated to their positions (rotate-half convention, as llama-like models): channel
    pairs ``(j, j + d/2)`` turn by ``position * inv_freq[j]``, both times ``scaling`` (the rotary module's attention
    scaling). Positions are ``start, start + 1, ...`` (``start`` an int) or ``positions (1|b, >= n)`` int."""

    inv_freq: torch.Tensor
    scaling: float = 1.0
    start: int | None = 0
    positions: torch.Tensor | None = None


def kvquant_fused_applies(device: torch.device, keys: CodebookCodes, values: CodebookCodes, head_dim: int) -> bool:
    """Whether :func:`kvquant_attention` serves these codes on ``device``: the numba kernel for CPU tensors (2, 3 or 4
    bits, ``head_dim`` a multiple of 8, values per token, outlier buffers contiguous on a little-endian machine)."""
    if backend(device) == "triton":
        return keys.bits in (2, 3, 4) and values.bits in (2, 3, 4) and head_dim % 8 == 0 and not values.per_channel
    if backend(device) != "numba" or head_dim % 8 or values.per_channel:
        return False
    in_place = sys.byteorder == "little" and all(t is None or t.is_contiguous() for c in (keys, values)
                                                 for t in (c.counts, c.cols))  # read as bytes, in place
    return in_place and keys.bits in (2, 3, 4) and values.bits in (2, 3, 4)


@lru_cache(maxsize=16)
def _column_map(d: int, h: int) -> np.ndarray:
    """``(2, h*d)`` int64: the KV head and the channel of each column of an outlier row (tables: no division per
    entry in the kernel)."""
    c = np.arange(h * d)
    return np.stack([c // d, c % d]).astype(np.int64)


def _words(plane: np.ndarray | None, b: int, h: int) -> np.ndarray:
    """A plane ``(b, h, cap, bytes)`` uint8 read as little-endian 64-bit words ``(b, h, cap, bytes/8)`` (the same
    memory), or an empty placeholder (no plane, or rows that are not whole words: the kernel reads bytes)."""
    if plane is None or plane.shape[-1] % 8 or plane.strides[-1] != 1 or plane.strides[-2] % 8:
        return np.zeros((b, h, 1, 0), np.uint64)
    return plane.view(np.uint64)


def _half_bits(t: torch.Tensor) -> np.ndarray:
    """An fp16 tensor's bits as a uint16 numpy array of the same shape and strides (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


_NO_CHANNEL_RANGE = np.zeros((1, 0), np.uint16)
_NO_TAIL = (np.zeros((1, 1, 0, 1), np.float32),) * 2
_NO_ROTATION = np.zeros(0, np.float32)
_NO_POSITIONS = np.zeros((1, 0), np.int64)


def _stream_arrays(codes: CodebookCodes, b: int, h: int, d: int):
    """The numpy views of one stream's buffers the kernel reads, made once per :class:`CodebookCodes` (a store that
    hands out the same object while its buffers stay the same pays this once, not every step): ``(bits, plane0,
    plane1, words0, words1, levels, scale, offset, counts, cols, vals)`` -- fp16 as its bits (uint16), nothing
    copied (a view holds no memory of its own), the planes read as 64-bit words when ``d`` is a multiple of 64
    (every plane row a whole number of words); ``scale``/``offset`` per channel ``(1|b, h*d)`` or per token ``(b, 1|h,
    >= n)``."""
    if codes._arrays is not None:
        return codes._arrays
    p0 = _rows_view(codes.planes[0])
    p1 = _rows_view(codes.planes[1]) if codes.bits == 3 else None
    w0, w1 = (_words(p if d % 64 == 0 else None, b, h) for p in (p0, p1))
    if p1 is None:
        p1 = np.zeros((b, h, 0, 0), np.uint8)
    lev = _np(codes.levels.float())
    if codes.per_channel:
        scale, offset = (_half_bits(t.reshape(-1, h * d)) for t in (codes.scale, codes.offset))
    else:  # fp16 bits, decoded in the kernel (no copy)
        scale, offset = (_half_bits(t)[..., 0] for t in (codes.scale, codes.offset))  # (b, 1|h, >= n)
    sparse = (None, None, None) if codes.counts is None or codes.cols is None else \
        (_int_bytes(codes.counts), _int_bytes(codes.cols), _half_bits(codes.vals))
    codes._arrays = (codes.bits, p0, p1, w0, w1, lev, scale, offset, *sparse)
    return codes._arrays


def _int_bytes(t: torch.Tensor) -> np.ndarray:
    """A held integer tensor (uint8, int16 or int32; non-negative values) as its little-endian bytes ``(*t.shape,
    width)`` uint8, the same memory: the kernel reads every width in place with one signature
    (:func:`kvcompress.kernels.kvquant_cpu._small`) -- no per-step copy of the outlier columns, no compile per width.
    ``t`` contiguous, on a little-endian machine (:func:`kvquant_fused_applies` checks both)."""
    a = t.numpy()
    return a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize)


_NO_SPARSE = (np.zeros((1, 1, 0, 1), np.uint8), np.zeros((0, 1), np.uint8), np.zeros(0, np.uint16))


def _stream_args(codes: CodebookCodes, n: int, b: int, h: int, d: int):
    """:func:`_stream_arrays`, with ``(b, 1, 0, 1)`` counts when no outlier is kept (the kernel reads the first ``n``
    tokens' entries)."""
    bits, p0, p1, w0, w1, lev, scale, offset, counts, cols, vals = _stream_arrays(codes, b, h, d)
    if counts is None:
        counts, cols, vals = _NO_SPARSE
    return bits, p0, p1, w0, w1, lev, scale, offset, counts, cols, vals


def _kvquant_code_args(n: int, keys: CodebookCodes, values: CodebookCodes, rope: RotaryPositions | None, b: int,
                       h: int, d: int) -> tuple:
    """The arguments of :func:`kvcompress.kernels.kvquant_cpu.kvquant_layer_serial` from ``kbits`` to ``positions``
    except the column map: ``(streams, rotation)`` -- both streams' held buffers as numpy views
    (:func:`_stream_args`), and the rotation."""
    kbits, kp0, kp1, kw0, kw1, klev, kts, kto, kcounts, kcols, kvals = _stream_args(keys, n, b, h, d)
    if keys.per_channel:  # fp16 bits (1|b, h*d), decoded in the kernel
        kcs, kco = kts, kto
        kts = kto = np.zeros((b, 1, 0), np.uint16)
    else:
        kcs = kco = _NO_CHANNEL_RANGE
    if rope is None:
        inv_freq, rscale, start, positions = _NO_ROTATION, 1.0, 0, _NO_POSITIONS
    else:
        inv_freq, rscale = _np(rope.inv_freq.float()), float(rope.scaling)
        if rope.positions is None:
            start, positions = int(rope.start), _NO_POSITIONS
        else:
            start, positions = -1, _np(rope.positions[:, :n].long())
    return ((kbits, kp0, kp1, kw0, kw1, klev, keys.per_channel, kcs, kco, kts, kto, kcounts, kcols, kvals,
             *_stream_args(values, n, b, h, d)), (inv_freq, rscale, start, positions))


def kvquant_attention(qg: torch.Tensor, n: int, keys: CodebookCodes, values: CodebookCodes,
                      rope: RotaryPositions | None = None, valid: torch.Tensor | None = None,
                      tail: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Attention partials of ``qg`` over ``n`` tokens held as KVQuant codes (the ``KVPart.fused`` contract).

    ``qg (b, kv_heads, rows, d)`` fp32, already scaled; ``keys``/``values``: :class:`CodebookCodes` of the same ``n``
    tokens (values per token); ``rope``: rotate the keys to their positions (pre-RoPE keys), None = keys as stored;
    ``valid (b, kv_heads | 1, n)`` bool or None; ``tail``: dense ``(keys, values)`` ``(b, kv_heads, nt, d)`` that every
    query row also sees (a decode step's full-precision tokens), folded into the same partials. Returns fp32 ``acc (b,
    kv_heads, rows, d)``, ``m``, ``l (b, kv_heads, rows)`` as :func:`kivi_attention`. Numba (:mod:`.kvquant_cpu`); see
    :func:`kvquant_fused_applies`."""
    if backend(qg.device) == "triton":
        from . import kvquant_gpu

        out = kvquant_gpu.kvquant_attention(qg, n, keys, values, rope, valid)
        return out if tail is None else _with_dense(qg, out, *tail)
    b, h, rows, d = qg.shape
    q = _np32(qg)
    streams, rotation = _kvquant_code_args(n, keys, values, rope, b, h, d)
    vmask = _ALL_VALID if valid is None else _np(valid if valid.dtype == torch.bool else valid.bool())
    tk, tv = _NO_TAIL if tail is None else (_np(t.float()) for t in tail)
    acc = np.empty((b, h, rows, d), np.float32)
    m = np.empty((b, h, rows), np.float32)
    l = np.empty((b, h, rows), np.float32)

    def args(splits):
        return (q, *streams, _column_map(d, h), *rotation, vmask, n, _ceil(n, splits), tk, tv, acc, m, l)

    _run_layer(_kvq_cpu.kvquant_layer_serial, _kvq_cpu.kvquant_layer_parallel, args, b, b * h * n)
    return torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(l)


def kvquant_decode(query: torch.Tensor, scaling: float, n: int, keys: CodebookCodes, values: CodebookCodes,
                   rope: RotaryPositions | None, held: tuple | None, new_k: torch.Tensor, new_v: torch.Tensor,
                   memo: dict | None = None, append: tuple | None = None):
    """A whole one-query decode step over ``n`` tokens of KVQuant codes followed by dense tokens, by one numba call
    (:func:`kvcompress.kernels.kvquant_cpu.kvquant_decode_step`): what :func:`kvquant_attention` with the dense
    tokens as its ``tail``, then ``acc / l``, computes -- bit for bit, over the same token ranges on the same threads
    (:func:`_kernel_threads`) -- without the torch calls around it.

    ``query (b, heads, 1, d)``; ``held``: the held 2-byte tokens that come first in the tail (the sink and the recent
    window) as ``(key bits, value bits (b, h, r, d) uint16, bf16)`` (:func:`two_byte_bits`; fp16, or bfloat16 with
    ``bf16``), or None; ``new_k``/``new_v (b, h, 1, d)`` the step's own tokens (any float dtype); the codes and the
    rotation as :func:`kvquant_attention`; ``memo``: a dict the caller keeps for exactly these ``keys`` and
    ``values`` objects (and drops with them: it holds views of their buffers), where their numpy views are kept from
    step to step (with the ``rope`` object they were made for), and the one-call step's numba plan
    (:func:`_decode_plan`). Returns the output ``(b, 1, heads, d)`` in the query's dtype, or None where the threaded
    kernel is due but another Python thread is inside numba's thread pool (the caller takes the general path, which
    runs the serial kernel then).

    ``append``: ``(key arguments, value arguments, (cos, sin))`` -- each stream's
    :meth:`kvcompress.methods.kvquant_store.QuantStream.kernel_append_args` and the keys' un-rotation as float32 numpy
    (``(1, 0, 0)`` each: none) --: the same call also quantizes ``new_k``/``new_v`` into the streams' buffers
    (:func:`kvcompress.kernels.kvquant_cpu.kvquant_decode_append`); returns ``(output, key result, value result)``
    then, the results for :meth:`~kvcompress.methods.kvquant_store.QuantStream.commit_kernel_append` (nothing is
    committed here)."""
    b, heads, _, d = query.shape
    h = new_k.shape[1]
    with _kernel_threads(b * h * n) as threads:
        if not threads:
            return None
        # the token ranges kvquant_attention's _run_layer gives: the same partials, merged alike
        span = _ceil(n, _ranges_per_unit(b, threads))
        kept = None if memo is None else memo.get("decode")
        if kept is None or kept[0] is not rope:
            streams, rotation = _kvquant_code_args(n, keys, values, rope, b, h, d)  # views, no copies
            kept = (rope, streams, rotation)
            # kept only when nothing in it is a copy (stored positions are sliced to n, a 2-byte inv_freq made float32)
            if memo is not None and (rope is None or (rope.positions is None and rope.inv_freq.dtype == torch.float32)):
                memo["decode"] = kept
        out = torch.empty((b, 1, heads, d))
        q, o = _np32(query).reshape(b, heads, d), out.numpy().reshape(b, heads, d)
        held = _NO_HELD_BITS if held is None else held
        if append is None:
            _kvq_cpu.kvquant_decode_step(q, float(scaling), *kept[1], _column_map(d, h), *kept[2], *held,
                                         _np32(new_k), _np32(new_v), n, span, o)
            return out if query.dtype == torch.float32 else out.to(query.dtype)
        (khead, kt0, ktail, ke0), (vhead, vt0, vtail, ve0), (ucos, usin) = append
        plan = _decode_plan(memo, kept, _column_map(d, h), held, khead, ktail, vhead, vtail)
        results = _kvq_cpu.kvquant_decode_append(q, float(scaling), plan, _np32(new_k), _np32(new_v), n, span, o, kt0,
                                                 ke0, vt0, ve0, ucos, usin)
        return (out if query.dtype == torch.float32 else out.to(query.dtype)), *results


def _decode_plan(memo: dict | None, kept: tuple, colmap, held, khead, ktail, vhead, vtail):
    """The :class:`~kvcompress.kernels.kvquant_cpu.DecodePlan` of these arguments: the one kept in ``memo`` while every
    one of them is the same object as when it was made (the streams keep their kernel arguments until a buffer is
    replaced, :func:`kvquant_decode` its code views), else a new one, kept there -- only where the code views are
    kept too: the plan holds what its parts hold, and code views made afresh each step may hold copies (a 2-byte
    ``inv_freq`` made float32) that nothing counts. ``colmap`` is not compared: the shared table of this layer's shape
    (:func:`_column_map`), the same values whichever copy."""
    parts = (kept, held, khead, ktail, vhead, vtail)
    made = None if memo is None else memo.get("plan")
    if made is not None and all(a is b for a, b in zip(made[0], parts)):
        return made[1]
    plan = _kvq_cpu.decode_plan(kept[1], colmap, kept[2], held, khead, ktail, vhead, vtail, _NO_UNROTATE)
    if memo is not None and memo.get("decode") is kept:
        memo["plan"] = (parts, plan)
    return plan


def two_byte_bits(k: torch.Tensor, v: torch.Tensor) -> tuple:
    """``(key bits, value bits, bf16)``: 2-byte float tensors (fp16 or bfloat16) ``(b, h, r, d)`` as their uint16 bits
    (C-contiguous numpy; no copy when contiguous), as :func:`kvquant_decode` takes them."""
    return _bits16(k), _bits16(v), k.dtype == torch.bfloat16


_NO_HELD = np.zeros((1, 1, 0, 1), np.uint16)
_NO_HELD_BITS = (_NO_HELD, _NO_HELD, False)
_NO_UNROTATE = (np.zeros((1, 0, 0), np.float32),) * 2

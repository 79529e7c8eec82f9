"""Fused attention kernels (kvcompress.kernels): equal to dequantize-then-attend, wired into KIVI's parts, and the same
generations with the kernels on and off -- the CPU kernel (numba) and the Triton kernel (on a CPU-only machine in
Triton's interpreter, ``TRITON_INTERPRET=1``, fp16/fp32 only; on a CUDA machine compiled, on CUDA tensors).

Tolerance (fp32 kernel vs an fp64 reference over the same dequantized codes), both kernels: the normalized output
within ``2e-5 * (1 + max |v|)`` and the log-sum-exp within ``2e-5 * (1 + max |s|)`` -- fp32 rounding of the scores and
of the sums, and the CPU kernel's polynomial exp (relative error < 2e-7); the Triton kernel's dots run at
``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import ModelGeometry, attention, kernels, make_cache
from kvcompress.attention import KVPart, attend_parts
from kvcompress.compat import cache_kwargs
from kvcompress.quant import quantize_uniform
from kvcompress.storage import make_storage

cpu = kernels._cpu  # None without numba
needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason=kernels.UNAVAILABLE_REASON)
needs_triton = pytest.mark.skipif(not kernels.triton_status()[0], reason=kernels.triton_status()[1])
#: where the Triton kernel runs in these tests: compiled on a GPU when there is one, else interpreted on the CPU
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = 2e-5


def triton_kernel():
    """:mod:`kvcompress.kernels.gpu`, checked to be interpreted when there is no GPU (``tests/conftest.py`` sets
    ``TRITON_INTERPRET=1`` before triton is first imported: triton reads it then)."""
    from kvcompress.kernels import gpu
    from triton.runtime.interpreter import InterpretedFunction

    if TRITON_DEVICE == "cpu":
        assert isinstance(gpu._kivi_partials, InterpretedFunction), "triton was imported before TRITON_INTERPRET=1"
    return gpu


def reference(qg, keys, values, valid):
    """fp64 ``(out, lse)`` of ``qg (b, h, rows, d)`` over ``keys``/``values (b, h, n, d)``; ``valid (b, h|1, n)`` or None.
    Rows that see nothing: out 0, lse -inf."""
    s = torch.einsum("bhrd,bhnd->bhrn", qg.double(), keys.double())
    if valid is not None:
        s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(0.0, neginf=0.0)[..., None]).nan_to_num(0.0)
    return torch.einsum("bhrn,bhnd->bhrd", p, values.double()), lse, s


def check_partials(acc, m, l, qg, keys, values, valid):
    """``(acc, m, l)`` of a fused kernel against :func:`reference` (see the module docstring for the tolerance)."""
    want, lse, s = reference(qg, keys, values, valid)
    seen = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(m), seen)  # -inf exactly where a row sees nothing ...
    assert bool((l[~seen] == 0).all()) and bool((acc[~seen] == 0).all())  # ... and nothing is summed there
    out = acc.double() / l.double().clamp_min(1e-300)[..., None]
    assert (out - want).abs().max().item() <= TOL * (1 + values.abs().max().item())
    if bool(seen.any()):
        got_lse = m.double() + torch.log(l.double())
        assert (got_lse[seen] - lse[seen]).abs().max().item() <= TOL * (1 + s[torch.isfinite(s)].abs().max().item())


def fp16_randn(gen, *shape, scale=2.0):
    return (torch.randn(*shape, generator=gen) * scale).half().float()


# --------------------------------------------------------------------------------------------------------------------
# The kernel alone
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    """(k_bits, v_bits, d, G, Gv) with Gv dividing d and never splitting a packing unit of the value codes."""
    k_bits, v_bits = draw(st.sampled_from([1, 2, 3, 4, 5, 8])), draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    d = draw(st.sampled_from([8, 16, 24, 64, 128]))  # 64 and 128 take constant-trip loops
    per = 8 // v_bits if 8 % v_bits == 0 else 8
    gv = draw(st.sampled_from([g for g in range(per, d + 1, per) if d % g == 0]))
    return k_bits, v_bits, d, draw(st.integers(1, 12)), gv


def padding_mask(gen, b: int, kv: int, n: int, padding: str):
    """Validity ``(b, 1|kv, n)`` of a test case's tokens: "none" (None), "shared" (by the KV heads), "per-head", "all"
    (the last batch row sees nothing: m = -inf, l = 0, acc = 0)."""
    if padding == "shared":
        return torch.rand(b, 1, n, generator=gen) > 0.3
    if padding == "per-head":
        return torch.rand(b, kv, n, generator=gen) > 0.5
    if padding == "all":
        valid = torch.ones(b, 1, n, dtype=torch.bool)
        valid[-1] = False
        return valid
    return None


def kivi_case(layout, n, tails, b, kv, group, q, padding, seed, k_per_token=False):
    """One random layer held as KIVI codes + float tails: ``(qg, n, codes..., tails, valid)`` for the kernels and the
    dequantized ``(keys, values)`` the reference attends to. ``tails = (r_k, r_v)``: tokens after the codes (clipped to
    ``n``); ``padding``: "none", "shared" (by the KV heads), "per-head", "all" (the last batch row sees nothing).
    ``k_per_token``: keys quantized like the values, per token in groups of ``G`` channels (``layout``'s ``G``)."""
    k_bits, v_bits, d, G, Gv = layout
    gen = torch.Generator().manual_seed(seed)
    rk, rv = min(tails[0], n), min(tails[1], n)  # tokens held as floats after the codes
    nk, nv = n - rk, n - rv
    keys, values = fp16_randn(gen, b, kv, n, d), fp16_randn(gen, b, kv, n, d)
    # the store quantizes whole key groups; the kernel reads the first nk coded tokens
    padded_keys = torch.cat([keys[:, :, :nk], fp16_randn(gen, b, kv, -(-nk // G) * G - nk, d)], 2)
    if k_per_token:
        kq = quantize_uniform(keys[:, :, :nk], k_bits, axis=3, group_size=G) if nk else None
    else:
        kq = quantize_uniform(padded_keys, k_bits, axis=2, group_size=G) if nk else None
    vq = quantize_uniform(values[:, :, :nv], v_bits, axis=3, group_size=Gv) if nv else None
    qg = torch.randn(b, kv, group * q, d, generator=gen) * d**-0.5
    valid = padding_mask(gen, b, kv, n, padding)
    args = (qg, n, *((kq.packed, kq.scale, kq.zero) if kq is not None else (None,) * 3), k_bits, G,
            *((vq.packed, vq.scale, vq.zero) if vq is not None else (None,) * 3), v_bits, Gv, valid)
    tails_kw = {"k_tail": keys[:, :, nk:] if rk else None, "v_tail": values[:, :, nv:].half() if rv else None}
    if k_per_token:
        tails_kw["k_per_token"] = True
    ref_k = torch.cat([kq.dequantize()[:, :, :nk] if nk else keys[:, :, :0], keys[:, :, nk:]], 2)
    ref_v = torch.cat([vq.dequantize() if nv else values[:, :, :0], values[:, :, nv:]], 2)
    return args, tails_kw, (ref_k, ref_v)


def to_device(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def with_multipliers(args, tails_kw, ref, seed):
    """A case's kernel arguments with per-token key / value multipliers ``mult (b, kv, 2, n)`` (MiniCache's magnitudes:
    positive, fp16-rounded, 0.05-4) added, and the reference's keys and values multiplied by them."""
    ref_k, ref_v = ref
    b, kv, n, _ = ref_k.shape
    gen = torch.Generator().manual_seed(seed + 1)
    mult = (0.05 + 3.95 * torch.rand(b, kv, 2, n, generator=gen)).half().float()
    return args, dict(tails_kw, mult=mult), (ref_k * mult[:, :, 0, :, None], ref_v * mult[:, :, 1, :, None])


@needs_numba
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=layouts(),
    n=st.integers(1, 90),
    tails=st.tuples(st.integers(0, 90), st.integers(0, 90)),
    b=st.integers(1, 2),
    kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    q=st.integers(1, 5),
    padding=st.sampled_from(["none", "shared", "per-head", "all"]),
    parallel=st.booleans(),
    mult=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_fused_equals_dequantize_then_attend(layout, n, tails, b, kv, group, q, padding, parallel, mult, seed):
    """Any bits (1-8), token counts that are not a multiple of the key group, keys and values leaving the float tail
    at different points (none, some, all tokens coded), batch, GQA ratios (1, 3, MHA/MQA), one or several queries,
    padding (shared by the KV heads, per head, a whole row), serial and threaded; with and without per-token key /
    value multipliers (``mult``)."""
    case = kivi_case(layout, n, tails, b, kv, group, q, padding, seed)
    args, tails_kw, (ref_k, ref_v) = with_multipliers(*case, seed) if mult else case
    qg, valid = args[0], args[-1]
    before = kernels.MIN_PARALLEL_WORK
    kernels.MIN_PARALLEL_WORK = 0 if parallel else 1 << 62
    try:
        acc, m, l = kernels.kivi_attention(*args, **tails_kw)
    finally:
        kernels.MIN_PARALLEL_WORK = before
    assert acc.shape == (b, kv, group * q, layout[2]) and m.shape == l.shape == (b, kv, group * q)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)


@needs_numba
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("d,gv,rows", [(64, 32, (3, 1)), (128, 64, (1, 5)), (64, 64, (2, 2)), (512, 16, (3, 1))])
@pytest.mark.parametrize("n,tails", [(32, (0, 0)), (100, (0, 0)), (130, (5, 37)), (97, (40, 2))])
@pytest.mark.parametrize("parallel", [False, True])
def test_whole_blocks_equal_dequantize_then_attend(bits, d, gv, rows, n, tails, parallel):
    """The kernel's path for a token range's leading whole blocks (``cpu._whole_blocks``: keys per channel in groups
    of 32 tokens, values per token, both 2 or 4 bits, ``d`` a multiple of 64, no padding, no multipliers; the random
    layouts above never take it), then the general loop for the partial block and the float tails: the blocks whole
    up to the first key or value tail, serial and split over threads. d = 512 in groups of 16: 32 value groups, more
    than the fused value path takes (``cpu._values_fused``, <= 16), so the scratch-row path runs there at 4 bits."""
    case = kivi_case((bits, bits, d, 32, gv), n, tails, 2, 2, rows[0], rows[1], "none", bits * n + d)
    args, tails_kw, (ref_k, ref_v) = case
    before = kernels.MIN_PARALLEL_WORK
    kernels.MIN_PARALLEL_WORK = 0 if parallel else 1 << 62
    try:
        acc, m, l = kernels.kivi_attention(*args, **tails_kw)
    finally:
        kernels.MIN_PARALLEL_WORK = before
    check_partials(acc, m, l, args[0], ref_k, ref_v, None)


@needs_numba
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("d,gv,rows", [(64, 32, (3, 1)), (128, 64, (1, 5))])
@pytest.mark.parametrize("padding", ["shared", "per-head"])
@pytest.mark.parametrize("mult", [False, True])
def test_general_loop_values_equal_dequantize_then_attend(bits, d, gv, rows, padding, mult):
    """The layouts of the whole-block test with padding and / or MiniCache's multipliers, so every block takes the
    kernel's general loop, whose values go through the compiled copy of the fused value path where the target has
    AVX-512 (``cpu._values_fused_call``; session 37) and through the scratch row elsewhere."""
    case = kivi_case((bits, bits, d, 32, gv), 100, (0, 3), 2, 2, rows[0], rows[1], padding, bits * d + len(padding))
    args, tails_kw, (ref_k, ref_v) = with_multipliers(*case, bits + d) if mult else case
    acc, m, l = kernels.kivi_attention(*args, **tails_kw)
    check_partials(acc, m, l, args[0], ref_k, ref_v, args[-1])


@st.composite
def per_token_key_layouts(draw):
    """(k_bits, v_bits, d, Gk, Gv): keys quantized per token in groups of ``Gk`` channels, both groups dividing ``d``
    and never splitting a packing unit of their codes."""
    k_bits, v_bits = draw(st.sampled_from([1, 2, 3, 4, 8])), draw(st.sampled_from([2, 3, 4]))
    d = draw(st.sampled_from([8, 16, 24, 64, 128]))

    def group(bits):
        per = 8 // bits if 8 % bits == 0 else 8
        return draw(st.sampled_from([g for g in range(per, d + 1, per) if d % g == 0]))

    return k_bits, v_bits, d, group(k_bits), group(v_bits)


@needs_numba
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=per_token_key_layouts(),
    n=st.integers(1, 90),  # the kernel's token blocks are 32: crossed, not always filled
    tails=st.tuples(st.integers(0, 90), st.integers(0, 90)),
    b=st.integers(1, 2),
    kv=st.integers(1, 3),
    group=st.sampled_from([1, 3, 4]),
    q=st.integers(1, 3),
    padding=st.sampled_from(["none", "shared", "per-head", "all"]),
    parallel=st.booleans(),
    mult=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_fused_per_token_keys_equals_dequantize_then_attend(layout, n, tails, b, kv, group, q, padding, parallel,
                                                            mult, seed):
    """Keys quantized per token (LogQuant's ``key_axis="token"``): the same contract and tolerance as per-channel keys,
    over bits, channel groups of the keys and values, float tails, batch, GQA, padding, serial and threaded."""
    case = kivi_case(layout, n, tails, b, kv, group, q, padding, seed, k_per_token=True)
    args, tails_kw, (ref_k, ref_v) = with_multipliers(*case, seed) if mult else case
    before = kernels.MIN_PARALLEL_WORK
    kernels.MIN_PARALLEL_WORK = 0 if parallel else 1 << 62
    try:
        acc, m, l = kernels.kivi_attention(*args, **tails_kw)
    finally:
        kernels.MIN_PARALLEL_WORK = before
    check_partials(acc, m, l, args[0], ref_k, ref_v, args[-1])


@st.composite
def triton_layouts(draw):
    """(k_bits, v_bits, d, G, Gv): 2/3/4 bits (1 and 8 too, rarely), any ``Gv`` dividing ``d`` (the Triton kernel
    gathers a scale per channel: a byte of codes may span two value groups)."""
    k_bits, v_bits = (draw(st.sampled_from([2, 3, 4, 2, 3, 4, 1, 8])) for _ in range(2))
    d = draw(st.sampled_from([8, 24, 64]))  # 24: not a power of two (masked channels)
    gv = draw(st.sampled_from([g for g in range(1, d + 1) if d % g == 0]))
    return k_bits, v_bits, d, draw(st.integers(1, 40)), gv


@needs_triton
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=triton_layouts(),
    n=st.integers(1, 150),  # up to three blocks of BLOCK_N = 64 tokens
    tails=st.tuples(st.integers(0, 150), st.integers(0, 150)),
    b=st.integers(1, 2),
    heads=st.sampled_from([(2, 1), (3, 3), (1, 4), (1, 1)]),  # (KV heads, query heads per KV head): MHA, GQA, MQA
    q=st.integers(1, 3),
    padding=st.sampled_from(["none", "shared", "per-head", "all"]),
    splits=st.sampled_from([1, 2, 3]),
    mult=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_triton_equals_dequantize_then_attend(layout, n, tails, b, heads, q, padding, splits, mult, seed):
    """The Triton kernel over the same cases as the CPU kernel: 2/3/4 bits (and 1/8), lengths that are not a multiple
    of the key group or of the kernel's block, float tails of every size (empty, some, all tokens), batch, padding,
    MHA/GQA/MQA, one or several query tokens, the context split into ranges merged by log-sum-exp, with and without
    per-token key / value multipliers. Interpreted on the CPU when there is no GPU."""
    gpu = triton_kernel()
    kv, group = heads
    case = kivi_case(layout, n, tails, b, kv, group, q, padding, seed)
    args, tails_kw, (ref_k, ref_v) = with_multipliers(*case, seed) if mult else case
    dev_args = [to_device(a, TRITON_DEVICE) for a in args]
    dev_tails = {k: to_device(v, TRITON_DEVICE) for k, v in tails_kw.items()}
    acc, m, l = (t.cpu() for t in gpu.kivi_attention(*dev_args, **dev_tails, splits=splits))
    assert acc.shape == (b, kv, group * q, layout[2]) and m.shape == l.shape == (b, kv, group * q)
    check_partials(acc, m, l, args[0], ref_k, ref_v, args[-1])


@needs_triton
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=per_token_key_layouts(),
    n=st.integers(1, 150),
    tails=st.tuples(st.integers(0, 150), st.integers(0, 150)),
    b=st.integers(1, 2),
    heads=st.sampled_from([(2, 1), (3, 3), (1, 4)]),
    padding=st.sampled_from(["none", "shared", "per-head"]),
    splits=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_triton_per_token_keys_equals_dequantize_then_attend(layout, n, tails, b, heads, padding, splits, seed):
    """The Triton kernel with keys quantized per token: same contract and tolerance."""
    gpu = triton_kernel()
    kv, group = heads
    args, tails_kw, (ref_k, ref_v) = kivi_case(layout, n, tails, b, kv, group, 1, padding, seed, k_per_token=True)
    dev_args = [to_device(a, TRITON_DEVICE) for a in args]
    dev_tails = {k: to_device(v, TRITON_DEVICE) for k, v in tails_kw.items()}
    acc, m, l = (t.cpu() for t in gpu.kivi_attention(*dev_args, **dev_tails, splits=splits))
    check_partials(acc, m, l, args[0], ref_k, ref_v, args[-1])



@needs_numba
def test_fused_reads_a_prefix_of_longer_buffers():
    """Codes of more tokens than asked for, in buffers with spare capacity (a preallocated store): only the first n
    count, and nothing is copied to make them contiguous."""
    gen = torch.Generator().manual_seed(0)
    b, h, d, G, n, cap = 2, 3, 64, 32, 100, 256
    keys, values = fp16_randn(gen, b, h, cap, d), fp16_randn(gen, b, h, cap, d)
    kq, vq = quantize_uniform(keys, 4, axis=2, group_size=G), quantize_uniform(values, 2, axis=3, group_size=32)
    views = [t[:, :, : (n if t.shape[2] == cap else -(-n // G))] for t in (kq.packed, kq.scale, kq.zero)]
    vviews = [t[:, :, :n] for t in (vq.packed, vq.scale, vq.zero)]
    assert not views[0].is_contiguous()
    assert kernels._rows_view(views[0]).ctypes.data == kq.packed.data_ptr()  # a view of the buffer, not a copy
    qg = torch.randn(b, h, 3, d, generator=gen) / 8
    acc, m, l = kernels.kivi_attention(qg, n, *views, 4, G, *vviews, 2, 32)
    check_partials(acc, m, l, qg, kq.dequantize()[:, :, :n], vq.dequantize()[:, :, :n], None)


@needs_triton
def test_triton_reads_a_prefix_of_longer_buffers():
    """The Triton kernel takes strided views of buffers with spare capacity (strides passed, nothing copied) and a
    validity slice of a longer mask."""
    gpu = triton_kernel()
    gen = torch.Generator().manual_seed(0)
    b, h, d, G, n, cap = 2, 3, 64, 32, 100, 256
    keys, values = fp16_randn(gen, b, h, cap, d), fp16_randn(gen, b, h, cap, d)
    kq, vq = quantize_uniform(keys, 4, axis=2, group_size=G), quantize_uniform(values, 2, axis=3, group_size=32)
    kq.packed, kq.scale, kq.zero, vq.packed, vq.scale, vq.zero = (
        t.to(TRITON_DEVICE) for t in (kq.packed, kq.scale, kq.zero, vq.packed, vq.scale, vq.zero))
    views = [t[:, :, : (n if t.shape[2] == cap else -(-n // G))] for t in (kq.packed, kq.scale, kq.zero)]
    vviews = [t[:, :, :n] for t in (vq.packed, vq.scale, vq.zero)]
    valid = (torch.rand(b, 1, cap + 10, generator=gen) > 0.2)[:, :, 5 : n + 5]
    qg = torch.randn(b, h, 3, d, generator=gen) / 8
    acc, m, l = (t.cpu() for t in gpu.kivi_attention(qg.to(TRITON_DEVICE), n, *views, 4, G, *vviews, 2, 32,
                                                      valid.to(TRITON_DEVICE), splits=2))
    check_partials(acc, m, l, qg, kq.dequantize().cpu()[:, :, :n], vq.dequantize().cpu()[:, :, :n], valid)


@needs_numba
def test_kernel_scratch_starts_on_a_cache_line():
    """The kernels' vector scratch (``cpu._aligned`` / ``_scratch`` / ``_scratch3``) starts on a 64-byte boundary and
    has the shape asked for, whichever 32-byte-aligned address numba's allocator returns (200 sizes, so both kinds
    come up), and the whole extent can be written."""
    from numba import njit

    from kvcompress.kernels import cpu

    @njit(cache=False)
    def allocate(n, rows, cols):
        aligned = np.empty(n, np.int64)
        for i in range(n):
            a = cpu._aligned(i + 1)
            a[:] = 1.0
            aligned[i] = a.ctypes.data % 64 + (0 if a.shape[0] == i + 1 else 1000)
        s2 = cpu._scratch(rows, cols)
        s3 = cpu._scratch3(2, rows, cols)
        s2[:] = 2.0
        s3[:] = 3.0
        return aligned, s2.ctypes.data % 64, s2.shape, s3.ctypes.data % 64, s3.shape

    aligned, a2, shape2, a3, shape3 = allocate(200, 3, 64)
    assert (aligned == 0).all(), aligned
    assert (a2, a3, shape2, shape3) == (0, 0, (3, 64), (2, 3, 64))


@functools.cache
def _piece_runners():
    """Two numba functions that call the kernel's eight- or sixteen-lane block pieces (compiled once per session)."""
    from numba import njit, uint64

    from kvcompress.kernels import cpu

    @njit(cache=False)
    def unpack(wide, src, ta, nt, bits, units, scales, zeros, ngroups, run, out):
        if wide:
            cpu._unpack_vec16(src, ta, nt, bits, units, scales, zeros, ngroups, run, out)
        else:
            cpu._unpack_vec8(src, ta, nt, bits, units, scales, zeros, ngroups, run, out)

    @njit(cache=False)
    def scores_values(wide, qs, bias, kf, nt, sc, pk, vf, acc):
        if wide:
            cpu._scores_vec16(qs, bias, kf, uint64(nt), sc, uint64(pk))
            cpu._values_vec16(vf, uint64(nt), sc, acc, uint64(pk))
        else:
            cpu._scores_vec8(qs, bias, kf, uint64(nt), sc, uint64(pk))
            cpu._values_vec8(vf, uint64(nt), sc, acc, uint64(pk))

    return unpack, scores_values


@needs_numba
@pytest.mark.parametrize("bits,units,ngroups", [(4, 32, 0), (4, 32, 2), (2, 16, 0), (2, 16, 2), (4, 64, 4), (2, 32, 1)])
@pytest.mark.parametrize("nt", [32, 13, 1])
def test_sixteen_lane_pieces_equal_the_eight_lane_ones(bits, units, ngroups, nt):
    """The kernel's sixteen-lane block pieces (taken where numba's target has AVX-512) against its eight-lane ones (taken
    elsewhere), both compiled here whatever the host: the unpacked codes, and the values ``code * scale + zero`` per
    value group, bit for bit; the scores and the value sums against float64 within float32 rounding. So both paths are
    checked on every CI host, not only the one its CPU picks."""
    from numba import uint64

    from kvcompress.kernels import cpu

    unpack, scores_values = _piece_runners()
    rng = np.random.default_rng(bits * 100 + units + ngroups + nt)
    per = 8 // bits
    d = units * per
    src = rng.integers(0, 256, (nt + 3, units), dtype=np.uint8)
    run = cpu._run_groups(bits, uint64(units), uint64(d // max(ngroups, 1)))
    scales = rng.random(nt * max(ngroups, 1), dtype=np.float32) + np.float32(0.5)
    zeros = rng.standard_normal(nt * max(ngroups, 1)).astype(np.float32)
    got = [np.full((nt, d), np.nan, np.float32) for _ in range(2)]
    for wide in (False, True):
        unpack(wide, src, uint64(2), uint64(nt), bits, uint64(units), scales, zeros, uint64(ngroups), run, got[wide])
    assert np.array_equal(got[0], got[1])
    codes = np.stack([(src[2:2 + nt] >> (k * bits)) & ((1 << bits) - 1) for k in range(per)], 1).reshape(nt, d)
    if ngroups:
        group = np.arange(d) % units * per // (d // ngroups)  # position k * units + u holds channel u * per + k
        codes = codes * scales.reshape(nt, ngroups)[:, group] + zeros.reshape(nt, ngroups)[:, group]
    assert np.allclose(got[0], codes, rtol=1e-6, atol=1e-6)

    rows = 3
    qs = rng.standard_normal((rows, d)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    kf = rng.integers(0, 16, (nt, d)).astype(np.float32)
    vf = rng.standard_normal((nt, d)).astype(np.float32)
    want_sc = bias[:, None] + qs.astype(np.float64) @ kf.T.astype(np.float64)
    want_acc = want_sc @ vf.astype(np.float64)
    for wide in (False, True):
        sc, acc = np.full((rows, nt), np.nan, np.float32), np.zeros((rows, d), np.float32)
        scores_values(wide, qs, bias, kf, nt, sc, d, vf, acc)
        assert np.allclose(sc, want_sc, rtol=1e-5, atol=1e-4 * np.abs(want_sc).max())
        assert np.allclose(acc, want_acc, rtol=1e-4, atol=1e-4 * np.abs(want_acc).max())


@needs_numba
def test_fp16_statistics_decode_exactly():
    """The kernel decodes fp16 bits itself (numba has no CPU float16): every finite fp16 value, subnormals included."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    bits = bits[((bits >> 10) & 0x1F) != 0x1F].to(torch.int16)  # all finite fp16 values
    as_fp16 = bits.view(torch.float16)
    src = bits.numpy().view(np.uint16)
    n = src.shape[0]
    buf, out = np.empty(n, np.uint32), np.empty(n, np.float32)
    cpu._halves(src, np.uint64(0), np.uint64(n), buf, buf.view(np.float32), out)
    assert torch.equal(torch.from_numpy(out), as_fp16.float())


# --------------------------------------------------------------------------------------------------------------------
# Wired into KIVI
# --------------------------------------------------------------------------------------------------------------------


def geometry(head_dim=16, kv_heads=2):
    return ModelGeometry(num_layers=1, num_heads=kv_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         layer_types=("full_attention",), sliding_window=None, max_positions=None, model_id="test",
                         dtype=torch.float32)


def kivi_parts_case(bits, G, blocks, appends, group, q, many_rows, seed, backend, device="cpu"):
    """Append ``appends`` tokens to a KIVI store on ``device``, attend over its parts (+ the step's new tokens, causal)
    with the fused kernels switched to ``backend``, and compare with attention over the dequantized store (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    b, kv, d = 2, 2, 16
    store = make_storage("kivi", geometry(d, kv), bits=bits, group_size=G, residual=G * blocks)
    for n in appends:
        store.append(fp16_randn(gen, b, kv, n, d).to(device), fp16_randn(gen, b, kv, n, d).to(device))
    new_k, new_v = fp16_randn(gen, b, kv, q, d), fp16_randn(gen, b, kv, q, d)
    query = torch.randn(b, kv * group, q, d, generator=gen)
    before_chunk, before_rows = attention.CHUNK, kernels.MAX_FUSED_ROWS
    attention.CHUNK = G  # chunks of one key group: the chunked merges run many times
    kernels.MAX_FUSED_ROWS = 0 if many_rows else 1 << 30
    try:
        with kernels.fused(True, backend=backend):
            parts = store.parts()
            assert sum(p.length for p in parts) == len(store)
            # fused once values are quantized; on the CPU kernel not where a byte of 2-bit values would span two
            # value groups (groups of 2)
            fused = bool(store.vq.length) and (backend == "triton" or cpu.value_layout_ok(bits, d, store.value_group))
            assert [p.kind for p in parts] == ["kivi-fused" if fused else "kivi"]
            assert store.attention_path() == (f"fused-{backend}" if fused else "dense" if not store.vq.length
                                              else "chunked")
            dense = KVPart.dense(new_k.to(device), new_v.to(device), causal=True)
            got = attend_parts(query.to(device), [*parts, dense], d**-0.5).output.cpu()
    finally:
        attention.CHUNK, kernels.MAX_FUSED_ROWS = before_chunk, before_rows
    past_k, past_v = (x.cpu() for x in store.read(torch.float64))
    keys, values = torch.cat([past_k, new_k.double()], 2), torch.cat([past_v, new_v.double()], 2)
    n = keys.shape[2]
    s = torch.einsum("bhqd,bhkd->bhqk", query.double(), keys.repeat_interleave(group, 1)) * d**-0.5
    s = s.masked_fill(torch.arange(n) > torch.arange(n - q, n)[:, None], float("-inf"))  # the new tokens: causal
    want = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, -1), values.repeat_interleave(group, 1)).transpose(1, 2)
    assert (got.double() - want).abs().max().item() <= TOL * (1 + values.abs().max().item())


parts_strategies = dict(
    bits=st.sampled_from([2, 4, 8]),
    G=st.sampled_from([2, 4, 8]),
    blocks=st.integers(1, 3),
    appends=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    group=st.sampled_from([1, 3]),
    q=st.integers(1, 3),
    many_rows=st.booleans(),
    seed=st.integers(0, 10_000),
)


@needs_numba
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**parts_strategies)
def test_kivi_parts_attend_like_the_dense_read(bits, G, blocks, appends, group, q, many_rows, seed):
    """Whatever has been appended (empty, short or long residuals; values still in the residual while their keys are
    quantized), the store's parts give the attention of the dequantized store -- also past ``MAX_FUSED_ROWS``, where
    the fused part computes its partials from dequantized chunks (``chunked_partials``)."""
    kivi_parts_case(bits, G, blocks, appends, group, q, many_rows, seed, "numba")


@needs_triton
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**parts_strategies)
def test_kivi_parts_attend_like_the_dense_read_triton(bits, G, blocks, appends, group, q, many_rows, seed):
    """The same through the Triton kernel (``kernels.fused(True, backend="triton")``; interpreted on a CPU-only
    machine): KIVI's parts dispatch to it and it attends like the dequantized store."""
    triton_kernel()
    kivi_parts_case(bits, G, blocks, appends, group, q, many_rows, seed, "triton", TRITON_DEVICE)


@needs_numba
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4, 8]), G=st.sampled_from([2, 4, 8]), blocks=st.integers(1, 3),
       appends=st.lists(st.integers(1, 40), min_size=1, max_size=4), b=st.integers(1, 2), group=st.sampled_from([1, 3]),
       model_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 10_000),
       threaded=st.booleans())
def test_kivi_one_call_decode_step_is_the_fused_part(bits, G, blocks, appends, b, group, model_dtype, seed, threaded):
    """KIVI's decode fast path (:meth:`KiviStore.decode_step`: one :func:`kernels.kivi_decode` call from the held
    buffers, their spare capacity included, the 2-byte residual (fp16, or bfloat16 for a bfloat16 model) decoded in
    the kernel) gives what :func:`attend_parts` over the store's fused part gives, bit for bit: the same kernel over
    the same codes and tails, the same scaling and normalization -- ``threaded``: on two threads with the threshold
    lowered so that the context splits, the same token ranges on both paths."""
    if threaded and kernels._cpu.numba.config.NUMBA_NUM_THREADS < 2:
        return
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        if threaded:
            patch.setattr(kernels, "MIN_PARALLEL_WORK", 2)
            torch.set_num_threads(2)
        try:
            kivi_one_call_case(bits, G, blocks, appends, b, group, model_dtype, seed)
        finally:
            torch.set_num_threads(threads)


def kivi_one_call_case(bits, G, blocks, appends, b, group, model_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kv, d = 2, 16
    geo = ModelGeometry(num_layers=1, num_heads=kv, num_kv_heads=kv, head_dim=d, layer_types=("full_attention",),
                        sliding_window=None, max_positions=None, model_id="test", dtype=model_dtype)
    store = make_storage("kivi", geo, bits=bits, group_size=G, residual=G * blocks)
    for n in appends:
        store.append(fp16_randn(gen, b, kv, n, d), fp16_randn(gen, b, kv, n, d))
    store.stage(fp16_randn(gen, b, kv, 1, d), fp16_randn(gen, b, kv, 1, d))
    query = torch.randn(b, kv * group, 1, d, generator=gen)
    if not store.fused():  # no value quantized yet, or 2-bit values in groups of 2 (a byte spans two groups)
        return
    want = attend_parts(query, store.parts(fused=True), d**-0.5).output
    assert torch.equal(store.decode_step(query, d**-0.5), want)


@needs_numba
@torch.no_grad()
def test_kivi_one_call_decode_step_counts_its_scratch(tiny_model):
    """The one-call step decodes the 2-byte residuals (and the new token) into fp32 scratch: each layer reports that
    as its transient -- more than nothing, at most K and V of ``residual + 1`` tokens in fp32."""
    cache = make_cache("kivi", tiny_model, bits=2, group_size=8, residual=16)
    tiny_model(torch.randint(1, 128, (1, 40)), **cache_kwargs(tiny_model, cache))
    for layer in cache.layers:
        layer.peak_transient_bytes = 0
    for t in range(5):
        tiny_model(torch.tensor([[1 + t]]), **cache_kwargs(tiny_model, cache))
    g = cache.geometry
    bound = 2 * g.num_kv_heads * 17 * g.head_dim * 4
    assert all(0 < layer.peak_transient_bytes <= bound for layer in cache.layers)


@needs_numba
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4]), window=st.sampled_from([4, 8]), key_axis=st.sampled_from(["channel", "token"]),
       appends=st.lists(st.integers(1, 50), min_size=1, max_size=4), b=st.integers(1, 2), group=st.sampled_from([1, 3]),
       seed=st.integers(0, 10_000))
def test_logquant_one_call_decode_step_is_the_fused_part(bits, window, key_axis, appends, b, group, seed):
    """LogQuant's decode fast path (one :func:`kernels.kivi_decode` call over ``[quantized run | full-precision
    block | new token]``) gives what the fused part through :func:`attend_parts` gives (the layer's path for a
    backend other than numba, here with the numba kernel under it), bit for bit, and leaves the same state."""
    import copy

    from kvcompress.methods.logquant import LogQuantConfig, LogQuantLayer

    gen = torch.Generator().manual_seed(seed)
    kv, d = 2, 16
    layer = LogQuantLayer(geometry(d, kv), 0, LogQuantConfig(bits=bits, window=window, group_size=8,
                                                             key_axis=key_axis))
    for n in appends:
        layer._append(fp16_randn(gen, b, kv, n, d), fp16_randn(gen, b, kv, n, d))
    if not layer.fused():
        return
    other = copy.deepcopy(layer)
    query = torch.randn(b, kv * group, 1, d, generator=gen)
    new_k, new_v = fp16_randn(gen, b, kv, 1, d), fp16_randn(gen, b, kv, 1, d)
    got, _ = layer._attend_one_fused(query, new_k, new_v, d**-0.5, 8 * window)
    with pytest.MonkeyPatch.context() as patch:  # not "numba": the layer's other branch, the numba kernel under it
        patch.setattr(kernels, "backend", lambda device: "numba, through the parts")
        want, _ = other._attend_one_fused(query, new_k, new_v, d**-0.5, 8 * window)
    assert torch.equal(got, want)
    assert torch.equal(layer.fp_k, other.fp_k) and torch.equal(layer.kq.read(torch.float32),
                                                                 other.kq.read(torch.float32))


@needs_numba
def test_kivi_falls_back_to_chunks_where_no_kernel_applies(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = fp16_randn(gen, 1, 2, 70, 16)

    def kinds(**options):
        store = make_storage("kivi", geometry(options.pop("d", 16)), **options)
        store.append(x[..., : store.head_dim], x[..., : store.head_dim])
        return [p.kind for p in store.parts()]

    assert kinds(bits=4, group_size=8, residual=16) == ["kivi-fused"]
    with kernels.fused(False):  # switched off
        assert kinds(bits=4, group_size=8, residual=16) == ["kivi"]
    assert kinds(bits=4, group_size=8, residual=16) == ["kivi-fused"]  # the switch was restored
    assert kinds(bits=4, group_size=8, residual=128) == ["kivi"]  # 70 tokens: all still in the residual
    # 2-bit values in groups of 6 channels (d=12, G=6): a byte of codes would straddle two value groups
    assert kinds(d=12, bits=2, group_size=6, residual=12) == ["kivi"]
    monkeypatch.setattr(kernels, "AVAILABLE", False)  # numba missing
    assert kinds(bits=4, group_size=8, residual=16) == ["kivi"]


def test_per_token_keys_take_the_kernel_only_where_their_groups_fit(monkeypatch):
    """Keys per token (LogQuant's ``key_axis="token"``) are held to the values' rules on the CPU: channel groups that
    divide head_dim and never split a byte of codes; the Triton kernel takes any group that divides head_dim."""
    cpu_dev = torch.device("cpu")
    if kernels.AVAILABLE:
        assert kernels.kivi_fused_applies(cpu_dev, 2, 2, 64, 64, key_token_group=64)
        assert kernels.kivi_fused_applies(cpu_dev, 4, 2, 64, 32, key_token_group=16)
    assert not kernels.kivi_fused_applies(cpu_dev, 2, 2, 12, 12, key_token_group=6)  # a 2-bit byte spans two groups
    assert not kernels.kivi_fused_applies(cpu_dev, 2, 2, 64, 64, key_token_group=24)  # does not divide head_dim
    monkeypatch.setattr(kernels, "triton_status", lambda: (True, "test"))
    with kernels.fused(True, backend="triton"):
        assert kernels.kivi_fused_applies(cpu_dev, 2, 2, 12, 12, key_token_group=6)
        assert not kernels.kivi_fused_applies(cpu_dev, 2, 2, 64, 64, key_token_group=24)


@needs_numba
@pytest.mark.parametrize("method,options", [
    ("kivi", {"bits": 2, "group_size": 8, "residual": 16}),
    ("logquant", {"bits": 2, "window": 8, "group_size": 8}),  # per-channel keys in blocks of W: KIVI's layout
    ("logquant", {"bits": 2, "window": 8, "group_size": 8, "key_axis": "token"}),  # keys per token, like the values
    # merged pairs: the directions' codes with the magnitudes as multipliers, retained entries apart
    ("minicache", {"start_layer": 1, "gamma": 0.2, "storage": "kivi", "bits": 2, "group_size": 8, "residual": 16}),
])
@torch.no_grad()
def test_generation_is_the_same_with_the_fused_path_on_and_off(tiny_model, monkeypatch, method, options):
    """Greedy generation (batch 2, and a left-padded batch whose rows run alone) gives the same tokens, and
    teacher-forced logits agree to fp32 rounding; the fused kernel really ran (the parts' kernel, or the one-call
    decode step)."""
    calls = []
    for owner, name in ((kernels, "_kivi_numba"), (cpu, "kivi_decode_step")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 60), generator=gen)
    padded_mask = torch.ones_like(ids)
    padded_mask[1, :23] = 0

    def run(on, mask):
        with kernels.fused(on):
            cache = make_cache(method, tiny_model, **options)
            out = tiny_model.generate(ids, attention_mask=mask, **cache_kwargs(tiny_model, cache), max_new_tokens=16,
                                      do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1]:]

    for mask in (torch.ones_like(ids), padded_mask):
        calls.clear()
        fused = run(True, mask)
        assert calls, "the fused kernel was never called"
        calls.clear()
        assert run(False, mask).tolist() == fused.tolist() and not calls

    def forced(on):
        with kernels.fused(on):
            cache = make_cache(method, tiny_model, **options)
            logits = [tiny_model(ids[:, :40], **cache_kwargs(tiny_model, cache)).logits[:, -1]]
            for t in range(40, ids.shape[1]):
                logits.append(tiny_model(ids[:, t : t + 1], **cache_kwargs(tiny_model, cache)).logits[:, -1])
            return torch.stack(logits, 1)

    torch.testing.assert_close(forced(True), forced(False), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Which kernel runs where
# --------------------------------------------------------------------------------------------------------------------


def test_backend_follows_the_device(monkeypatch):
    """numba for CPU tensors, triton for CUDA tensors, None (the chunked path) where the JIT is missing, the switch is
    off or the device has no kernel; ``fused(True, backend=...)`` forces one."""
    cuda, cpu_dev = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(kernels, "triton_status", lambda: (True, "test"))
    assert kernels.backend(cpu_dev) == ("numba" if kernels.AVAILABLE else None)
    assert kernels.backend(cuda) == "triton"
    assert kernels.backend(torch.device("meta")) is None
    # 2-bit values in groups of 6 channels: the CPU kernel cannot take them (a byte spans two groups), Triton can
    assert kernels.kivi_fused_applies(cuda, 2, 2, 12, 6)
    assert not kernels.kivi_fused_applies(cpu_dev, 2, 2, 12, 6)
    assert not kernels.kivi_fused_applies(cuda, 2, 2, 12, 5)  # a value group must divide head_dim
    with kernels.fused(False):
        assert kernels.backend(cuda) is None and kernels.backend(cpu_dev) is None
    with kernels.fused(True, backend="triton"):
        assert kernels.backend(cpu_dev) == "triton"
    assert kernels.backend(cpu_dev) == ("numba" if kernels.AVAILABLE else None)  # restored
    monkeypatch.setattr(kernels, "triton_status", lambda: (False, "triton missing"))
    assert kernels.backend(cuda) is None and not kernels.kivi_fused_applies(cuda, 4, 4, 64, 32)
    with pytest.raises(ValueError):
        with kernels.fused(True, backend="cuda"):
            pass


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the tiny model runs on the CPU: the interpreter's test")
@torch.no_grad()
def test_generation_through_the_triton_kernel(tiny_model, monkeypatch):
    """Tiny llama, KIVI-2 (G = 8, R = 16), the Triton kernel forced on CPU tensors (interpreted): teacher-forced logits
    agree with the chunked path (kernels off) to fp32 rounding and greedy tokens are the same; the kernel really ran."""
    gpu = triton_kernel()
    calls = []
    real = gpu.kivi_attention
    monkeypatch.setattr(gpu, "kivi_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    options = {"bits": 2, "group_size": 8, "residual": 16}

    def forced(on):
        with kernels.fused(on, backend="triton" if on else None):
            cache = make_cache("kivi", tiny_model, **options)
            logits = [tiny_model(ids[:, :30], **cache_kwargs(tiny_model, cache)).logits[:, -1]]
            for t in range(30, ids.shape[1]):
                logits.append(tiny_model(ids[:, t : t + 1], **cache_kwargs(tiny_model, cache)).logits[:, -1])
            return torch.stack(logits, 1)

    got = forced(True)
    assert calls, "the Triton kernel was never called"
    calls.clear()
    want = forced(False)
    assert not calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_numba
@torch.no_grad()
def test_memory_report_says_which_path_each_layer_takes(tiny_model, capsys):
    """``memory_report()`` names each layer's attention path: fused-numba once KIVI holds codes, chunked with the
    kernels off, dense while only the fp16 residual is held and for the full cache; also for a padded batch (rows run
    alone) and for KIVI storage under eviction (snapkv); ``kvcompress list`` prints which kernels this machine has."""
    from kvcompress.cli import main

    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))

    def report(method, mask=None, **options):
        cache = make_cache(method, tiny_model, **options)
        tiny_model(ids, attention_mask=mask, **cache_kwargs(tiny_model, cache))
        return cache.memory_report()

    kivi = {"bits": 2, "group_size": 8, "residual": 16}
    got = report("kivi", **kivi)
    assert [r.attention for r in got.layers] == ["fused-numba"] * 4
    assert got.attention == {"fused-numba": 4} and got.to_dict()["attention"] == {"fused-numba": 4}
    assert str(got).endswith("; attention: fused-numba x4")
    with kernels.fused(False):
        assert report("kivi", **kivi).attention == {"chunked": 4}
    assert report("kivi", bits=2, group_size=8, residual=64).attention == {"dense": 4}  # 40 tokens: all in the residual
    assert report("full").attention == {"dense": 4}
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    assert report("kivi", mask, **kivi).attention == {"fused-numba": 4}  # one single-row layer per row, both fused
    assert report("snapkv", budget=0.9, storage="kivi", **kivi).attention == {"fused-numba": 4}
    assert report("snapkv", budget=0.9).attention == {"dense": 4}
    assert main(["list"]) == 0
    assert f"CPU tensors -> numba {cpu.numba.__version__}" in capsys.readouterr().out


@needs_numba
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 3), rows=st.integers(1, 4), n=st.integers(1, 40), share=st.floats(0, 1),
       seen=st.sampled_from(["all", "some", "none"]), seed=st.integers(0, 10_000))
def test_scattered_entries_attend_like_their_rows(b, h, rows, n, share, seen, seed):
    """MiniCache's retained entries (one list, each entry tagged position * b*h + row): the numba partials equal the
    dequantize-then-attend reference of each row's entries laid out densely, the torch layout path too, and the
    mask that hides them from the merged part is True exactly elsewhere (and where ``valid`` allows)."""
    gen = torch.Generator().manual_seed(seed)
    d = 16
    flat = torch.randperm(n * b * h, generator=gen)[: int(share * n * b * h)].sort().values.to(torch.int32)
    r = flat.numel()
    qg = torch.randn(b, h, rows, d, generator=gen)
    keys, values = torch.randn(r, d, generator=gen), torch.randn(r, d, generator=gen)
    vis = {"all": None, "some": torch.rand(r, generator=gen) < 0.5, "none": torch.zeros(r, dtype=torch.bool)}[seen]
    # the reference: every row's entries as a dense (b, h, n, d) past, the others masked
    dense_k, dense_v = torch.zeros(b * h, n, d), torch.zeros(b * h, n, d)
    ok = torch.zeros(b * h, n, dtype=torch.bool)
    row, pos = flat.long() % (b * h), flat.long() // (b * h)
    dense_k[row, pos], dense_v[row, pos] = keys, values
    ok[row, pos] = True if vis is None else vis
    shape = (b, h, n, d)
    for backend in ("numba", "torch"):
        with kernels.fused(backend == "numba"):
            acc, m, l = kernels.scattered_partials(qg, flat, keys, values, vis)
        check_partials(acc, m, l, qg, dense_k.view(shape), dense_v.view(shape), ok.view(b, h, n))
    valid = torch.rand(b, 1, n, generator=gen) < 0.7
    for v in (None, valid):
        want = torch.ones(b * h, n, dtype=torch.bool)
        want[row, pos] = False
        want = want.view(b, h, n) if v is None else want.view(b, h, n) & v
        for on in (True, False):
            with kernels.fused(on):
                got = kernels.scattered_mask(flat, b, h, n, v)
            assert got.is_contiguous() and torch.equal(got, want)


@needs_numba
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 3), rows=st.integers(1, 4), n=st.integers(1, 150),
       chunk=st.sampled_from([1, 7, 32, 64, 2048]), padding=st.sampled_from(["none", "shared", "per-head", "all"]),
       mult=st.booleans(), seed=st.integers(0, 10_000))
def test_float_chunks_through_the_kernel_equal_the_reference(b, h, rows, n, chunk, padding, mult, seed):
    """Tokens held as floats (MiniCache's fp16 directions), attended a chunk at a time by the kernel's float path with
    per-token multipliers and padding: the dequantize-then-attend reference, as the torch chunks give it."""
    gen = torch.Generator().manual_seed(seed)
    d = 64
    qg = torch.randn(b, h, rows, d, generator=gen) * 0.3
    keys, values = fp16_randn(gen, b, h, n, d), fp16_randn(gen, b, h, n, d)
    valid = {"none": None, "shared": torch.rand(b, 1, n, generator=gen) < 0.7,
             "per-head": torch.rand(b, h, n, generator=gen) < 0.7, "all": torch.zeros(b, 1, n, dtype=torch.bool)}[padding]
    mu = (0.05 + 3.95 * torch.rand(b, h, 2, n, generator=gen)).half().float() if mult else None
    read = lambda a, z, dt: (keys[:, :, a:z].to(dt), values[:, :, a:z].to(dt))  # noqa: E731
    ref_k = keys if mu is None else keys * mu[:, :, 0, :, None]
    ref_v = values if mu is None else values * mu[:, :, 1, :, None]
    ok = None if valid is None else valid.expand(b, h, n)
    for on in (True, False):
        with kernels.fused(on):
            acc, m, l = kernels.float_partials(qg, read, n, chunk, valid, mu)
        check_partials(acc, m, l, qg, ref_k, ref_v, ok)


@needs_numba
def test_the_kernels_leave_torchs_thread_count_alone():
    """numba's OpenMP thread pool, when it starts, sets the process's OpenMP thread count, which torch reads as its
    own: a fresh process that set one thread and then ran decode steps with a kernel must still have one (it had two
    before the pool was started at import and torch's count put back)."""
    import subprocess
    import sys

    if kernels._cpu.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: nothing to change")
    script = """
import torch
torch.set_num_threads(1)
from conftest import make_tiny_llama
from kvcompress import kernels, make_cache
from kvcompress.compat import cache_kwargs
calls, real = [], kernels._cpu.kivi_decode_step
kernels._cpu.kivi_decode_step = lambda *a: calls.append(1) or real(*a)
model = make_tiny_llama()
cache = make_cache("kivi", model, bits=2, group_size=8, residual=8)
ids = torch.randint(1, 128, (1, 40))
with torch.inference_mode():
    model(ids, **cache_kwargs(model, cache))
    for t in range(3):
        model(ids[:, t : t + 1], **cache_kwargs(model, cache))
assert calls, "the one-call kernel was not taken"
print(torch.get_num_threads())
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=__import__("pathlib").Path(__file__).parent, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"

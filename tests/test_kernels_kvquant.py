"""The fused KVQuant kernel (``kernels.kvquant_attention``): equal to dequantize-then-attend over the stored layout
(codebook levels, per-channel or per-token ranges, CSR outliers, pre-RoPE keys rotated inside the kernel), wired into
``KVQuantLayer``, and the same generations with the kernels on and off.

Tolerance: as the KIVI kernel's (``tests/test_kernels.py``): fp32 kernel vs an fp64 reference over the same
dequantized tokens, the normalized output within ``2e-5 * (1 + max |v|)``, the log-sum-exp within ``2e-5 * (1 + max
|s|)``. The reference rotates keys with the exact angle ``position * inv_freq`` (float64), as the kernel does.
Through the model (whose rotary module rounds the angle to float32), teacher-forced logits within 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import kernels, make_cache
from kvcompress.compat import cache_kwargs
from kvcompress.methods.kvquant import KVQuantLayer
from kvcompress.methods.kvquant_store import QuantStream
from kvcompress.registry import KVCompressError

from test_kernels import check_partials, padding_mask

needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason=kernels.UNAVAILABLE_REASON)


def rotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp64 rotate-half RoPE of ``keys (b, h, n, d)`` at ``positions (1|b, n)``."""
    ang = positions.double()[:, None, :, None] * inv_freq.double()[None, None, None, :]  # (b|1, 1, n, d/2)
    c, s = torch.cos(ang) * scaling, torch.sin(ang) * scaling
    half = keys.shape[-1] // 2
    k1, k2 = keys[..., :half].double(), keys[..., half:].double()
    return torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1)


def stream(gen, bits, heads, d, per_channel, outliers, token_range, levels):
    book = torch.linspace(-1, 1, 1 << bits) if levels == "uniform" else \
        torch.sort(torch.rand(1 << bits, generator=gen) * 2 - 1).values
    return QuantStream(bits, outliers, book, book, heads, d, per_channel, token_range=token_range)


def kvquant_case(bits, d, appends, b, kv, group, q, per_channel, outliers, token_range, rope, padding, seed,
                 levels="random", max_start=5000, max_step=4, positions_per_row=True):
    """One random KVQuant layer for the kernels: ``(qg, n, keys codes, values codes, rope spec, valid, reference keys,
    reference values)``. Tokens appended in steps ``appends`` to real ``QuantStream``s; keys rotated (``rope``:
    "none", "start" from a position below ``max_start``, "explicit": increasing with gaps below ``max_step``, "runs":
    stored but consecutive except one jump; one row of positions per batch row or one for all) and the reference keys rotated the same way in fp64; ``padding`` as
    :func:`test_kernels.padding_mask`."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(appends)
    ks = stream(gen, bits[0], kv, d, per_channel, outliers, token_range, levels)
    vs = stream(gen, bits[1], kv, d, False, outliers, token_range, levels)
    keys = torch.randn(b, kv, n, d, generator=gen) * 2
    values = torch.randn(b, kv, n, d, generator=gen)
    if per_channel:
        ks.fix_range(keys[:, :, : max(2, n // 2)])
    at = 0
    for k in appends:
        ks.append(keys[:, :, at : at + k])
        vs.append(values[:, :, at : at + k])
        at += k
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    spec, ref_k = None, ks.read()
    if rope == "start":
        start = int(torch.randint(0, max_start, (1,), generator=gen))
        spec = kernels.RotaryPositions(inv_freq, 1.0, start=start)
        ref_k = rotate(ref_k, torch.arange(start, start + n)[None], inv_freq, 1.0)
    elif rope in ("explicit", "runs"):  # increasing with gaps (left padding, a window that moved)
        rows = b if positions_per_row else 1
        steps = torch.randint(1, max_step, (rows, n), generator=gen)
        if rope == "runs":  # stored, consecutive but for one jump per row: whole blocks take the kernel's block path
            steps = torch.ones(rows, n, dtype=torch.long)
            at = torch.randint(0, n, (rows,), generator=gen)
            steps[torch.arange(rows), at] = torch.randint(2, 200, (rows,), generator=gen)
        pos = torch.cumsum(steps, dim=1).to(torch.int32) + int(torch.randint(0, max_start, (1,), generator=gen))
        spec = kernels.RotaryPositions(inv_freq, 0.9, start=None, positions=pos)
        ref_k = rotate(ref_k, pos, inv_freq, 0.9)
    valid = padding_mask(gen, b, kv, n, padding)
    qg = torch.randn(b, kv, group * q, d, generator=gen) * d**-0.5
    return qg, n, ks.codes(), vs.codes(), spec, valid, ref_k, vs.read()


@needs_numba
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.tuples(st.sampled_from([2, 3, 4]), st.sampled_from([2, 3, 4])),
    d=st.sampled_from([8, 16, 64, 128]),
    appends=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    b=st.integers(1, 2),
    kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    q=st.integers(1, 3),
    per_channel=st.booleans(),
    outliers=st.sampled_from([0.0, 0.02, 0.1]),
    token_range=st.sampled_from(["token", "head"]),
    levels=st.sampled_from(["uniform", "random"]),
    rope=st.sampled_from(["none", "start", "explicit", "runs"]),
    padding=st.sampled_from(["none", "shared", "per-head", "all"]),
    parallel=st.booleans(),
    tail=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_kvquant_kernel_equals_dequantize_then_attend(bits, d, appends, b, kv, group, q, per_channel, outliers,
                                                       token_range, levels, rope, padding, parallel, tail, seed):
    """Key/value bits 2/3/4 (3: two planes), head dims 8-128, tokens appended in several steps (lengths not a multiple
    of the kernel's block), batch, GQA ratios, one or several queries, per-channel or per-token keys, value ranges per
    token or per head, no / 2 % / 10 % outliers, uniform or random levels, keys not rotated / rotated from a start
    position / rotated at explicit positions (jumps included; or consecutive but for one jump), padding (shared, per head, a whole row), serial and
    threaded, with 0-3 dense tail tokens every row sees (``tail=``)."""
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case(bits, d, appends, b, kv, group, q, per_channel, outliers,
                                                           token_range, rope, padding, seed, levels=levels)
    gen = torch.Generator().manual_seed(seed + 1)
    tk, tv = torch.randn(b, kv, tail, d, generator=gen), torch.randn(b, kv, tail, d, generator=gen)
    before = kernels.MIN_PARALLEL_WORK
    kernels.MIN_PARALLEL_WORK = 0 if parallel else 1 << 62
    try:
        acc, m, l = kernels.kvquant_attention(qg, n, kc, vc, spec, valid, tail=(tk, tv) if tail else None)
    finally:
        kernels.MIN_PARALLEL_WORK = before
    assert acc.shape == (b, kv, group * q, d) and m.shape == l.shape == (b, kv, group * q)
    if tail:
        ref_k, ref_v = torch.cat([ref_k, tk.double()], dim=2), torch.cat([ref_v, tv], dim=2)
        if valid is not None:
            valid = torch.cat([valid, torch.ones(b, valid.shape[1], tail, dtype=torch.bool)], dim=2)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)


@needs_numba
@pytest.mark.parametrize("vbits", [2, 3, 4])
@pytest.mark.parametrize("d,kv,group,q", [(64, 3, 3, 1), (128, 1, 5, 1), (64, 2, 2, 2)])
@pytest.mark.parametrize("b,padding", [(1, "none"), (1, "per-head"), (2, "shared"), (2, "all"), (2, "head block")])
def test_fused_values_with_outliers_equal_dequantize_then_attend(vbits, d, kv, group, q, b, padding):
    """Values of every width, ``d`` a multiple of 64 and 10 % outliers: where the target has AVX-512 they take the
    fused value path (``kvquant_cpu._level_values``: levels added from registers, no scratch block) with the outliers
    added as corrections (``_value_outliers``, one batch row's carried offsets or two rows' CSR pointers). Query rows
    3, 5 (four, then one) and 4 per KV head; 200 tokens (a whole block of 128 and a partial one); padding per head,
    shared, a whole padded batch row, and the last KV head blind to the first block while the others see it (its
    weights there are not computed, so its outliers must be skipped: a head with no visible token in a block)."""
    mask = "none" if padding == "head block" else padding
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case((3, vbits), d, [150, 50], b, kv, group, q, True, 0.1,
                                                           "token", "start", mask, 7 * vbits + d)
    if padding == "head block":
        valid = torch.ones(b, kv, n, dtype=torch.bool)
        valid[:, -1, :128] = False
    acc, m, l = kernels.kvquant_attention(qg, n, kc, vc, spec, valid)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)


@needs_numba
@pytest.mark.parametrize("kbits", [2, 3, 4])
@pytest.mark.parametrize("rope", ["start", "runs", "explicit"])
@pytest.mark.parametrize("d,kv,group,b", [(64, 3, 3, 1), (128, 2, 2, 2), (256, 1, 4, 1)])
@pytest.mark.parametrize("outliers", [0.1, 0.0])
def test_keys_turned_as_dequantized_equal_dequantize_then_attend(kbits, rope, d, kv, group, b, outliers):
    """Per-channel pre-RoPE keys of every width with 10 % outliers or none (the flag a literal of its own copy of the
    loop, session 40), ``d`` a multiple of 64: where the target has
    AVX-512, a block of consecutive positions takes ``kvquant_cpu._turned_keys`` (looked up, outliers taken from their
    marked scratch, turned and stored in one pass; ``d`` 64 and 128 with the row length a literal, 256 -- Gemma's MQA
    shape -- with it a value); a block with a jump ("runs": one per row, "explicit": gaps everywhere) takes the
    dequantize-then-turn path. 300 tokens: three blocks, so an outlier left in the scratch would be read again by the
    next block."""
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case((kbits, 3), d, [200, 100], b, kv, group, 1, True, outliers,
                                                           "token", rope, "none", 11 * kbits + d)
    acc, m, l = kernels.kvquant_attention(qg, n, kc, vc, spec, valid)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)


@needs_numba
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("lanes", [8, 16])
def test_levels_by_permute_are_the_select_trees(bits, portable, lanes, monkeypatch):
    """The codebook lookup by ``vpermps`` into a register (:mod:`kvcompress.kernels.lookup`'s ``levels2/3/4``, eight
    codes where numba's target has AVX2; ``levels16``, sixteen codes of a width given as a value, on a 512-bit register
    whose table holds the levels repeated, where it has AVX-512; on a target without them their portable lowering,
    forced here with ``portable``) gives every level the select tree gives, bit for bit: 2/3/4-bit planes read as words,
    two words per token, every 8- or 16-code group of a word, codes of every value, levels with both signs."""
    import numpy as np
    from numba import njit

    from kvcompress.kernels import kvquant_cpu, lookup
    from kvcompress.kernels.simd import load8_1d, load16_1d, store8, store16

    flag = "PERMUTE" if lanes == 8 else "WIDE"
    if not portable and not getattr(lookup, flag):
        pytest.skip(f"numba's target has no {'AVX2' if lanes == 8 else 'AVX-512'}")
    monkeypatch.setattr(lookup, flag, not portable)  # read when the wrappers below are compiled

    @njit(cache=False)
    def select_trees(bits, p0, p1, w0, w1, lev, n, out):
        kvquant_cpu._levels_block(bits, p0, p1, w0, w1, lev, 0, n, out)

    @njit(cache=False)
    def eight_at_a_time(bits, w0, w1, lev, n, out):
        lo, hi = load8_1d(lev, 0), load8_1d(lev, 8)
        per = 16 if bits == 4 else 32
        for t in range(n):
            for c8 in range(out.shape[1] // 8):
                k, g = (8 * c8) // per, ((8 * c8) % per) // 8
                if bits == 2:
                    x = lookup.levels2(lo, hi, w0, w1, t, k, g)
                elif bits == 3:
                    x = lookup.levels3(lo, hi, w0, w1, t, k, g)
                else:
                    x = lookup.levels4(lo, hi, w0, w1, t, k, g)
                store8(x, out, t, 8 * c8)

    @njit(cache=False)
    def sixteen_at_a_time(bits, w0, w1, tab, n, out):
        table = load16_1d(tab, 0)
        for t in range(n):
            for c in range(0, out.shape[1], 16):
                store16(lookup.levels16(bits, table, w0, w1, t, c), out, t, c)

    rng = np.random.default_rng(bits)
    n, d = 37, 128
    p0 = rng.integers(0, 256, (n, d * (2 if bits != 4 else 4) // 8), dtype=np.uint8)
    p1 = rng.integers(0, 256, (n, d // 8), dtype=np.uint8)
    lev = np.zeros(16, np.float32)
    lev[: 1 << bits] = np.sort(rng.standard_normal(1 << bits)).astype(np.float32)
    want, got = np.full((n, d), np.nan, np.float32), np.full((n, d), np.nan, np.float32)
    select_trees(bits, p0, p1, p0.view(np.uint64), p1.view(np.uint64), lev, n, want)
    if lanes == 8:
        eight_at_a_time(bits, p0.view(np.uint64), p1.view(np.uint64), lev, n, got)
    else:
        sixteen_at_a_time(bits, p0.view(np.uint64), p1.view(np.uint64), lev[np.arange(16) % (1 << bits)], n, got)
    assert np.array_equal(got, want)
    assert len(np.unique(got)) == 1 << bits  # every code occurred


@needs_numba
def test_the_eight_code_kernel_on_an_avx2_target():
    """Where numba's target has AVX2 but not AVX-512 the kernel looks levels up eight at a time (this host may take the
    sixteen-code path): a fresh process compiling for such a target (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``)
    equals dequantize-then-attend on 2/3/4-bit codes with outliers and pre-RoPE per-channel keys."""
    import os
    import subprocess
    import sys
    import tempfile

    from kvcompress.kernels import lookup

    if not lookup.PERMUTE:
        pytest.skip("numba's target has no AVX2: no AVX2 code can run here")
    script = """
import torch
from kvcompress import kernels
from kvcompress.kernels import lookup
assert lookup.PERMUTE and not lookup.WIDE, (lookup.PERMUTE, lookup.WIDE)
from test_kernels import check_partials
from test_kernels_kvquant import kvquant_case
for seed, bits in enumerate([(3, 3), (2, 4), (4, 2)]):
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case(bits, 64, [150, 45], 1, 3, 3, 1, True, 0.02, "token",
                                                           "start", "none", seed)
    acc, m, l = kernels.kvquant_attention(qg, n, kc, vc, spec, valid)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)
print("ok")
"""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,"
               "+sse4.1,+sse4.2,+ssse3,+lzcnt,+movbe,-avx512f", NUMBA_CACHE_DIR=tempfile.mkdtemp())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(__file__), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "ok"


@needs_numba
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("rope", ["start", "explicit", "runs"])
def test_rotation_over_a_long_context_does_not_drift(parallel, rope, monkeypatch):
    """Pre-RoPE keys far into a sequence (positions up to ~500k) over ~2k tokens: the kernel advances its angles token
    by token between exact cos/sin every ``EXACT_EVERY`` tokens (and after a jump in stored positions); the result
    stays within the tolerance of the exact fp64 rotation (per-channel keys with a wide range, so an angle error shows
    in the scores; an error of 1e-5 in the angle step fails it)."""
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case((4, 4), 64, [1200, 917], 1, 2, 2, 1, True, 0.0, "token",
                                                           rope, "none", 11, levels="uniform", max_start=500_000,
                                                           max_step=3)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0 if parallel else 1 << 62)
    acc, m, l = kernels.kvquant_attention(qg * 4, n, kc, vc, spec, valid)
    check_partials(acc, m, l, qg * 4, ref_k, ref_v, valid)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_kernel_reads_outlier_counts_and_columns_of_every_width(dtype):
    """The store keeps outlier counts and columns as uint8, int16 or int32 by the layer's width; the kernel reads them
    in place as bytes: the same codes with the integers widened give the same partials."""
    from dataclasses import replace

    qg, n, kc, vc, spec, valid, _, _ = kvquant_case((3, 3), 16, [37, 20], 2, 2, 2, 1, True, 0.1, "token", "start",
                                                    "none", 7)
    assert kc.counts.dtype == torch.uint8 and kc.cols.dtype == torch.uint8
    want = kernels.kvquant_attention(qg, n, kc, vc, spec, valid)
    widen = lambda c: replace(c, counts=c.counts.to(dtype), cols=c.cols.to(dtype))  # noqa: E731
    got = kernels.kvquant_attention(qg, n, widen(kc), widen(vc), spec, valid)
    for a, w in zip(got, want):
        assert torch.equal(a, w)


@needs_numba
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("h, d, width", [(3, 16, 1), (8, 64, 2), (3, 24, 1), (3, 16, 4)])
@pytest.mark.parametrize("rows", [1, 2])
def test_a_blocks_outliers_land_where_their_columns_say(special, h, d, width, rows):
    """The per-block outlier loop: every entry of the batch row read lands at its token, KV head and channel with its
    fp16 value exactly -- tokens with 0 to 7 entries and a few with 20 (the fill writes sixteen slots whatever the count;
    more than one scatter of sixteen), columns of one, two or four bytes, one batch row (offsets carried) or two
    (CSR rows token-major, the second read); a block holding an fp16 inf or NaN decodes them as such (the branch-free
    decode would not). Where the target has AVX-512, one- and two-byte columns with ``d`` a power of two take the
    masked scatter of sixteen entries (:func:`kvcompress.kernels.simd.scatter16_cols1`); ``d = 24`` and four-byte
    columns the scalar loops."""
    import numpy as np

    from kvcompress.kernels import kvquant_cpu as kc

    gen = np.random.default_rng(3)
    nt, ta, bi = 20, 5, rows - 1
    per = gen.integers(0, 8, (ta + nt, rows))  # entries per (token, batch row), stored token-major
    per[ta + 3, bi] = per[ta + 11, 0] = 20
    nnz = int(per.sum())
    cols = np.concatenate([gen.choice(h * d, c, replace=False) for c in per.reshape(-1)])
    assert width != 2 or cols.max() >= 256  # the second byte is read
    raw = cols.astype({1: np.uint8, 2: np.uint16, 4: np.uint32}[width]).view(np.uint8).reshape(-1, width)
    vals = gen.standard_normal(nnz).astype(np.float16)
    if special:
        vals[-1], vals[-2] = np.float16(np.inf), np.float16(np.nan)
    counts = np.ascontiguousarray(per.T.astype(np.uint8)).reshape(rows, 1, -1, 1)
    rp = kc._row_pointers(counts, ta + nt)
    colmap = kernels._column_map(d, h)
    cflat = (colmap[0] * (kc.BLOCK * d) + colmap[1]).astype(np.uint64)
    out = np.zeros((h, kc.BLOCK, d), np.float32)
    tok = np.empty(kc.BLOCK * h * d + 16, np.uint8)
    obits = np.empty(kc.BLOCK * h * d, np.uint32)
    e0 = int(per[:ta].sum())
    e1 = kc._outliers_block(counts, rp, e0 if rows == 1 else 0, raw, vals.view(np.uint16), colmap, cflat, bi, ta, nt,
                            out, out.reshape(-1), tok, obits, obits.view(np.float32),
                            np.empty(kc.BLOCK * h * d, np.float32))
    assert e1 == (nnz if rows == 1 else 0)
    want = np.zeros_like(out)
    at = e0
    for i in range(nt):
        for r in range(rows):
            if r == bi:
                for k in range(at, at + per[ta + i, r]):
                    want[cols[k] // d, i, cols[k] % d] = np.float32(vals[k])
            at += per[ta + i, r]
    np.testing.assert_array_equal(out, want)  # NaN where NaN, inf where inf


@needs_numba
def test_outliers_change_the_kernels_result():
    """The kernel reads the outliers: dropping them (counts zeroed) moves the output (a guard against a test that
    cannot fail)."""
    gen = torch.Generator().manual_seed(1)
    b, kv, n, d = 1, 2, 64, 16
    ks = stream(gen, 3, kv, d, True, 0.1, "token", "uniform")
    vs = stream(gen, 3, kv, d, False, 0.1, "token", "uniform")
    keys, values = torch.randn(b, kv, n, d, generator=gen) * 3, torch.randn(b, kv, n, d, generator=gen) * 3
    ks.fix_range(keys)
    ks.append(keys)
    vs.append(values)
    qg = torch.randn(b, kv, 3, d, generator=gen)
    acc, _, l = kernels.kvquant_attention(qg, n, ks.codes(), vs.codes())
    from dataclasses import replace

    codes_k, codes_v = replace(ks.codes(), counts=None), replace(vs.codes(), counts=None)  # codes() is shared: a copy
    acc0, _, l0 = kernels.kvquant_attention(qg, n, codes_k, codes_v)
    assert (acc / l[..., None] - acc0 / l0[..., None]).abs().max() > 1e-2


def test_codes_are_made_once_and_never_keep_a_replaced_buffer_alive():
    """``QuantStream.codes()`` hands out the same object while the buffers stay (the kernel's numpy views are made
    once), a new one once a buffer grew; the replaced buffer is then freed (nothing but the stream held it)."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(3)
    s = stream(gen, 3, 2, 64, False, 0.02, "token", "random")
    s.append(torch.randn(1, 2, 20, 64, generator=gen))
    first = s.codes()
    kernels.kvquant_attention(torch.randn(1, 2, 3, 64, generator=gen), 20, first, first)  # makes the numpy views
    assert s.codes() is first
    old = weakref.ref(s._planes[0].buffer)
    s.append(torch.randn(1, 2, 1, 64, generator=gen))  # the exact-sized first buffer grows
    del first
    gc.collect()
    assert old() is None
    again = s.codes()
    assert again.planes[0] is s._planes[0].buffer
    s.append(torch.randn(1, 2, 1, 64, generator=gen))  # room left: the same buffers, the same object
    assert s.codes() is again


# --------------------------------------------------------------------------------------------------------------------
# Through the model
# --------------------------------------------------------------------------------------------------------------------

OPTIONS = {"nuq": False, "bits": 3, "sink": 2}


@needs_numba
@pytest.mark.parametrize("which,options", [
    ("tiny_model", OPTIONS),
    ("tiny_model", {**OPTIONS, "per_channel_keys": False, "pre_rope": False, "token_range": "head", "bits": 2}),
    ("tiny_model", {**OPTIONS, "key_bits": 4, "recent": 5}),
    ("tiny_gemma", {**OPTIONS, "bits": 4}),  # MQA, sliding-window layers (decode masks the window: still fused)
])
@torch.no_grad()
def test_kvquant_layers_attend_the_same_with_the_kernel_and_without(request, monkeypatch, which, options):
    """Every attention call of a real KVQuant cache (prefill + 30 decode steps; batch 2, then a left-padded batch
    whose rows run alone) is computed twice on the same stored state: with the fused part and with its chunked
    dequantize read; outputs agree within 2e-5 (plus the fp32 rounding of the angle for pre-RoPE keys, see the module
    docstring). Comparing two separate runs instead would not work: a 1e-7 difference in one step's keys can flip a
    2-bit code in a later layer. The kernel really ran, and ``memory_report()`` says so."""
    model = request.getfixturevalue(which)
    diffs = attend_both_ways(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 70), generator=gen)
    padded = torch.ones_like(ids)
    padded[1, :13] = 0
    for mask in (torch.ones_like(ids), padded):
        diffs.clear()
        cache = make_cache("kvquant", model, **options)
        model(ids[:, :40], attention_mask=mask[:, :40], **cache_kwargs(model, cache))
        for t in range(40, ids.shape[1]):
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(model, cache))
        assert len(diffs) >= 30, "the fused kernel was not used at every decode step"
        assert max(diffs) < 2e-5, max(diffs)
        assert "fused-numba" in cache.memory_report().attention


def attend_both_ways(monkeypatch) -> list[float]:
    """Make every attention call that has a fused part run twice on the same stored state: as given (the kernel) and
    with every part read chunk by chunk instead; returns the list the max |output difference| of each such call is
    appended to (the kernel's result is the one used)."""
    from dataclasses import replace

    import kvcompress.attention as attention

    real = attention.attend_parts
    diffs: list[float] = []

    def both(query, parts, scaling, probs_last=0, window=None):
        got = real(query, parts, scaling, probs_last, window)
        if any(p.fused is not None for p in parts):
            want = real(query, [replace(p, fused=None) for p in parts], scaling, probs_last, window)
            diffs.append((got.output - want.output).abs().max().item())
        return got

    monkeypatch.setattr(attention, "attend_parts", both)
    one_fused = KVQuantLayer._attend_one_fused

    def one_both(layer, query, keys, values, scaling):  # the one-call decode step against the chunked general path
        past = [replace(p, fused=None) for p in layer._past_parts()]
        want = real(query, [*past, attention.KVPart.dense(keys, values, None, causal=True)], scaling)
        got = one_fused(layer, query, keys, values, scaling)
        if got is not None:
            diffs.append((got[0] - want.output).abs().max().item())
        return got

    monkeypatch.setattr(KVQuantLayer, "_attend_one_fused", one_both)
    return diffs


@needs_numba
@torch.no_grad()
def test_kvquant_reports_its_path_and_falls_back(tiny_model, monkeypatch):
    """``memory_report()`` says ``fused-numba`` once the body holds codes, ``chunked`` with the kernels off or where
    the model's rotary module is not the plain ``cos/sin(position * inv_freq)`` the kernel computes."""
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(2))

    def paths(**extra):
        cache = make_cache("kvquant", tiny_model, **OPTIONS, **extra)
        tiny_model(ids, **cache_kwargs(tiny_model, cache))
        return cache.memory_report().attention, cache

    assert paths()[0] == {"fused-numba": 4}
    with kernels.fused(False):
        assert paths()[0] == {"chunked": 4}
    _, cache = paths()
    rope = cache.method.rope
    monkeypatch.setattr(rope, "_frequencies", {})
    monkeypatch.setattr(rope, "_find_frequencies", lambda layer_type: None)
    assert cache.memory_report().attention == {"chunked": 4}


# --------------------------------------------------------------------------------------------------------------------
# Quantizing a decode step (numba) = the torch path, bit for bit
# --------------------------------------------------------------------------------------------------------------------


@needs_numba
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.sampled_from([2, 3, 4]),
    d=st.sampled_from([8, 16, 64]),
    kv=st.integers(1, 3),
    b=st.integers(1, 2),
    steps=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    per_channel=st.booleans(),
    outliers=st.sampled_from([0.0, 0.01, 0.1]),
    kind=st.sampled_from(["normal", "ties", "halfway", "constant", "tiny", "huge", "zeros"]),
    unrotate=st.sampled_from([None, 1, "b"]),
    seed=st.integers(0, 10_000),
)
def test_decode_step_quantization_is_the_torch_paths(bits, d, kv, b, steps, per_channel, outliers, kind, unrotate,
                                                     seed):
    """Appended tokens (a decode step or a prompt) are quantized by one numba call (``quantize_rows``); every held
    tensor equals what the torch path holds for the same tokens: codes, fp16 ranges, outlier counts/columns/values.
    Data with ties (repeated values: the order statistics and the nearest level's tie rule), ranges halfway between
    two fp16 numbers (ties to even), constant rows (zero scale), fp16 subnormal ranges, ranges beyond fp16 (the
    same error), and rows mostly of zeros of both signs (the numba path's order statistics leave a zero threshold to
    the scalar insertion). Post-RoPE keys un-rotated on the way in (``unrotate``: cos/sin for one or every batch row,
    with an attention scaling) give the same bits as :func:`kvcompress.rope.unapply_rope` then the torch path."""
    import kvcompress.methods.kvquant_store as store

    gen = torch.Generator().manual_seed(seed)
    book = torch.sort(torch.rand(1 << bits, generator=gen) * 2 - 1).values
    prompt = torch.randn(b, kv, 20, d, generator=gen)

    def tokens(q):
        x = torch.randn(b, kv, q, d, generator=gen) * 3
        if kind == "ties":
            x = (x * 2).round() / 2
        elif kind == "halfway":  # multiples of 2**-12: mid-ranges often fall halfway between two fp16 numbers
            x = (x * 4096).round() / 4096
        elif kind == "constant":
            x = torch.full_like(x, 0.75)
        elif kind == "tiny":
            x = x * 1e-6
        elif kind == "huge":
            x = x * 1e5
        elif kind == "zeros":
            zero = torch.where(torch.rand(x.shape, generator=gen) < 0.5, 0.0, -0.0)
            x = torch.where(torch.rand(x.shape, generator=gen) < 0.9, zero, x)
        return x

    data = [tokens(q) for q in steps]
    angles = []
    for q in steps:  # RoPE angles of consecutive positions from 1000 (rotate-half: the two halves repeat them)
        pos = torch.arange(1000, 1000 + q, dtype=torch.float32).repeat(b if unrotate == "b" else 1, 1)
        pos = pos + torch.randint(0, 50, (pos.shape[0], 1), generator=gen)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = torch.cat([pos[..., None] * inv, pos[..., None] * inv], dim=-1)
        angles.append((ang.cos() * 1.1, ang.sin() * 1.1) if unrotate else None)

    def run(fast):
        before = store.FAST_ROWS
        store.FAST_ROWS = 1 << 30 if fast else 0
        try:
            s = QuantStream(bits, outliers, book, book, kv, d, per_channel)
            if per_channel:
                s.fix_range(prompt)
            for x, rot in zip(data, angles):
                s.append(x, rot)
        except Exception as exc:  # noqa: BLE001 - the same error both ways
            return type(exc), str(exc)
        finally:
            store.FAST_ROWS = before
        return [t.clone() for g in s._buffers() for t in [g.view()] if t is not None]

    fast, slow = run(True), run(False)
    if isinstance(slow, tuple):
        assert fast == slow
        return
    assert len(fast) == len(slow)
    for a, c in zip(fast, slow):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert torch.equal(a, c)


@needs_numba
@pytest.mark.parametrize("outliers", [0.0, 0.01])
@pytest.mark.parametrize("where", [0, 37])
def test_a_nan_in_a_token_is_the_torch_paths_error(outliers, where):
    """A NaN in a token of a per-token range (values) makes the torch path's min/max NaN, so it raises; the numba call
    raises the same error wherever the NaN sits in the row (it used to raise only for a NaN in the row's first
    channel, and quantized the rest as if the NaN were not there), and nothing is held."""
    import kvcompress.methods.kvquant_store as store

    book = torch.sort(torch.rand(8, generator=torch.Generator().manual_seed(0)) * 2 - 1).values
    x = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(1))
    x[0, where // 32, 2, where % 32] = float("nan")  # token 2, channel `where` of its row of 64 (2 heads x 32)
    errors = []
    for fast in (True, False):
        before = store.FAST_ROWS
        store.FAST_ROWS = 1 << 30 if fast else 0
        try:
            s = QuantStream(3, outliers, book, book, 2, 32, per_channel=False)
            with pytest.raises(KVCompressError) as err:
                s.append(x)
            errors.append(str(err.value))
            assert len(s) == 0
        finally:
            store.FAST_ROWS = before
    assert errors[0] == errors[1]


def test_a_tail_merged_in_torch_equals_attending_over_both():
    """``tail=`` on a backend that does not fold it in itself (Triton) is merged in torch (``_with_dense``): the same
    partials as attending over the stored tokens and the tail together, also for a row that saw no stored token."""
    gen = torch.Generator().manual_seed(3)
    b, h, rows, n, nt, d = 2, 2, 3, 40, 3, 16
    qg = torch.randn(b, h, rows, d, generator=gen)
    k, v = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)
    tk, tv = torch.randn(b, h, nt, d, generator=gen), torch.randn(b, h, nt, d, generator=gen)
    valid = torch.ones(b, 1, n, dtype=torch.bool)
    valid[1] = False  # batch row 1 sees none of the stored tokens
    read = lambda ks, vs: lambda a, z, dt: (ks[:, :, a:z].to(dt), vs[:, :, a:z].to(dt))  # noqa: E731
    body = kernels.chunked_partials(qg, read(k, v), n, 16, valid)
    got = kernels._with_dense(qg, body, tk, tv)
    both = torch.cat([valid.expand(b, h, n), torch.ones(b, h, nt, dtype=torch.bool)], dim=2)
    want = kernels.chunked_partials(qg, read(torch.cat([k, tk], 2), torch.cat([v, tv], 2)), n + nt, 16, both)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    assert kernels._with_dense(qg, body, tk[:, :, :0], tv[:, :, :0]) is body


# --------------------------------------------------------------------------------------------------------------------
# The decode step in one call (session 14)
# --------------------------------------------------------------------------------------------------------------------


@needs_numba
def test_fp16_bits_are_numpys_cast():
    """``_half_bits`` (the kernels' float32 -> fp16 rounding, written straight into held fp16 buffers) gives numpy's
    bits for every class of input: normals, subnormals, ties between two fp16 numbers, the edge to inf, signed
    zeros, inf and NaN."""
    import numpy as np

    from kvcompress.kernels import kvquant_cpu

    gen = np.random.default_rng(0)
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 6.1035156e-05, 6.1e-05, 5.96e-08, 2.98e-08, 2.99e-08,
             1e-10, np.inf, -np.inf, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2049.0, 2051.0]
    x = np.concatenate([
        np.array(edges, np.float32),
        (gen.standard_normal(20000) * 10.0 ** gen.uniform(-9, 5, 20000)).astype(np.float32),
        (np.arange(-3000, 3000) * 2.0**-25).astype(np.float32),  # subnormal ties
        gen.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every bit pattern class
    ])
    got = np.array([kvquant_cpu._half_bits(v) for v in x], np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(got[nan].view(np.float16)))


@needs_numba
@pytest.mark.parametrize("options", [OPTIONS, {**OPTIONS, "recent": 3, "key_bits": 4},
                                     {**OPTIONS, "per_channel_keys": False, "pre_rope": False, "bits": 2},
                                     {**OPTIONS, "sink": 0, "outliers": 0.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_kvquant_decode_in_one_call_is_the_tail_path_bit_for_bit(tiny_model, monkeypatch, options, dtype):
    """A decode step by one numba call (``kernels.kvquant_decode``: query folded and scaled, the held sink and recent
    window decoded from their bits, the kernel, ``acc / l``) gives the output of the path it replaces (the kernel with
    a float32 tail, the division in torch) bit for bit, at every step of a generation (fp32 and bf16 model, batch 2);
    and the outlier/range writes straight into the held buffers leave the same bytes as the torch quantization."""
    _one_call_against_tail_path(tiny_model, monkeypatch, options, dtype)


@needs_numba
@pytest.mark.parametrize("options", [OPTIONS, {**OPTIONS, "per_channel_keys": False, "pre_rope": False, "bits": 2}])
@torch.no_grad()
def test_threaded_decode_in_one_call_is_the_threaded_tail_path_bit_for_bit(tiny_model, monkeypatch, options):
    """On two threads over a context long enough to split (the threshold lowered to this tiny model), the one-call
    step runs the threaded kernel over the same token ranges as the general path's threaded kernel: the same output
    and held bytes, bit for bit."""
    import kvcompress.kernels as K

    if K._cpu.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    spans = []
    for name in ("kvquant_decode_step", "kvquant_decode_append"):
        real = getattr(K._kvq_cpu, name)
        position = 6 if name == "kvquant_decode_append" else -2  # (n, span) come just before out
        monkeypatch.setattr(K._kvq_cpu, name, lambda *a, _real=real, _at=position:
                            spans.append(a[_at] < a[_at - 1]) or _real(*a))
    monkeypatch.setattr(K, "MIN_PARALLEL_WORK", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _one_call_against_tail_path(tiny_model, monkeypatch, options, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert any(spans)  # the one call did run split into ranges


def _one_call_against_tail_path(tiny_model, monkeypatch, options, dtype):
    import kvcompress.kernels as K
    import kvcompress.methods.kvquant_store as store

    model = copy.deepcopy(tiny_model).to(dtype)  # the session's fixture keeps its fp32 weights

    def held(cache):  # what each layer holds, spare capacity aside (uninitialized memory)
        out = []
        for layer in cache.layers:
            out += [g.view() for s in (layer.k, layer.v) for g in s._buffers()]
            out += [layer.head_k, layer.head_v, layer.rec_k, layer.rec_v]
        return [t.clone() for t in out if t is not None]

    calls, appended = [], []
    real = K.kvquant_decode
    spy = lambda *a, **k: calls.append(1) or appended.append(k.get("append") is not None) or real(*a, **k)  # noqa: E731
    one_fused = KVQuantLayer._attend_one_fused
    ids = torch.randint(1, 128, (2, 60), generator=torch.Generator().manual_seed(7))
    runs = {}
    for way in ("one", "tail"):
        calls.clear()
        monkeypatch.setattr(K, "kvquant_decode", spy if way == "one" else lambda *a, **k: None)
        cache = make_cache("kvquant", model, **options)
        outs = []
        monkeypatch.setattr(KVQuantLayer, "_attend_one_fused",
                            lambda layer, *a: outs.append(r := one_fused(layer, *a)) or r)
        model(ids[:, :30], **cache_kwargs(model, cache))
        for t in range(30, ids.shape[1]):
            model(ids[:, t : t + 1], **cache_kwargs(model, cache))
        runs[way] = (outs, held(cache), len(calls), cache.nbytes())
        if way == "one":  # past the sink with no recent window, the step's tokens are quantized in the same call
            assert any(appended) == (not options.get("recent"))
    (o1, h1, n1, b1), (o2, h2, _, b2) = runs["one"], runs["tail"]
    assert n1 >= 30 * len(cache.layers) and len(o1) == len(o2) >= 30 * len(cache.layers)
    for a, c in zip(o1, o2):
        assert (a is None) == (c is None)
        if a is not None:
            assert a[0].dtype == c[0].dtype and torch.equal(a[0], c[0]) and a[1] == c[1]
    assert b1 == b2 and len(h1) == len(h2)
    assert all(a.dtype == c.dtype and torch.equal(a, c) for a, c in zip(h1, h2))


@needs_numba
@torch.no_grad()
def test_a_decode_step_beyond_fp16_raises_and_holds_nothing(tiny_model):
    """The one-call decode step (attention and both quantizations in one numba call) meets a value range beyond fp16:
    the torch path's error, and neither stream, the positions nor the held bytes change (the attention's output is
    not handed out)."""
    from kvcompress.kernels import kvquant_cpu
    from kvcompress.registry import KVCompressError

    cache = make_cache("kvquant", tiny_model, **{**OPTIONS, "pre_rope": False})  # (no model forward to hook into)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    tiny_model(ids[:, :39], **cache_kwargs(tiny_model, cache))
    tiny_model(ids[:, 39:], **cache_kwargs(tiny_model, cache))  # a decode step: the layers' one-call state is ready
    layer = cache.layers[0]
    g = layer.geometry
    calls = []
    real = kvquant_cpu.kvquant_decode_append
    kvquant_cpu.kvquant_decode_append = lambda *a: calls.append(1) or real(*a)
    try:
        before = (len(layer.k), len(layer.v), layer.pos.n, layer.tokens_seen, cache.nbytes())
        gen = torch.Generator().manual_seed(4)
        query = torch.randn(1, g.num_heads, 1, g.head_dim, generator=gen)
        keys = torch.randn(1, g.num_kv_heads, 1, g.head_dim, generator=gen)
        values = torch.full_like(keys, 1e6)
        with pytest.raises(KVCompressError, match="not finite in fp16"):
            layer.attend_step(query, keys, values, None, 0.125)
        assert calls  # the one-call path was the one that met it
        assert (len(layer.k), len(layer.v), layer.pos.n, layer.tokens_seen, cache.nbytes()) == before
    finally:
        kvquant_cpu.kvquant_decode_append = real


@needs_numba
@torch.no_grad()
def test_the_decode_plan_is_made_once_per_buffer_not_per_step(tiny_model, monkeypatch):
    """The one-call decode step hands numba one :class:`DecodePlan` of the arguments that do not change from step to
    step (the dispatch of ~46 arrays per call is the cost it saves): over 24 decode steps a layer makes a new plan only
    when a buffer was replaced (its kernel arguments change). Its outputs: the bit-for-bit tests above take this path."""
    import kvcompress.kernels as K

    made, calls = [], []
    real_plan, real_call = K._kvq_cpu.decode_plan, K._kvq_cpu.kvquant_decode_append
    monkeypatch.setattr(K._kvq_cpu, "decode_plan", lambda *a: made.append(1) or real_plan(*a))
    monkeypatch.setattr(K._kvq_cpu, "kvquant_decode_append", lambda *a: calls.append(1) or real_call(*a))
    cache = make_cache("kvquant", tiny_model, **OPTIONS)
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    tiny_model(ids[:, :40], **cache_kwargs(tiny_model, cache))
    for t in range(40, 64):
        tiny_model(ids[:, t : t + 1], **cache_kwargs(tiny_model, cache))
    assert len(calls) == 24 * len(cache.layers)  # every step of every layer took the one-call path
    assert len(cache.layers) <= len(made) < len(calls) // 3  # a plan per layer, remade only when a buffer grew

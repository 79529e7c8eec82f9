"""The vector-register intrinsics of :mod:`kvcompress.kernels.simd`, each against numpy on random data."""

from __future__ import annotations

import numpy as np
import pytest

from kvcompress import kernels

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason=kernels.UNAVAILABLE_REASON)


def _compiled():
    from numba import njit

    from kvcompress.kernels.simd import (add8, codes8, fma8, hmax8, hsum8x8, load8, load8_1d, max8, mul8, splat8,
                                         store8, sub8, where8)

    @njit
    def arithmetic(a, b, c, out):  # a, b, c, out (8, 8) float32
        x, y, z = load8(a, 0, 0), load8(b, 1, 0), load8(c, 2, 0)
        store8(fma8(x, y, z), out, 0, 0)
        store8(mul8(x, y), out, 1, 0)
        store8(add8(x, y), out, 2, 0)
        store8(max8(x, y), out, 3, 0)
        store8(where8(load8_1d(c[3], 0), x, splat8(np.float32(7.5))), out, 4, 0)
        sums = hsum8x8(load8(a, 0, 0), load8(a, 1, 0), load8(a, 2, 0), load8(a, 3, 0), load8(a, 4, 0),
                       load8(a, 5, 0), load8(a, 6, 0), load8(a, 7, 0))
        store8(sums, out, 5, 0)
        out[6, 0] = hmax8(x)
        store8(sub8(x, y), out, 7, 0)

    @njit
    def unpack(codes, out):  # codes (2, 16) uint8 -> out (8, 8): the planes of bytes 3..10 of row 1
        for s in range(4):
            store8(codes8(codes, 1, 3, 2 * s, 3), out, s, 0)
        store8(codes8(codes, 1, 3, 0, 15), out, 4, 0)
        store8(codes8(codes, 1, 3, 4, 15), out, 5, 0)

    return arithmetic, unpack


def test_intrinsics_equal_numpy():
    arithmetic, unpack = _compiled()
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b, c = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
        c[3] = np.where(rng.random(8) < 0.5, 0.0, c[3])  # the mask row: zeros and non-zeros
        out = np.zeros((8, 8), np.float32)
        arithmetic(a, b, c, out)
        np.testing.assert_allclose(out[0], a[0] * b[1] + c[2], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[1], a[0] * b[1])
        np.testing.assert_array_equal(out[2], a[0] + b[1])
        np.testing.assert_array_equal(out[3], np.maximum(a[0], b[1]))
        np.testing.assert_array_equal(out[4], np.where(c[3] != 0, a[0], np.float32(7.5)))
        np.testing.assert_allclose(out[5], a.sum(axis=1), rtol=1e-5, atol=1e-5)
        assert out[6, 0] == a[0].max()
        np.testing.assert_array_equal(out[7], a[0] - b[1])

        codes = rng.integers(0, 256, (2, 16), dtype=np.uint8)
        planes = np.zeros((8, 8), np.float32)
        unpack(codes, planes)
        run = codes[1, 3:11].astype(np.int32)
        for s in range(4):
            np.testing.assert_array_equal(planes[s], (run >> (2 * s)) & 3)
        np.testing.assert_array_equal(planes[4], run & 15)
        np.testing.assert_array_equal(planes[5], run >> 4)


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("count", [0, 1, 5, 16])
@pytest.mark.parametrize("wide", [True, False])
def test_outlier_scatter_writes_its_count_and_nothing_else(width, count, wide, monkeypatch):
    """``scatter16_cols1``/``scatter16_cols2`` against numpy: entries ``e + j ..`` land at ``col + (col >> shift) *
    gap + token * d`` with their fp16 value (a subnormal, -0.0, inf and NaN among them), every other element keeps its
    sentinel -- also the places the entries after ``count`` would have gone (the mask covers loads and stores). Both
    lowerings: AVX-512's ``vscatterdps`` with 32-bit offsets (``wide``, where the target has it) and the generic masked
    scatter of 64-bit addresses (forced here where it does not run by itself)."""
    from numba import njit

    from kvcompress.kernels import lookup
    from kvcompress.kernels.simd import scatter16_cols1, scatter16_cols2

    if wide and not lookup.WIDE:
        pytest.skip("numba's target has no AVX-512")
    monkeypatch.setattr(lookup, "WIDE", wide)  # read when ``run`` below is compiled

    scatter = scatter16_cols1 if width == 1 else scatter16_cols2

    @njit
    def run(outflat, cols, vals, tok, e, j, count, shift, gap, d):
        scatter(outflat, cols, vals, tok, e, j, count, shift, gap, d)

    gen = np.random.default_rng(count + 10 * width)
    h, w, d, shift = (3, 8, 16, 4) if width == 1 else (20, 8, 16, 4)  # h*d = 320 needs two bytes
    e, j = 7, 3
    cols = gen.choice(h * d, 40, replace=False)
    raw = cols.astype(np.uint8 if width == 1 else np.uint16).view(np.uint8).reshape(-1, width)
    vals = (gen.standard_normal(40) * 4).astype(np.float16)
    vals[e + j : e + j + 4] = [np.float16(6e-8), np.float16(-0.0), np.float16(np.inf), np.float16(np.nan)]
    tok = gen.integers(0, w, 40).astype(np.uint8)
    out = np.full((h, w, d), 123.0, np.float32)
    run(out.reshape(-1), raw, vals.view(np.uint16), tok, e, j, count, shift, (w - 1) * d, d)
    want = np.full_like(out, 123.0)
    for lane in range(count):
        x = e + j + lane
        want[cols[x] // d, tok[j + lane], cols[x] % d] = np.float32(vals[x])
    np.testing.assert_array_equal(out, want)
    assert np.signbit(out).sum() == np.signbit(want).sum()  # -0.0 kept as such


def test_fill16_u8_writes_sixteen_bytes_and_no_more():
    """``fill16_u8(arr, off, v)``: ``arr[off : off + 16] = v``, the bytes around untouched."""
    from numba import njit

    from kvcompress.kernels.simd import fill16_u8

    @njit
    def run(arr, off, v):
        fill16_u8(arr, off, v)

    arr = np.arange(40, dtype=np.uint8)
    run(arr, 9, 200)
    want = np.arange(40, dtype=np.uint8)
    want[9:25] = 200
    np.testing.assert_array_equal(arr, want)


@pytest.mark.parametrize("off,g,h", [(0, 0, 0), (3, 1, 0), (5, 15, 2), (16, 7, 7)])
def test_pick16_takes_two_entries_into_the_two_halves(off, g, h):
    """``pick16(arr, off, g, h)``: ``arr[off + g]`` in lanes 0-7 and ``arr[off + h]`` in lanes 8-15."""
    from numba import njit

    from kvcompress.kernels import lookup
    from kvcompress.kernels.simd import pick16, store16

    if not lookup.WIDE:
        pytest.skip("pick16 is AVX-512 only (the kernels take it only there)")

    @njit
    def run(arr, off, g, h, out):
        store16(pick16(arr, off, g, h), out, 0, 0)

    arr = np.random.default_rng(off).standard_normal(40).astype(np.float32)
    out = np.zeros((1, 16), np.float32)
    run(arr, off, g, h, out)
    np.testing.assert_array_equal(out[0], np.r_[np.full(8, arr[off + g]), np.full(8, arr[off + h])])

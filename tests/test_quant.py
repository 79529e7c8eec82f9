"""Tests for kvcompress.quant (packing, uniform, codebook, outliers)."""

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    import kvcompress.quant  # noqa: F401
except ImportError:  # package not installed / top-level __init__ not written yet
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from kvcompress import kernels
from kvcompress.quant import uniform
from kvcompress.quant._common import normalize_axis
from kvcompress.quant import (
    CodebookQuantized,
    SparseOutliers,
    UniformQuantized,
    dequantize_codebook,
    fit_codebook,
    outlier_thresholds,
    pack_bits,
    packed_nbytes,
    quantize_codebook,
    quantize_uniform,
    quantize_with_codebook,
    split_outliers,
    unpack_bits,
)

FAST = settings(max_examples=50, deadline=None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- packing


@FAST
@given(
    bits=st.integers(1, 8),
    n=st.integers(1, 67),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64]),
)
def test_pack_roundtrip(bits, n, lead, seed, dtype):
    codes = torch.randint(0, 2**bits, (*lead, n), generator=_gen(seed)).to(dtype)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, math.ceil(n * bits / 8))
    assert packed.shape[-1] == packed_nbytes(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out.long(), codes.long())


def test_pack_layout_is_dense_bitstream():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_bits(codes, 3).tolist() == list(stream.to_bytes(3, "little"))
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    assert torch.equal(pack_bits(torch.tensor([7, 200]), 8), torch.tensor([7, 200], dtype=torch.uint8))


def test_pack_bad_input():
    for b in (0, 9, -1):
        with pytest.raises(ValueError):
            pack_bits(torch.zeros(4, dtype=torch.uint8), b)
        with pytest.raises(ValueError):
            unpack_bits(torch.zeros(4, dtype=torch.uint8), b, 4)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0, 4]), 2)  # out of range
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(4), 2)  # float codes
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 4)  # wrong byte count
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.int32), 8, 3)


# --------------------------------------------------------------------------- uniform


@st.composite
def uniform_case(draw):
    bits = draw(st.integers(1, 8))
    shape = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
    axis = draw(st.sampled_from([-1, -2]))
    length = shape[axis]
    divisors = [d for d in range(1, length + 1) if length % d == 0]
    group = draw(st.one_of(st.none(), st.sampled_from(divisors)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    shift = draw(st.sampled_from([0.0, 5.0, -100.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    x = (torch.randn(shape, generator=_gen(seed)) * scale + shift).to(dtype)
    return x, bits, axis, group


@FAST
@given(uniform_case())
def test_uniform_roundtrip_error_bound(case):
    x, bits, axis, group = case
    q = quantize_uniform(x, bits, axis, group)
    assert isinstance(q, UniformQuantized)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    deq = q.dequantize()
    assert deq.shape == x.shape and deq.dtype == torch.float32
    assert torch.isfinite(deq).all()
    s, z = q.expanded_stats()
    assert s.shape == x.shape
    xf = x.float()
    eps = 1e-5 * (xf.abs() + 1.0)
    err = (xf - deq).abs()
    assert (err <= s / 2 + eps).all(), float((err - s / 2).max())
    # codes lie in range and the stored grid covers [min, max]
    codes = q.codes()
    assert int(codes.max()) <= 2**bits - 1
    # stats shape: axis replaced by n_groups
    n_groups = 1 if group is None else x.shape[axis] // group
    exp_stat = list(x.shape)
    exp_stat[axis] = n_groups
    assert tuple(q.scale.shape) == tuple(exp_stat)
    if group is None:  # directly broadcastable
        torch.broadcast_shapes(q.scale.shape, x.shape)
    # nbytes: packed along last dim + 2 bytes per scale and zero element
    lead = x.numel() // x.shape[-1]
    n_stats = x.numel() // x.shape[axis] * n_groups
    expected = lead * math.ceil(x.shape[-1] * bits / 8) + 2 * n_stats + 2 * n_stats
    assert q.nbytes() == expected
    assert sum(t.numel() * t.element_size() for t in q.tensors()) == expected
    assert q.dequantize(torch.float16).dtype == torch.float16


@st.composite
def four_dim_case(draw):
    """A (b, h, n, d) tensor of a kind that reaches every branch of the fp16 statistics: normal values, subnormal
    ranges, ranges near fp16's limit, constants, zeros of both signs."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n, d = draw(st.integers(1, 40)), draw(st.sampled_from([4, 5, 8, 12, 24, 64]))
    bits = draw(st.integers(1, 8))
    axis = draw(st.sampled_from([2, 3, -1, -2]))
    length = (b, h, n, d)[axis]
    group = draw(st.one_of(st.none(), st.sampled_from([g for g in range(1, length + 1) if length % g == 0])))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "tiny", "huge", "constant", "signed zeros"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    x = torch.randn((b, h, n, d), generator=_gen(seed))
    if kind == "normal":
        x = x * draw(st.sampled_from([1e-2, 1.0, 30.0])) + draw(st.sampled_from([0.0, 5.0, -100.0]))
    elif kind == "tiny":  # scales and zero points among fp16's subnormals
        x = x * 1e-6
    elif kind == "huge":  # zero points next to -65504, scales rounded up near the top of the range
        x = (x.clamp(-3, 3) * 1e4).clamp(-65000, 65000)
    elif kind == "constant":
        x = torch.full_like(x, draw(st.sampled_from([0.1, -3.0, 1e-7, 0.0, -0.0])))
    else:
        x[..., ::3] = 0.0
        x[..., 1::4] = -0.0
        x = x.abs() if draw(st.booleans()) else x
    return x.to(dtype), bits, axis, group


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba missing")
@FAST
@given(four_dim_case())
def test_uniform_numba_path_is_the_torch_paths(case):
    """The one-call numba quantization of (b, h, n, d) CPU tensors writes the torch path's codes and statistics bit
    for bit; only a zero point that is a zero may differ in its sign (the same value)."""
    x, bits, axis, group = case
    a = normalize_axis(axis, 4)
    g = x.shape[a] if group is None else group
    fast = uniform._quantize_with_numba(x, bits, a, g)
    assert fast is not None  # it served (no silent fall back to the torch path)
    packed, scale, zero = fast
    try:
        uniform.NUMBA_QUANTIZE = False
        ref = quantize_uniform(x, bits, axis, group)
    finally:
        uniform.NUMBA_QUANTIZE = True
    assert torch.equal(packed, ref.packed)
    assert torch.equal(scale.view(torch.int16), ref.scale.view(torch.int16))
    assert torch.equal(zero.float(), ref.zero.float())
    differ = zero.view(torch.int16) != ref.zero.view(torch.int16)
    assert (zero.float()[differ] == 0).all()
    q = quantize_uniform(x, bits, axis, group)  # and the public function takes that path
    assert torch.equal(q.packed, packed) and q.group_size == ref.group_size and q.axis == ref.axis


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e6, -65510.0])
@pytest.mark.parametrize("axis", [2, 3])
def test_uniform_numba_path_raises_the_torch_paths_error(bad, axis):
    x = torch.randn(1, 2, 32, 64, generator=_gen(3))
    x[0, 1, 17, 40] = bad
    assert uniform._quantize_with_numba(x, 4, axis, 32) is None  # not finite: the torch path raises
    with pytest.raises(ValueError, match="not finite in fp16"):
        quantize_uniform(x, 4, axis, 32)


def test_uniform_kivi_layouts():
    x = torch.randn(2, 3, 16, 8, generator=_gen(0))
    per_token = quantize_uniform(x, 2, axis=-1, group_size=4)
    assert per_token.scale.shape == (2, 3, 16, 2)
    assert per_token.packed.shape == (2, 3, 16, 2)  # 8 codes * 2 bits = 2 bytes
    per_channel = quantize_uniform(x, 2, axis=-2, group_size=8)
    assert per_channel.scale.shape == (2, 3, 2, 8)
    assert per_channel.packed.shape == (2, 3, 16, 2)
    assert per_channel.axis == 2
    # more bits -> smaller error
    e2 = (quantize_uniform(x, 2, -1).dequantize() - x).abs().mean()
    e4 = (quantize_uniform(x, 4, -1).dequantize() - x).abs().mean()
    e8 = (quantize_uniform(x, 8, -1).dequantize() - x).abs().mean()
    assert e8 < e4 < e2


def test_uniform_extreme_ranges_covered():
    # narrow range far from 0: fp16 rounding of zero/scale must not break the bound
    x = 1000.0 + torch.rand(4, 32, generator=_gen(1)) * 0.01
    for bits in (1, 3, 8):
        q = quantize_uniform(x, bits, axis=-1)
        s, _ = q.expanded_stats()
        assert ((x - q.dequantize()).abs() <= s / 2 + 1e-3).all()
    tiny = torch.rand(3, 8, generator=_gen(2)) * 1e-9
    q = quantize_uniform(tiny, 4, axis=-1)
    s, _ = q.expanded_stats()
    assert ((tiny - q.dequantize()).abs() <= s / 2 + 1e-12).all()


@pytest.mark.parametrize("axis,group", [(-1, None), (-1, 2), (-2, None), (-2, 3)])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_uniform_constant_input_exact(axis, group, bits):
    x = torch.full((2, 6, 4), 1.5)
    q = quantize_uniform(x, bits, axis, group)
    deq = q.dequantize()
    assert not torch.isnan(deq).any()
    assert torch.equal(deq, x)
    assert (q.scale == 0).all()
    zeros = torch.zeros(3, 5)
    assert torch.equal(quantize_uniform(zeros, 2, -1).dequantize(), zeros)


def test_uniform_bad_input():
    x = torch.randn(2, 6, 4)
    for b in (0, 9):
        with pytest.raises(ValueError):
            quantize_uniform(x, b, -1)
    with pytest.raises(ValueError):
        quantize_uniform(x, 4, -1, group_size=3)  # 3 does not divide 4
    with pytest.raises(ValueError):
        quantize_uniform(x, 4, -2, group_size=4)  # 4 does not divide 6
    with pytest.raises(ValueError):
        quantize_uniform(x, 4, -1, group_size=0)
    with pytest.raises(ValueError):
        quantize_uniform(x, 4, axis=3)
    with pytest.raises(ValueError):
        quantize_uniform(torch.ones(3, dtype=torch.int64), 4, -1)
    with pytest.raises(ValueError):
        quantize_uniform(torch.tensor([0.0, float("nan")]), 4, -1)
    with pytest.raises(ValueError):
        quantize_uniform(torch.tensor([0.0, 1e6]), 4, -1)  # beyond fp16 range


# --------------------------------------------------------------------------- codebook


def test_fit_codebook_bimodal():
    g = _gen(3)
    v = torch.cat([torch.randn(5000, generator=g) * 0.05 - 2.0, torch.randn(5000, generator=g) * 0.05 + 3.0])
    cb = fit_codebook(v, 1)
    assert cb.shape == (2,) and cb.dtype == torch.float32
    assert torch.allclose(cb, torch.tensor([-2.0, 3.0]), atol=0.05)
    cb3 = fit_codebook(v, 3)
    assert cb3.shape == (8,)
    assert (cb3[1:] >= cb3[:-1]).all()
    assert ((cb3 - -2.0).abs() < 0.3).sum() + ((cb3 - 3.0).abs() < 0.3).sum() == 8
    # deterministic
    assert torch.equal(cb3, fit_codebook(v, 3))


def test_fit_codebook_weights_shift_centroids():
    v = torch.linspace(0, 1, 1001)
    w = torch.ones_like(v)
    w[v > 0.9] = 1000.0
    plain = fit_codebook(v, 1)
    weighted = fit_codebook(v, 1, weights=w)
    assert torch.allclose(plain, torch.tensor([0.25, 0.75]), atol=0.01)
    assert weighted[1] > 0.9 and weighted[0] > plain[0]


def test_fit_codebook_subsample_and_few_values():
    v = torch.randn(50_000, generator=_gen(4))
    cb = fit_codebook(v, 4, max_samples=2000, seed=1)
    assert cb.shape == (16,) and (cb[1:] >= cb[:-1]).all()
    assert torch.equal(cb, fit_codebook(v, 4, max_samples=2000, seed=1))
    few = torch.tensor([0.0, 1.0, 1.0, 5.0])
    cb = fit_codebook(few, 3)
    assert cb.shape == (8,) and set(cb.tolist()) == {0.0, 1.0, 5.0}
    with pytest.raises(ValueError):
        fit_codebook(v, 0)
    with pytest.raises(ValueError):
        fit_codebook(v, 2, weights=torch.ones(3))


@FAST
@given(bits=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_quantize_codebook_nearest(bits, seed):
    g = _gen(seed)
    cb = torch.sort(torch.randn(2**bits, generator=g)).values
    x = torch.randn(7, 11, generator=g) * 1.5
    codes = quantize_codebook(x, cb)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    dist = (x.unsqueeze(-1) - cb).abs()
    brute = dist.argmin(-1)
    # ties may resolve to either neighbour: compare distances, not indices
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, dist.gather(-1, brute.unsqueeze(-1)).squeeze(-1), atol=1e-6)
    assert torch.equal(dequantize_codebook(codes, cb), cb[codes.long()])


@FAST
@given(bits=st.integers(1, 8), axis=st.sampled_from([-1, -2]), seed=st.integers(0, 2**31 - 1),
       shape=st.lists(st.integers(1, 9), min_size=2, max_size=3))
def test_quantize_with_codebook_roundtrip(bits, axis, seed, shape):
    g = _gen(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    cb = torch.linspace(-1, 1, 2**bits)
    q = quantize_with_codebook(x, cb, axis, bits)
    assert isinstance(q, CodebookQuantized)
    deq = q.dequantize()
    assert deq.shape == x.shape and torch.isfinite(deq).all()
    half = q.scale.float()
    # uniform codebook on [-1,1]: error <= half-step * half-range (+ fp16 stats rounding)
    step = 2.0 / max(2**bits - 1, 1)
    assert ((deq - x).abs() <= half * (step / 2) + 2e-3 * (x.abs() + 1)).all()
    lead = x.numel() // x.shape[-1]
    n_stats = x.numel() // x.shape[axis]
    assert q.nbytes() == lead * math.ceil(x.shape[-1] * bits / 8) + 2 * n_stats * 2
    assert all(t is not cb for t in q.tensors())


def test_codebook_constant_and_bad_input():
    x = torch.full((3, 4), -0.75)
    q = quantize_with_codebook(x, torch.tensor([-1.0, 0.0, 1.0]), -1, 2)
    assert torch.equal(q.dequantize(), x)
    with pytest.raises(ValueError):
        quantize_with_codebook(x, torch.linspace(-1, 1, 8), -1, bits=2)  # 8 > 2**2
    with pytest.raises(ValueError):
        quantize_codebook(x, torch.tensor([1.0, 0.0]))  # unsorted
    with pytest.raises(ValueError):
        quantize_with_codebook(x, torch.linspace(-1, 1, 4), -1, bits=9)


# --------------------------------------------------------------------------- outliers


@FAST
@given(seed=st.integers(0, 2**31 - 1), fraction=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
       axis=st.sampled_from([-1, -2]))
def test_outliers_roundtrip(seed, fraction, axis):
    x = (torch.randn(3, 40, 50, generator=_gen(seed)) * 4).half()
    lower, upper = outlier_thresholds(x, fraction, axis)
    dense, sparse = split_outliers(x, lower, upper)
    assert isinstance(sparse, SparseOutliers)
    assert sparse.values.dtype == torch.float16 and sparse.indices.dtype == torch.int32
    assert dense.shape == x.shape and dense.dtype == x.dtype
    assert (dense <= upper).all() and (dense >= lower).all()
    assert torch.equal(sparse.scatter_into(dense), x)
    n = x.shape[axis]
    m = math.floor(n * fraction / 2 + 0.5 + 1e-9)
    n_vectors = x.numel() // n
    assert sparse.nnz <= 2 * m * n_vectors
    assert sparse.nnz >= 2 * m * n_vectors * 0.8  # continuous data: few ties
    if fraction == 0:
        assert sparse.nnz == 0
    assert sparse.nbytes() == 6 * sparse.nnz


def test_outliers_scalar_thresholds_and_fraction():
    x = torch.randn(100_000, generator=_gen(5))
    dense, sparse = split_outliers(x, torch.tensor(-2.0), torch.tensor(2.0))
    assert abs(sparse.nnz / x.numel() - 0.0455) < 0.005
    assert torch.allclose(sparse.scatter_into(dense), x, atol=2e-3)  # fp16 storage
    assert dense.abs().max() <= 2.0
    lo, hi = outlier_thresholds(x.view(10, -1), 0.1, -1)
    assert lo.shape == (10, 1)
    frac = ((x.view(10, -1) > hi) | (x.view(10, -1) < lo)).float().mean()
    assert abs(float(frac) - 0.1) < 0.002
    with pytest.raises(ValueError):
        outlier_thresholds(x, 1.5, -1)
    with pytest.raises(ValueError):
        sparse.scatter_into(torch.zeros(3))

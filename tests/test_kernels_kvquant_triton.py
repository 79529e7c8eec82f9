"""The KVQuant Triton kernel (``kernels.kvquant_gpu``): equal to dequantize-then-attend over the stored layout, and
wired into ``KVQuantLayer`` (``kernels.fused(True, backend="triton")``). On a CPU-only machine it runs in Triton's
interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``; fp16/fp32 only); on a CUDA machine compiled, on CUDA
tensors.

Tolerance: as the other kernels' (``tests/test_kernels.py``): fp32 kernel vs an fp64 reference over the same
dequantized tokens (keys rotated at the exact angle ``position * inv_freq``, float64), the normalized output within
``2e-5 * (1 + max |v|)``, the log-sum-exp within ``2e-5 * (1 + max |s|)``. The interpreter is slow: the examples are
small (a few blocks of tokens, head_dim <= 64).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import kernels, make_cache
from kvcompress.compat import cache_kwargs

from test_kernels import TRITON_DEVICE, check_partials, needs_triton
from test_kernels_kvquant import attend_both_ways
from test_kernels_kvquant import kvquant_case as numba_case


def triton_kernel():
    """:mod:`kvcompress.kernels.kvquant_gpu`, checked to be interpreted when there is no GPU."""
    from kvcompress.kernels import kvquant_gpu
    from triton.runtime.interpreter import InterpretedFunction

    if TRITON_DEVICE == "cpu":
        assert isinstance(kvquant_gpu._kvquant_partials, InterpretedFunction), \
            "triton was imported before TRITON_INTERPRET=1"
    return kvquant_gpu


def to_device(codes, device):
    """A :class:`kvcompress.kernels.CodebookCodes` with every tensor on ``device``."""
    from dataclasses import replace

    move = (lambda t: None if t is None else t.to(device))
    return replace(codes, planes=[move(p) for p in codes.planes], levels=move(codes.levels), scale=move(codes.scale),
                   offset=move(codes.offset), counts=move(codes.counts), cols=move(codes.cols), vals=move(codes.vals))


def kvquant_case(*args):
    """The numba kernel's case (``tests/test_kernels_kvquant.py``) with random levels, start positions up to 50 000
    and explicit positions with gaps up to 40, one row for all or one per batch row (by the seed)."""
    seed = args[-1]
    return numba_case(*args, levels="random", max_start=50_000, max_step=40, positions_per_row=bool(seed % 2))


def run(qg, n, kc, vc, spec, valid, splits=None):
    gpu = triton_kernel()
    dev = TRITON_DEVICE
    if spec is not None and dev != "cpu":
        from dataclasses import replace

        spec = replace(spec, inv_freq=spec.inv_freq.to(dev),
                       positions=None if spec.positions is None else spec.positions.to(dev))
    acc, m, l = gpu.kvquant_attention(qg.to(dev), n, to_device(kc, dev), to_device(vc, dev), spec,
                                      None if valid is None else valid.to(dev), splits=splits)
    return acc.cpu(), m.cpu(), l.cpu()


@needs_triton
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.tuples(st.sampled_from([2, 3, 4]), st.sampled_from([2, 3, 4])),
    d=st.sampled_from([8, 16, 24, 64]),  # 8: half a power-of-two tile; 24: masked channels
    appends=st.lists(st.integers(1, 40), min_size=1, max_size=3),  # up to 120 tokens: BLOCK_N = 32 never divides
    b=st.integers(1, 2),
    kv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    q=st.integers(1, 3),
    per_channel=st.booleans(),
    outliers=st.sampled_from([0.0, 0.02, 0.1]),
    token_range=st.sampled_from(["token", "head"]),
    rope=st.sampled_from(["none", "start", "explicit"]),
    padding=st.sampled_from(["none", "shared", "per-head", "all"]),
    splits=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)
def test_triton_kvquant_equals_dequantize_then_attend(bits, d, appends, b, kv, group, q, per_channel, outliers,
                                                      token_range, rope, padding, splits, seed):
    """Key/value bits 2/3/4 each (3: two planes), head dims 8-64, lengths that are not a multiple of the block, batch
    1-2, GQA 1/3, one to three query tokens, per-channel or per-token keys (ranges per token or per head), no / 2 % /
    10 % outliers, keys not rotated / from a start position (up to 50k: the angle's reduction) / at explicit
    positions, padding (shared, per head, a whole row), the context split into ranges."""
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case(bits, d, appends, b, kv, group, q, per_channel, outliers,
                                                            token_range, rope, padding, seed)
    acc, m, l = run(qg, n, kc, vc, spec, valid, splits)
    assert acc.shape == (b, kv, group * q, d) and m.shape == l.shape == (b, kv, group * q)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)


@needs_triton
@pytest.mark.parametrize("bits,rope,per_channel", [((3, 3), "explicit", True), ((4, 2), "start", False),
                                                   ((2, 4), "none", True)])
def test_triton_kvquant_fixed_cases(bits, rope, per_channel):
    """A few larger fixed cases (head_dim 128, several blocks, 10 % outliers, batch 2, GQA 3, padding) that the small
    random ones may not reach; the outliers and the rotation really change the result (guards against a test that
    cannot fail)."""
    qg, n, kc, vc, spec, valid, ref_k, ref_v = kvquant_case(bits, 128, [70, 1, 29], 2, 1, 3, 1, per_channel, 0.1,
                                                            "token", rope, "shared", 11)
    acc, m, l = run(qg, n, kc, vc, spec, valid, splits=2)
    check_partials(acc, m, l, qg, ref_k, ref_v, valid)
    out = acc / l[..., None]
    if spec is not None:  # the same keys not rotated
        acc0, _, l0 = run(qg, n, kc, vc, None, valid)
        assert (out - acc0 / l0[..., None]).abs().max() > 1e-3
    kc.counts = vc.counts = None  # the same codes without their outliers
    acc0, _, l0 = run(qg, n, kc, vc, spec, valid)
    assert (out - acc0 / l0[..., None]).abs().max() > 1e-3


OPTIONS = {"nuq": False, "bits": 3, "sink": 2}


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the tiny model runs on the CPU: the interpreter's test")
@torch.no_grad()
def test_kvquant_layers_attend_the_same_through_the_triton_kernel(tiny_model, monkeypatch):
    """Every attention call of a real KVQuant cache (tiny llama, 3 bits, per-channel pre-RoPE keys, 1 % outliers;
    prefill + decode steps; batch 2, then a left-padded batch whose rows run alone) with the Triton kernel forced
    (interpreted) is computed twice on the same stored state: through the kernel and through its chunked dequantize
    read; outputs agree within 2e-5 (see ``tests/test_kernels_kvquant.py`` for why not two separate runs). The
    kernel really ran, and ``memory_report()`` says ``fused-triton``."""
    gpu = triton_kernel()
    calls = []
    real_kernel = gpu.kvquant_attention
    monkeypatch.setattr(gpu, "kvquant_attention", lambda *a, **k: calls.append(1) or real_kernel(*a, **k))
    diffs = attend_both_ways(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 32), generator=gen)
    padded = torch.ones_like(ids)
    padded[1, :7] = 0
    with kernels.fused(True, backend="triton"):
        for mask in (torch.ones_like(ids), padded):
            diffs.clear()
            calls.clear()
            cache = make_cache("kvquant", tiny_model, **OPTIONS)
            tiny_model(ids[:, :26], attention_mask=mask[:, :26], **cache_kwargs(tiny_model, cache))
            for t in range(26, ids.shape[1]):
                tiny_model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(tiny_model, cache))
            assert len(diffs) >= 6 and calls, "the Triton kernel was not used at every decode step"
            assert max(diffs) < 2e-5, max(diffs)
            assert "fused-triton" in cache.memory_report().attention

"""KIVI: exact byte accounting, error bounds, residual/flush rules, closeness to the full cache, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress
from kvcompress import KVCompressError, ModelGeometry, make_cache
from kvcompress.methods.kivi import GROW_TOKENS, KiviStore, value_group_size
from kvcompress.storage import make_storage
from kvcompress.compat import cache_kwargs

TINY = dict(b=1, h=2, d=16, layers=4)  # tiny llama: 2 kv heads, head_dim 16, 4 full-attention layers


def hand_bytes(L, *, kb, vb, G, Gv, R, b=1, h=2, d=16):
    """One layer's KIVI bytes for L tokens: packed codes + fp16 scale + fp16 zero + fp16 residual (K and V)."""
    nk = (L // R) * R  # keys quantized in complete R-blocks
    nv = max(0, L - R)  # values: all but the R most recent
    keys = nk * math.ceil(d * kb / 8) + (nk // G) * d * 2 * 2 + (L - nk) * d * 2
    vals = nv * math.ceil(d * vb / 8) + nv * (d // Gv) * 2 * 2 + (L - nv) * d * 2
    return b * h * (keys + vals)


def geometry(head_dim=16, kv_heads=2):
    return ModelGeometry(num_layers=1, num_heads=kv_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         layer_types=("full_attention",), sliding_window=None, max_positions=None,
                         model_id="test", dtype=torch.float32)


def fp16_randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).half().float()


@torch.no_grad()
def forced_logits(model, ids, cache, prompt_len):
    """Prefill ``ids[:, :prompt_len]`` then teacher-force the rest one token at a time; logits of every step."""
    out = [model(ids[:, :prompt_len], **cache_kwargs(None, cache)).logits[:, -1]]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], **cache_kwargs(None, cache)).logits[:, -1])
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------------------------
# bytes: the held tensors match the hand formula exactly
# ----------------------------------------------------------------------------------------------------------------


KIVI2, KIVI4, MIXED = (dict(bits=2, group_size=8, residual=16), dict(bits=4, group_size=4, residual=8),
                       dict(bits=2, key_bits=4, value_bits=8, group_size=32, residual=32))  # MIXED: G > head_dim


@pytest.mark.parametrize("opts,prompt_len,kb,vb,Gv", [
    (KIVI2, 5, 2, 2, 8), (KIVI2, 16, 2, 2, 8), (KIVI2, 37, 2, 2, 8), (KIVI4, 13, 4, 4, 4), (MIXED, 50, 4, 8, 16),
])
@torch.no_grad()
def test_bytes_match_hand_formula(tiny_model, prompt_len, opts, kb, vb, Gv):
    ids = torch.randint(0, 128, (1, prompt_len + 16), generator=torch.Generator().manual_seed(prompt_len))
    cache = make_cache("kivi", tiny_model, **opts)
    kw = dict(kb=kb, vb=vb, G=opts["group_size"], Gv=Gv, R=opts["residual"])
    tiny_model(ids[:, :prompt_len], **cache_kwargs(None, cache))
    assert cache.nbytes() == TINY["layers"] * hand_bytes(prompt_len, **kw)
    for t in range(prompt_len, ids.shape[1]):  # 16 decode steps: cross at least one key-block flush
        tiny_model(ids[:, t : t + 1], **cache_kwargs(None, cache))
        # the code buffers grow in place: their spare capacity is held, so it is counted on top of the formula
        spare = sum(layer.kv.spare_nbytes() for layer in cache.layers)
        assert cache.nbytes() == TINY["layers"] * hand_bytes(t + 1, **kw) + spare
        assert spare <= TINY["layers"] * (hand_bytes(t + 1, **kw) // 32 + 2 * GROW_TOKENS * 2 * 64)
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.nbytes() < cache.reference_nbytes()


def test_store_bytes_batch2_and_dtypes():
    s = make_storage("kivi", geometry(head_dim=64, kv_heads=3), bits=2, group_size=32, residual=128)
    x = fp16_randn(2, 3, 300, 64)
    s.append(x, x + 1)
    # keys: 256 quantized (16 B codes/token, 8 groups x 64 ch x (scale+zero)), 44 fp16; values: 172 quantized, 128 fp16
    want = 2 * 3 * ((256 * 16 + 8 * 64 * 4 + 44 * 128) + (172 * 16 + 172 * 2 * 4 + 128 * 128))
    assert s.nbytes() == want
    assert s.kq.packed.dtype == torch.uint8 and s.kq.scale.dtype == torch.float16 and s.k_res.dtype == torch.float16


# ----------------------------------------------------------------------------------------------------------------
# quantization error, token order, no re-quantization, residual rules
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_bounded_by_half_scale(bits):
    G, R, d = 4, 8, 12
    s = KiviStore(geometry(head_dim=d), bits=bits, group_size=G, residual=R)
    x_k, x_v = fp16_randn(2, 2, 50, d, seed=1), fp16_randn(2, 2, 50, d, seed=2)
    s.append(x_k[:, :, :30], x_v[:, :, :30])
    for t in range(30, 50):
        s.append(x_k[:, :, t : t + 1], x_v[:, :, t : t + 1])
    k, v = s.read(torch.float32)
    assert k.shape == x_k.shape and v.shape == x_v.shape
    nk, nv = s.kq.length, s.vq.length
    assert (nk, nv) == (48, 42)
    k_scale = s.kq.scale.float().repeat_interleave(G, dim=2)  # (b, h, nk, d)
    v_scale = s.vq.scale.float().repeat_interleave(s.vq.group, dim=3)  # (b, h, nv, d)
    assert ((k[:, :, :nk] - x_k[:, :, :nk]).abs() <= k_scale / 2 + 1e-5).all()
    assert ((v[:, :, :nv] - x_v[:, :, :nv]).abs() <= v_scale / 2 + 1e-5).all()
    assert torch.equal(k[:, :, nk:], x_k[:, :, nk:]) and torch.equal(v[:, :, nv:], x_v[:, :, nv:])  # residual exact
    assert (k[:, :, :nk] != x_k[:, :, :nk]).any()  # it really quantized


def test_odd_head_dim_value_group():
    assert value_group_size(16, 32) == 16 and value_group_size(64, 32) == 32
    assert value_group_size(80, 32) == 20 and value_group_size(96, 64) == 48 and value_group_size(7, 4) == 1
    s = KiviStore(geometry(head_dim=80), bits=2, group_size=32, residual=32)
    s.append(fp16_randn(1, 2, 40, 80), fp16_randn(1, 2, 40, 80))
    assert s.vq.scale.shape == (1, 2, 8, 4)  # 8 quantized values, 80 / 20 groups


def test_residual_and_key_block_flush_rules():
    R, G = 16, 8
    s = KiviStore(geometry(), bits=2, group_size=G, residual=R)
    x = fp16_randn(1, 2, 120, 16)
    s.append(x[:, :, :37], x[:, :, :37])  # prefill: 2 complete key blocks, all but the last 16 values
    assert (s.kq.length, s.key_residual, s.vq.length, s.value_residual) == (32, 5, 21, 16)
    old_packed, old_scale = s.kq.packed.clone(), s.kq.scale.clone()
    old_vpacked = s.vq.packed.clone()
    for t in range(37, 120):
        n_before = s.kq.length
        s.append(x[:, :, t : t + 1], x[:, :, t : t + 1])
        L = t + 1
        assert 0 <= s.key_residual < R and s.value_residual == R and len(s) == L
        assert s.kq.length % R == 0 and s.kq.length + s.key_residual == L
        assert s.kq.length - n_before in (0, R)  # keys leave the residual only as whole R-blocks...
        assert (s.kq.length > n_before) == (L % R == 0)  # ...exactly when the residual reaches R
        assert s.vq.length == L - R  # values leave one at a time
    # never re-quantized: the earliest chunks are byte-identical
    assert torch.equal(s.kq.packed[:, :, :32], old_packed) and torch.equal(s.kq.scale[:, :, :4], old_scale)
    assert torch.equal(s.vq.packed[:, :, :21], old_vpacked)
    k, v = s.read(torch.float32)
    assert torch.equal(k[:, :, -s.key_residual :], x[:, :, 112:120])


def test_decode_growth_does_not_copy_the_past():
    """#15 item 5: a decode step writes its token into the code buffers in place. Over 1000 one-token appends the
    value codes move to a new buffer a few dozen times (geometric growth), not once per step as torch.cat onto the
    whole past did; the spare capacity stays within 1/32 of the codes plus one growth step."""
    s = KiviStore(geometry(head_dim=64, kv_heads=2), bits=2, group_size=32, residual=128)
    x = fp16_randn(1, 2, 1512, 64)
    s.append(x[:, :, :512], x[:, :, :512])
    moves, last = 0, s.vq.packed.data_ptr()
    for t in range(512, 1512):
        s.append(x[:, :, t : t + 1], x[:, :, t : t + 1])
        moves += s.vq.packed.data_ptr() != last
        last = s.vq.packed.data_ptr()
    assert moves <= 60, f"the value codes moved {moves} times in 1000 steps"
    codes = s.vq.codes
    assert codes.buffer.shape[2] - codes.length <= codes.length // 32 + GROW_TOKENS
    k, v = s.read(torch.float32)  # what the buffers hold is still every token, in order
    assert torch.equal(k[:, :, -s.key_residual :], x[:, :, 1512 - s.key_residual : 1512])
    assert (v[:, :, : s.vq.length] - x[:, :, : s.vq.length]).abs().max() < 3 * s.vq.scale.float().max()


# ----------------------------------------------------------------------------------------------------------------
# model-level behaviour
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_closeness_to_full_cache(tiny_model):
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(3))
    full = forced_logits(tiny_model, ids, make_cache("full", tiny_model), 40)
    noop = kvcompress.list_methods()["kivi"].noop_options
    # KIVI attends by itself (chunked fp32 online softmax) where the full cache uses transformers' sdpa: the same
    # sums in another order
    torch.testing.assert_close(forced_logits(tiny_model, ids, make_cache("kivi", tiny_model, **noop), 40), full,
                               rtol=0, atol=2e-5)
    err = {}
    for bits in (8, 4, 2):
        got = forced_logits(tiny_model, ids, make_cache("kivi", tiny_model, bits=bits, group_size=8, residual=16), 40)
        err[bits] = (got - full).abs().max().item()
        torch.testing.assert_close(got[:, 0], full[:, 0], rtol=0, atol=2e-5)  # the prompt attends to itself at full precision
    assert 0 < err[8] < 2e-2 and err[8] < err[4] < err[2]


def test_generate_tiny_models_batch2(tiny_model, tiny_gemma):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    for model in (tiny_model, tiny_gemma):
        cache = make_cache("kivi", model, bits=2, group_size=8, residual=16)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(None, cache), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (2, 48)
        assert cache.get_seq_length() == 47
        assert cache.nbytes() < cache.reference_nbytes()
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert kinds == {"KiviLayer", "KiviSlidingLayer"}  # gemma: sliding layers held as codes too (#16)


def test_make_storage_composes():
    s = make_storage("kivi", geometry(), bits=4, group_size=8, residual=16)
    assert isinstance(s, KiviStore) and s.kq.bits == 4 and s.vq.bits == 4
    s2 = make_storage("kivi", geometry(), bits=2, key_bits=4)
    assert (s2.kq.bits, s2.vq.bits, s2.residual, s2.group_size) == (4, 2, 128, 32)


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [
    dict(bits=3), dict(bits=1), dict(bits=16), dict(bits=2.0), dict(key_bits=5), dict(value_bits=0),
    dict(group_size=0), dict(group_size=-8), dict(residual=0), dict(residual=20, group_size=8),
    dict(residual=16, group_size=32), dict(window=4),
])
def test_bad_options(tiny_model, opts):
    with pytest.raises(KVCompressError):
        make_cache("kivi", tiny_model, **opts)
    with pytest.raises(KVCompressError):
        make_storage("kivi", geometry(), **opts)


def test_bad_append():
    s = KiviStore(geometry(), bits=2, group_size=8, residual=16)
    with pytest.raises(KVCompressError):
        s.read()
    with pytest.raises(KVCompressError):
        s.append(torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 5, 16))
    with pytest.raises(KVCompressError):
        s.append(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))


# ----------------------------------------------------------------------------------------------------------------
# real model
# ----------------------------------------------------------------------------------------------------------------


STORY = ("The village sat at the edge of a wide valley, where the river bent twice before it reached the sea. "
         "Every spring the farmers walked their fields to see what the winter floods had left behind: stones, "
         "branches, and sometimes the broken planks of a boat from somewhere upstream. The oldest of them, a woman "
         "named Marta, kept a notebook of everything the river brought. She wrote down the date, the place and the "
         "object, and in the evenings she read the entries aloud to her grandchildren, who")


@pytest.mark.model
@torch.no_grad()
def test_smollm2_kivi4_generation(smollm2):
    model, tok = smollm2
    ids = tok(STORY, return_tensors="pt").input_ids  # ~100 tokens
    ref = model.generate(ids, **cache_kwargs(None, make_cache("full", model)), max_new_tokens=20, do_sample=False,
                         attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    full_top1 = torch.stack(ref.logits, 1).argmax(-1)  # (1, 20)
    # KIVI-4 with a 32-token residual (most prompt keys quantized), fed the full cache's continuation
    cache = make_cache("kivi", model, bits=4, group_size=32, residual=32)
    kivi_top1 = forced_logits(model, ref.sequences[:, :-1], cache, ids.shape[1]).argmax(-1)
    assert len(set(kivi_top1[0].tolist())) >= 8, tok.decode(kivi_top1[0])  # non-degenerate text
    assert (kivi_top1 == full_top1).float().mean().item() >= 0.8
    assert cache.memory_report().ratio > 1.5


# -- sliding-window layers (Gemma-3) -----------------------------------------------------------------------------------


def _gemma_logits(model, method, ids, prompt, **options):
    cache = make_cache(method, model, **options)
    out = []
    with torch.no_grad():
        out.append(model(ids[:, :prompt], **cache_kwargs(model, cache)).logits[0, -1])
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits[0, -1])
    return torch.stack(out), cache


def test_sliding_layers_attend_exactly_their_window(tiny_gemma):
    """Every token kept at 2 bytes (a residual longer than the text): the sliding layers' own window masking (a
    40-token prompt over a 16-token window, then 24 decode steps) gives the full cache's logits (atol 1e-5: fp32
    attention in another summation order than sdpa's)."""
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    got, _ = _gemma_logits(tiny_gemma, "kivi", ids, 40, bits=2, group_size=4, residual=1 << 20)
    want, _ = _gemma_logits(tiny_gemma, "full", ids, 40)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_sliding_layers_hold_codes_and_drop_whole_groups(tiny_gemma):
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    got, cache = _gemma_logits(tiny_gemma, "kivi", ids, 40, bits=2, group_size=4, residual=4)
    _, plain = _gemma_logits(tiny_gemma, "kivi", ids, 40, bits=2, group_size=4, residual=4, quantize_sliding=False)
    w = tiny_gemma.config.sliding_window
    for layer, fp16 in zip(cache.layers, plain.layers):
        if not layer.is_sliding:
            continue
        assert w - 1 <= layer.attended_length() <= w - 1 + 4 - 1  # the window, plus less than one key group
        assert layer.reference_nbytes() == fp16.reference_nbytes() == fp16.nbytes()  # the reference is the window
        assert layer.nbytes() < 0.8 * fp16.nbytes()  # head_dim 16, groups of 4: the fp16 stats are a large share
        assert layer.kv.kq.length % 4 == 0
    assert cache.nbytes() < plain.nbytes()

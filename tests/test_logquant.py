"""LogQuant: the log-sparse selection against hand-computed cases, the position-agnostic layout (attention over
the stored order == attention in true order), bytes == held tensors == hand formula, each token quantized once,
generate on tiny llama / tiny Gemma-3 / batch 2, bad input, and SmolLM2. Sliding-window layers (#16): the window
held as quantized blocks + full-precision tokens, blocks dropped whole, attention == a dense window reference."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import kvcompress.methods.logquant as lq
from kvcompress import KVCompressError, make_cache
from kvcompress.cache import ModelGeometry
from kvcompress.layers import KVLayer
from kvcompress.methods.logquant import LogQuantConfig, LogQuantLayer, LogQuantSlidingLayer, log_schedule
from kvcompress.compat import cache_kwargs


def _geometry(kv_heads=2, head_dim=16):
    return ModelGeometry(1, kv_heads * 2, kv_heads, head_dim, ("full_attention",), None, 4096, "t", torch.float32)


def _layer(window, **opts):
    return LogQuantLayer(_geometry(), 0, LogQuantConfig(window=window, **opts))


def _store(layer, k, v):
    """The layer's storage step alone (what ``update`` + ``attend`` do to its state): ``dense_step`` returns the dense
    ``[past | new]`` attention reads."""
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    out = layer.dense_step(k, v)
    layer.tokens_seen += k.shape[-2]
    return out


def _feed(layer, calls, batch=1, seed=0, tagged=False):
    """Feed ``calls`` token counts through ``layer``; K/V rows carry their position when ``tagged``.
    Returns the (keys, values) of the last call and the full in-order K/V fed so far."""
    g = torch.Generator().manual_seed(seed)
    total = sum(calls)
    if tagged:  # a constant vector per token: exact in fp16 and through per-token quantization
        k = torch.arange(total, dtype=torch.float32).view(1, 1, total, 1).expand(batch, 2, total, 16).contiguous()
        v = -k
    else:
        k, v = torch.randn(batch, 2, total, 16, generator=g), torch.randn(batch, 2, total, 16, generator=g)
    pos, out = 0, None
    for n in calls:
        out = _store(layer, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
    return out, (k, v)


# -- selection rule ---------------------------------------------------------------------------------------------------


def test_schedule_hand_computed_w2():
    # W=2, prompt 7: local 7 > 4 -> halve [0,1,2,3]: keep 0,2, quantize 1,3 -> fp [0,2 | 4,5,6]
    assert log_schedule([7], 2) == ([0, 2, 4, 5, 6], [1, 3])
    assert log_schedule([7, 1], 2) == ([0, 2, 4, 5, 6, 7], [1, 3])  # local = 4 = 2W: no flush, 3W fp
    # token 8: local 5 > 4 -> halve [0,2 | 4,5] -> keep 0,4, quantize 2,5
    assert log_schedule([7, 1, 1], 2) == ([0, 4, 6, 7, 8], [1, 3, 2, 5])
    assert log_schedule([7, 1, 1, 1, 1], 2) == ([0, 6, 8, 9, 10], [1, 3, 2, 5, 4, 7])


def test_schedule_prefill_equals_token_by_token_and_w4_case():
    # W=4, 9 tokens: halve [0..7] -> keep 0,2,4,6; local [8]
    assert log_schedule([9], 4) == ([0, 2, 4, 6, 8], [1, 3, 5, 7])
    # grow the local window to 9 tokens (8..16): halve [0,2,4,6 | 8,9,10,11] -> keep 0,4,8,10
    fp, q = log_schedule([17], 4)
    assert fp == [0, 4, 8, 10, 12, 13, 14, 15, 16] and q == [1, 3, 5, 7, 2, 6, 9, 11]
    for n in (1, 5, 8, 9, 23, 64, 130):  # prefill runs the same loop as decoding one token at a time
        assert log_schedule([n], 4) == log_schedule([1] * n, 4)
        assert log_schedule([n], 4) == log_schedule([n // 2, n - n // 2], 4)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_schedule_invariants(window):
    for n in range(1, 12 * window):
        fp, q = log_schedule([n], window)
        assert len(fp) <= 3 * window and sorted(fp + q) == list(range(n))
        assert fp == sorted(fp) and fp[0] == 0 and len(q) % window == 0  # whole flushes of W; the first token stays
        assert fp[-1] == n - 1  # the newest token is always kept
        if n > 3 * window:  # past the first two flushes the local window holds at least the newest W+1
            assert fp[-(window + 1) :] == list(range(n - window - 1, n))
        if n > 2 * window:
            assert len(fp) > window  # the sparse list is full (W) once anything was quantized


def test_schedule_is_log_spaced():
    w = 16
    fp, _ = log_schedule([2000], w)
    local = fp[-(len(fp) - w) :]
    assert local == list(range(local[0], 2000))  # a contiguous local window
    gaps = torch.diff(torch.tensor(fp[1:w])).tolist()  # the log-sparse list (after the first token)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] == 2 and gaps[0] >= 8  # spacing doubles going back
    # full-precision density halves window by window going back from the local window
    start = local[0]
    density = [sum(start - (i + 1) * w <= p < start - i * w for p in fp) for i in range(3)]
    assert density == [w // 2, w // 4, w // 8]


# -- the layer: layout, order invariance, no re-quantization ---------------------------------------------------------


@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_layer_stores_what_the_schedule_says(key_axis):
    calls = [23, 1, 1, 1, 4, 1, 1]
    layer = _layer(4, key_axis=key_axis)
    _, (k, v) = _feed(layer, calls, tagged=True)
    fp, q = log_schedule(calls, 4)
    assert layer.fp_k[0, 0, :, 0].tolist() == fp and layer.fp_v[0, 1, :, 3].tolist() == [-p for p in fp]
    if key_axis == "token":  # constant per-token vectors dequantize exactly: the quantized block in storage order
        assert layer.kq.read(torch.float32)[0, 0, :, 0].tolist() == q
    assert layer.vq.read(torch.float32)[0, 1, :, 5].tolist() == [-p for p in q]


@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_decode_attention_over_stored_layout_equals_in_order(key_axis):
    calls = [40, 1, 1, 1, 1, 1]
    layer = _layer(4, key_axis=key_axis)
    (keys, values), _ = _feed(layer, calls, batch=2, seed=3)
    fp, q = log_schedule(calls[:-1], 4)
    order = torch.tensor(q + fp + [sum(calls) - 1])  # storage order -> positions
    inv = torch.argsort(order)
    k_in, v_in = keys[:, :, inv], values[:, :, inv]  # the same stored values, in true position order
    assert not torch.equal(k_in, keys)  # the layout really is out of order
    query = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(
        F.scaled_dot_product_attention(query, keys, values), F.scaled_dot_product_attention(query, k_in, v_in), atol=1e-6, rtol=1e-5
    )


class _InOrderLayer(LogQuantLayer):
    """Test double: returns the same stored values, permuted into true position order (a causal prefix order),
    attended densely (the base layer's attend over ``dense_step``)."""

    calls: list
    attend_step = KVLayer.attend_step

    def dense_step(self, key_states, value_states):
        keys, values = super().dense_step(key_states, value_states)
        past = log_schedule(self.calls, self.window) if self.calls else ([], [])
        self.calls = self.calls + [key_states.shape[-2]]
        order = torch.tensor(past[1] + past[0] + list(range(self.tokens_seen, self.tokens_seen + key_states.shape[-2])))
        inv = torch.argsort(order)
        return keys[:, :, inv], values[:, :, inv]


def test_model_logits_equal_in_order_computation(tiny_model):
    """Decode steps and a multi-token chunk after prefill: the stored layout gives the in-order logits."""
    ids = torch.randint(1, 128, (2, 60), generator=torch.Generator().manual_seed(5))
    feeds = [ids[:, :40], ids[:, 40:41], ids[:, 41:42], ids[:, 42:50], ids[:, 50:51], ids[:, 51:52]]

    def run(in_order):
        cache = make_cache("logquant", tiny_model, window=4)
        if in_order:
            for i, layer in enumerate(cache.layers):
                cache.layers[i] = _InOrderLayer(layer.geometry, i, cache.method.config)
                cache.layers[i].calls = []
        with torch.no_grad():
            return [tiny_model(x, **cache_kwargs(None, cache)).logits for x in feeds], cache

    ours, cache = run(False)
    ref, _ = run(True)
    assert cache.layers[0].quantized_length > 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_each_token_quantized_once_and_codes_never_rewritten(monkeypatch):
    seen_lengths = []
    real = lq.quantize_uniform

    def counting(x, *args, **kwargs):
        seen_lengths.append(x.shape[-2])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(lq, "quantize_uniform", counting)
    w = 4
    layer = _layer(w, key_axis="channel")
    _feed(layer, [30])
    prefill_q = layer.quantized_length
    assert seen_lengths == [prefill_q, prefill_q] == [len(log_schedule([30], w)[1])] * 2  # one call for K, one for V
    snapshot = [layer.kq.read(torch.float32), layer.vq.read(torch.float32)]
    seen_lengths.clear()
    g = torch.Generator().manual_seed(1)
    for _ in range(3 * w):
        _store(layer, torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g))
    assert seen_lengths and set(seen_lengths) == {w}  # a flush quantizes exactly the W tokens leaving fp
    assert layer.quantized_length == prefill_q + len(seen_lengths) // 2 * w
    for old, new in zip(snapshot, [layer.kq.read(torch.float32), layer.vq.read(torch.float32)]):
        assert torch.equal(new[:, :, : old.shape[2]], old)  # the earlier codes/stats are untouched


def test_prefill_returns_the_prompt_and_decode_returns_every_token():
    layer = _layer(4)
    (keys, values), (k, v) = _feed(layer, [30])
    assert torch.equal(keys, k.half().float()) and torch.equal(values, v.half().float())  # the prompt, as stored
    (keys, _), _ = _feed(layer, [1])
    assert keys.shape[-2] == 31 and layer.attended_length() == 31 and layer.get_seq_length() == 31


# -- bytes -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_axis,bits", [("token", 2), ("channel", 2), ("token", 4)])
def test_nbytes_equals_held_tensors_and_hand_formula(key_axis, bits):
    b, h, d, w = 2, 2, 16, 4
    layer = _layer(w, key_axis=key_axis, bits=bits, group_size=8)
    calls = [37] + [1] * 15  # decode flushes too: the buffers grow by exactly their new tokens (no spare held)
    _feed(layer, calls, batch=b)
    n_fp, n_q = len(log_schedule(calls, w)[0]), len(log_schedule(calls, w)[1])
    assert n_q > len(log_schedule([37], w)[1])
    assert layer.fp_k.shape[-2] == n_fp and layer.quantized_length == n_q and n_q % w == 0
    fp_bytes = 2 * b * h * n_fp * d * 2  # K and V at 2 bytes
    codes = 2 * b * h * n_q * d * bits // 8
    value_stats = b * h * n_q * (d // 8) * 2 * 2  # per token, groups of 8: fp16 scale + zero
    key_stats = value_stats if key_axis == "token" else b * h * (n_q // w) * d * 2 * 2  # per channel per flush
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.held_tensors())
    assert layer.nbytes() == fp_bytes + codes + value_stats + key_stats
    assert layer.reference_nbytes() == b * 52 * h * d * 2 * 2


# -- the model ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,batch", [("tiny_model", 1), ("tiny_model", 2), ("tiny_gemma", 1)])
@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_generate(request, which, batch, key_axis):
    model = request.getfixturevalue(which)
    ids = torch.randint(1, 128, (batch, 50), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if batch == 2:
        mask[1, :7] = 0  # left padding in the second row
    with make_cache("logquant", model, window=4, key_axis=key_axis) as cache:
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(None, cache), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert out.shape == (batch, 60)
        assert cache.nbytes() < cache.reference_nbytes()
        full_layers = [layer for layer in cache.layers if isinstance(layer, LogQuantLayer)]
        assert full_layers
        held = [row for layer in full_layers for row in (layer._rows or [layer])]  # a padded batch runs row by row
        assert len(held) == len(full_layers) * (batch if batch == 2 else 1)
        assert all(layer.fp_k.shape[-2] <= 12 for layer in held)
        if which == "tiny_gemma":  # sliding-window layers are held as LogQuant too (#16)
            sliding = [layer for layer in full_layers if isinstance(layer, LogQuantSlidingLayer)]
            assert sliding and len(full_layers) == len(cache.layers)
            assert all(row.blocks for layer in sliding for row in (layer._rows or [layer]))


def test_bits4_is_closer_than_bits2(tiny_model):
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = tiny_model(ids).logits[:, -1]

        def err(bits):
            cache = make_cache("logquant", tiny_model, window=4, bits=bits)
            tiny_model(ids[:, :-1], **cache_kwargs(None, cache))
            return (tiny_model(ids[:, -1:], **cache_kwargs(None, cache)).logits[:, -1] - ref).abs().max().item()

        assert err(4) < err(2)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"window": 2.5}, "window"),
        ({"window": 4096}, "larger than the context"),
        ({"bits": 3}, "bits"),
        ({"bits": 8}, "bits"),
        ({"key_axis": "head"}, "key_axis"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 12}, "does not divide head_dim"),
        ({"residual": 8}, "unknown option"),
        ({"quantize_sliding": "yes"}, "quantize_sliding"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_model, options, match):
    with pytest.raises(KVCompressError, match=match):
        make_cache("logquant", tiny_model, **options)


@pytest.mark.model
def test_smollm2_close_to_full_and_compressed(smollm2):
    model, tok = smollm2
    from pydoc_data.topics import topics

    ids = tok(topics["assert"] + topics["for"], return_tensors="pt")["input_ids"][:, :184]
    prompt, cont = ids[:, :160], ids[:, 160:]
    with torch.no_grad():
        full = model(ids).logits[0, 160:-1]
        with make_cache("logquant", model, window=8, bits=4) as cache:
            model(prompt, **cache_kwargs(None, cache))
            steps = torch.stack([model(cont[:, i : i + 1], **cache_kwargs(None, cache)).logits[0, -1] for i in range(23)])
            ratio = cache.reference_nbytes() / cache.nbytes()
            assert max(layer.fp_k.shape[-2] for layer in cache.layers) <= 24
    kl = F.kl_div(steps.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean").item()
    agree = (steps.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert ratio > 2.0 and kl < 0.1 and agree >= 0.75, (ratio, kl, agree)


# -- profile spikes --------------------------------------------------------------------------------------------------


def test_spike_profile_tallies(tiny_model, tmp_path):
    from kvcompress.profiles.spikes import markdown, octave_bins, plot, profile_spikes

    assert octave_bins(9) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]
    ids = torch.randint(1, 128, (1, 80), generator=torch.Generator().manual_seed(0))
    r = profile_spikes(tiny_model, ids, queries=8, top_k=4, window=4)
    assert sum(b["spike_share"] for b in r["bins"]) == pytest.approx(1.0)
    assert sum(b["mass_share"] for b in r["bins"]) == pytest.approx(1.0)
    assert r["bins"][0]["logquant_fp_share"] == 1.0 and r["bins"][-1]["bin"] == "first token"
    o = r["overall"]
    assert 0 < o["window_spike_coverage"] < 1 and 0 < o["logquant_mass_coverage"] < 1
    assert len(r["layers"]) == 4 and "slope" in markdown(r)
    assert plot(r, tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(KVCompressError, match="queries"):
        profile_spikes(tiny_model, ids, queries=80)


# -- sliding-window layers (Gemma-3, #16) ----------------------------------------------------------------------------


def _sliding_layer(size, window, d=8, **opts):
    g = ModelGeometry(1, 2, 1, d, ("sliding_attention",), size, 1 << 20, "t", torch.float32)
    return LogQuantSlidingLayer(g, 0, LogQuantConfig(window=window, **opts))


@pytest.mark.parametrize("size,window", [(16, 2), (16, 4), (16, 7), (16, 8), (64, 8), (100, 7), (512, 42)])
@pytest.mark.parametrize("calls", ["decode", "prefill", "chunks"])
def test_sliding_layer_holds_exactly_the_window(size, window, calls):
    """Tagged tokens (constant vectors, exact through per-token quantization): after every step the window read back
    is exactly positions ``seen - n .. seen - 1`` (n = min(seen, size - 1)) in order, the full-precision run holds
    no token outside it, blocks are whole flushes (W tokens) with at least one token inside, at most 3W tokens
    are at full precision, and what is held beyond the window stays under 2W tokens (blocks that straddle its edge)."""
    layer = _sliding_layer(size, window, key_axis="token")
    cycles = min(6, 2000 // (size + 16))  # tags stay below 2048 (integers exact in fp16)
    sizes = {"decode": [1] * (3 * size + 10), "prefill": [2 * size + 9] + [1] * size,
             "chunks": [5, 3, size, 1, 7] * cycles}
    pos = 0
    for n in sizes[calls]:
        k = torch.arange(pos, pos + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 8).contiguous()
        _store(layer, k, -k)
        pos += n
        keys, values = layer._window(torch.float32)
        want = list(range(pos - min(pos, size - 1), pos))
        assert keys[0, 0, :, 3].tolist() == want and values[0, 0, :, 0].tolist() == [-p for p in want]
        horizon = pos - size  # the next query sees positions > horizon
        assert layer.fp_pos is None or int(layer.fp_pos.min()) > horizon
        assert all(blk[2].numel() == window and blk[3] == int(blk[2].max()) > horizon for blk in layer.blocks)
        assert layer.fp_k.shape[-2] <= 3 * window
        assert layer.attended_length() - min(pos, size - 1) < 2 * window
        assert layer.reference_tokens() == min(pos, size - 1)


def test_sliding_blocks_are_quantized_once_and_leave_whole(monkeypatch):
    """A block's codes are the same tensors from its flush until it is dropped (never re-quantized or copied), and
    every quantize call takes exactly one flush (W tokens)."""
    calls = []
    real = lq.quantize_uniform

    def counting(x, *args, **kwargs):
        calls.append(x.shape[-2])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(lq, "quantize_uniform", counting)
    layer, g = _sliding_layer(32, 4), torch.Generator().manual_seed(0)
    seen_codes: dict[int, torch.Tensor] = {}  # id of a block's key codes -> the tensor
    dropped = 0
    for n in [40] + [1] * 60:
        _store(layer, torch.randn(1, 1, n, 8, generator=g), torch.randn(1, 1, n, 8, generator=g))
        now = {id(blk[0].packed): blk[0].packed for blk in layer.blocks}
        dropped += len(set(seen_codes) - set(now))
        for key, codes in now.items():  # a block still held keeps its tensors
            assert key not in seen_codes or seen_codes[key] is codes
        seen_codes.update(now)
    assert dropped > 5 and set(calls) == {4}


def test_sliding_nbytes_equals_held_tensors_and_hand_formula():
    b, d, w = 2, 32, 4
    layer = _sliding_layer(24, w, d=d, bits=2, group_size=16)
    g = torch.Generator().manual_seed(3)
    for n in [30, 1, 1, 1, 5]:
        _store(layer, torch.randn(b, 1, n, d, generator=g), torch.randn(b, 1, n, d, generator=g))
    n_fp, n_q = layer.fp_pos.numel(), len(layer.blocks) * w
    fp_bytes = 2 * b * n_fp * d * 2 + 4 * n_fp  # K and V at 2 bytes + int32 positions
    codes = 2 * b * n_q * d * 2 // 8
    value_stats = b * n_q * (d // 16) * 2 * 2  # per token, groups of 16: fp16 scale + zero
    key_stats = b * len(layer.blocks) * d * 2 * 2  # per channel per block
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.held_tensors())
    assert layer.nbytes() == fp_bytes + codes + value_stats + key_stats + 4 * n_q
    assert layer.reference_nbytes() == b * 23 * d * 2 * 2  # the window (size - 1 tokens), not the 38 seen


class _DenseWindow(LogQuantSlidingLayer):
    """Test double: the same state update, but attention is transformers' own over :meth:`dense_step`'s dense
    ``[window in position order | new]`` with transformers' sliding-window mask."""

    attends = False

    def attended_length(self):
        return min(self.tokens_seen, self.size - 1)


def _gemma_feeds(model, feeds, dense, **options):
    cache = make_cache("logquant", model, **options)
    if dense:
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, LogQuantSlidingLayer):
                cache.layers[i] = _DenseWindow(layer.geometry, i, layer.config)
    with torch.no_grad():
        return [model(x, **cache_kwargs(model, cache)).logits for x in feeds], cache


@pytest.mark.parametrize("options", [{"window": 4}, {"window": 2, "key_axis": "token"}, {"window": 3, "bits": 4}])
def test_sliding_layers_equal_a_dense_window_reference(tiny_gemma, options):
    """Tiny Gemma-3 (16-token windows), 90 tokens = 5+ windows: a 40-token prompt, 20 decode steps, a 15-token chunk,
    15 decode steps. The sliding layers attending by themselves over their blocks and full-precision run give the
    logits of the dense reference over the same quantized tokens masked by transformers (atol 5e-5 on logits of
    size ~1: fp32 in another summation order; a token of the window missed or one outside it seen moves them
    by 1e-3 or more)."""
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    feeds = ([ids[:, :40]] + [ids[:, t : t + 1] for t in range(40, 60)] + [ids[:, 60:75]]
             + [ids[:, t : t + 1] for t in range(75, 90)])
    ours, cache = _gemma_feeds(tiny_gemma, feeds, False, **options)
    ref, _ = _gemma_feeds(tiny_gemma, feeds, True, **options)
    sliding = [layer for layer in cache.layers if isinstance(layer, LogQuantSlidingLayer)]
    assert sliding and all(layer.blocks for layer in sliding)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5)


def test_sliding_layers_compress_the_window_and_can_be_switched_off(tiny_gemma):
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(4))
    _, on = _gemma_feeds(tiny_gemma, [ids[:, :50]] + [ids[:, t : t + 1] for t in range(50, 60)], False, window=4)
    _, off = _gemma_feeds(tiny_gemma, [ids[:, :50]] + [ids[:, t : t + 1] for t in range(50, 60)], False, window=4,
                          quantize_sliding=False)
    for a, b in zip(on.layers, off.layers):
        if not b.is_sliding:
            continue
        assert isinstance(a, LogQuantSlidingLayer) and not isinstance(b, LogQuantLayer)
        assert a.reference_nbytes() == b.reference_nbytes() == b.nbytes()  # the reference is the window
        assert a.nbytes() < b.nbytes()
    assert on.nbytes() < off.nbytes()
    assert "LogQuant too" in lq.LogQuant.sliding


def test_sliding_two_caches_from_two_threads_generate_what_they_generate_alone(tiny_gemma):
    """Two LogQuant caches decoding from two threads on one tiny Gemma-3 (prompts cross the 16-token window)."""
    gen = torch.Generator().manual_seed(13)
    prompts = [torch.randint(1, 128, (1, 40), generator=gen) for _ in range(2)]

    def generate(ids):
        with make_cache("logquant", tiny_gemma, window=4) as cache:
            return tiny_gemma.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(None, cache),
                                       max_new_tokens=16, do_sample=False, pad_token_id=0)

    alone = [generate(p).tolist() for p in prompts]
    errors, barrier = [], threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                assert generate(prompts[i]).tolist() == alone[i]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

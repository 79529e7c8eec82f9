"""LogQuant: the log-sparse selection against hand-computed cases, the position-agnostic layout (attention over
the stored order == attention in true order), bytes == held tensors == hand formula, each token quantized once,
generate on tiny llama / tiny Gemma-3 / batch 2, bad input, and SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvcompress.methods.logquant as lq
from kvcompress import KVCompressError, make_cache
from kvcompress.cache import ModelGeometry
from kvcompress.layers import KVLayer
from kvcompress.methods.logquant import LogQuantConfig, LogQuantLayer, log_schedule
from kvcompress.compat import cache_kwargs


def _geometry(kv_heads=2, head_dim=16):
    return ModelGeometry(1, kv_heads * 2, kv_heads, head_dim, ("full_attention",), None, 4096, "t", torch.float32)


def _layer(window, **opts):
    return LogQuantLayer(_geometry(), 0, LogQuantConfig(window=window, **opts))


def _store(layer, k, v):
    """The layer's storage step alone (what ``update`` + ``attend`` do to its state): ``store`` returns the dense
    ``[past | new]`` attention reads."""
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    out = layer.store(k, v)
    layer.seen += k.shape[-2]
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
    attended densely (the base layer's attend over ``store``)."""

    calls: list
    attend_step = KVLayer.attend_step

    def store(self, key_states, value_states):
        keys, values = super().store(key_states, value_states)
        past = log_schedule(self.calls, self.window) if self.calls else ([], [])
        self.calls = self.calls + [key_states.shape[-2]]
        order = torch.tensor(past[1] + past[0] + list(range(self.seen, self.seen + key_states.shape[-2])))
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
    assert keys.shape[-2] == 31 and layer.kept_length() == 31 and layer.get_seq_length() == 31


# -- bytes -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_axis,bits", [("token", 2), ("channel", 2), ("token", 4)])
def test_nbytes_equals_held_tensors_and_hand_formula(key_axis, bits):
    b, h, d, w = 2, 2, 16, 4
    layer = _layer(w, key_axis=key_axis, bits=bits, group_size=8)
    _feed(layer, [37, 1, 1, 1], batch=b)
    n_fp, n_q = len(log_schedule([37, 1, 1, 1], w)[0]), len(log_schedule([37, 1, 1, 1], w)[1])
    assert layer.fp_k.shape[-2] == n_fp and layer.quantized_length == n_q and n_q % w == 0
    fp_bytes = 2 * b * h * n_fp * d * 2  # K and V at 2 bytes
    codes = 2 * b * h * n_q * d * bits // 8
    value_stats = b * h * n_q * (d // 8) * 2 * 2  # per token, groups of 8: fp16 scale + zero
    key_stats = value_stats if key_axis == "token" else b * h * (n_q // w) * d * 2 * 2  # per channel per flush
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.held_tensors())
    assert layer.nbytes() == fp_bytes + codes + value_stats + key_stats
    assert layer.reference_nbytes() == b * 40 * h * d * 2 * 2


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
        if which == "tiny_gemma":  # sliding-window layers keep their plain 2-byte window
            assert len(full_layers) < len(cache.layers)


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

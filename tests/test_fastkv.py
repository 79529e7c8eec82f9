"""FastKV: token-selective propagation checked against the later layers run by hand on the selected tokens,
no-op settings equal the full cache, kept bytes, decode positions, Gemma-3 layout, bad input."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from kvcompress import KVCompressError, make_cache
from kvcompress.methods.fastkv import gather_tokens, slice_mask, tsp_select
from kvcompress.observe import decoder_layers
from kvcompress.compat import cache_kwargs


def _ids(b, n, seed=0):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _reference_after_tsp(model, ids, index, tsp, attention_mask=None):
    """Logits of the selected tokens computed by hand: layers 0..tsp on the whole prompt (full fp16 cache, as
    fastkv stores), then the later decoder layers on the gathered hidden states with their original positions,
    RoPE per layer type, and an explicit causal (+ sliding window, + padding) mask built here."""
    inner, cfg = model.model, model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    with make_cache("full", model) as cache, torch.no_grad():
        out = model(ids, attention_mask=attention_mask, **cache_kwargs(None, cache), output_hidden_states=True)
        hidden = gather_tokens(out.hidden_states[tsp + 1], index, 1)  # output of decoder layer tsp
        b, n = ids.shape
        pos = gather_tokens(torch.arange(n).expand(b, n), index, 1)  # (b, s) original positions
        dist = pos[:, None, :, None] - pos[:, None, None, :]  # query position - key position
        allowed = {"full_attention": dist >= 0}
        allowed["sliding_attention"] = (dist >= 0) & (dist < (getattr(cfg, "sliding_window", None) or n + 1))
        if attention_mask is not None:
            keep = gather_tokens(attention_mask.bool(), index, 1)[:, None, None, :]
            allowed = {k: v & keep for k, v in allowed.items()}
        later = make_cache("full", model)
        for i, layer in enumerate(decoder_layers(model)[tsp + 1 :], start=tsp + 1):
            per_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters  # Gemma-3
            rope = inner.rotary_emb(hidden, pos, types[i]) if per_type else inner.rotary_emb(hidden, pos)
            hidden = layer(hidden, attention_mask=allowed[types[i]], position_embeddings=rope, position_ids=pos,
                           **cache_kwargs(None, later))
        return model.lm_head(inner.norm(hidden))


@pytest.mark.parametrize("padded", [False, True])
def test_tsp_matches_later_layers_run_by_hand(tiny_model, padded):
    ids = _ids(2, 96)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :10] = 0  # left padding on row 1: the mask is a tensor and must be sliced
    with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.4, budget=0.2) as cache, torch.no_grad():
        logits = tiny_model(ids, attention_mask=mask, **cache_kwargs(None, cache)).logits
        index = cache.method.tsp_index
    s = 39  # ceil(0.4 * 96)
    assert index.shape == (2, s) and logits.shape[:2] == (2, s)
    assert torch.equal(index[:, -8:], torch.arange(88, 96).expand(2, 8))  # the window is always propagated
    assert bool((index.diff(dim=1) > 0).all())  # original order
    ref = _reference_after_tsp(tiny_model, ids, index, 1, mask)
    valid = torch.ones_like(index, dtype=torch.bool) if mask is None else gather_tokens(mask.bool(), index, 1)
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_later_layers_really_run_on_fewer_tokens(tiny_model):
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0].shape[1]), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(tiny_model))
    ]
    try:
        with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.25, budget=0.1) as cache, torch.no_grad():
            tiny_model(_ids(1, 80), **cache_kwargs(None, cache))
            frac = cache.method.prefill_fraction(80)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {0: 80, 1: 80, 2: 20, 3: 20}
    assert frac == pytest.approx((2 * 80 + 2 * 20) / (4 * 80))


def test_tsp_select_and_slicing_by_hand():
    scores = torch.tensor([[5.0, 0.0, 3.0, 1.0, 9.0, 0.5, 0.1, 0.2]])
    assert tsp_select(scores, 4, 2).tolist() == [[0, 4, 6, 7]]  # top-2 of the prefix + the last 2, in order
    mask = torch.arange(64).view(1, 1, 8, 8)
    idx = torch.tensor([[0, 4, 6, 7]])
    assert torch.equal(slice_mask(mask, idx)[0, 0], mask[0, 0][idx[0]][:, idx[0]])
    assert slice_mask(None, idx) is None


def test_noop_settings_reproduce_full_cache_exactly(tiny_model):
    ids = _ids(2, 70, seed=3)
    with torch.no_grad():
        with make_cache("full", tiny_model) as full:
            a = tiny_model(ids, **cache_kwargs(None, full)).logits
            a2 = tiny_model(ids[:, :1], **cache_kwargs(None, full)).logits
        with make_cache("fastkv", tiny_model, tsp_rate=1.0, budget=1.0) as ours:
            b = tiny_model(ids, **cache_kwargs(None, ours)).logits
            b2 = tiny_model(ids[:, :1], **cache_kwargs(None, ours)).logits
    # fastkv attends by itself (chunked fp32 online softmax) where the full cache uses transformers' sdpa
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    torch.testing.assert_close(b2, a2, rtol=0, atol=2e-5)


def test_kept_bytes_are_held_tensors_and_budget(tiny_model):
    batch, n = 2, 90
    with make_cache("fastkv", tiny_model, tsp_layer=2, tsp_rate=0.5, budget=0.2) as cache, torch.no_grad():
        tiny_model(_ids(batch, n), **cache_kwargs(None, cache))
        kept = 18  # ceil(0.2 * 90) per layer and KV head, also after tsp_layer
        for layer in cache.layers:
            held = sum(t.numel() * t.element_size() for t in layer.held_tensors() if t is not None)
            assert layer.nbytes() == held == batch * 2 * kept * 16 * 2 * 2  # b, kv heads, kept, head_dim, K+V, fp16
            assert layer.attended_length() == kept and layer.get_seq_length() == n
        index = cache.method.tsp_index  # the selected positions, kept for inspection: held, counted once
        assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) + index.numel() * 8
        assert cache.reference_nbytes() / (cache.nbytes() - index.numel() * 8) == pytest.approx(n / kept)
    # a KV budget above the TSP rate is clamped to the TSP set (all layers keep the same count)
    with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.2, budget=0.5) as cache, torch.no_grad():
        tiny_model(_ids(1, 50), **cache_kwargs(None, cache))
        assert {layer.attended_length() for layer in cache.layers} == {10}
    # a token budget
    with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.5, budget=12) as cache, torch.no_grad():
        tiny_model(_ids(1, 50), **cache_kwargs(None, cache))
        assert {layer.attended_length() for layer in cache.layers} == {12}


def test_decode_appends_at_the_right_positions(tiny_model):
    """A decode step through the fastkv cache equals one through a DynamicCache holding the same kept K/V, with
    the logical position N given explicitly: decode uses position N and evicts nothing."""
    ids, n = _ids(1, 64, seed=5), 64
    with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.5, budget=0.25) as cache, torch.no_grad():
        tiny_model(ids, **cache_kwargs(None, cache))
        dyn = DynamicCache(config=tiny_model.config)
        for i, layer in enumerate(cache.layers):
            k, v = layer.stored_kv(torch.float32)
            dyn.update(k, v, i)
        nxt = torch.tensor([[7]])
        ours = tiny_model(nxt, **cache_kwargs(None, cache)).logits
        ref = tiny_model(nxt, **cache_kwargs(None, dyn), position_ids=torch.tensor([[n]])).logits
        assert [layer.attended_length() for layer in cache.layers] == [17] * 4
        assert cache.get_seq_length() == n + 1
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)  # ours stores the new token in fp16


def test_generate_batch_two(tiny_model):
    ids = _ids(2, 100, seed=7)
    with make_cache("fastkv", tiny_model, tsp_rate=0.3, budget=0.1) as cache, torch.no_grad():
        out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(None, cache),
                                  max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 106)
        assert {layer.attended_length() for layer in cache.layers} == {10 + 5}
        assert cache.method.tsp_layer == 1  # default: 15/32 of 4 layers


def _gemma(layers=8, full=(3, 7)):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=16, max_position_embeddings=4096,
        layer_types=["full_attention" if i in full else "sliding_attention" for i in range(layers)],
    )
    return Gemma3ForCausalLM(cfg).eval()


def test_gemma3_layout():
    model = _gemma()
    ids = _ids(1, 80, seed=2)
    with torch.no_grad():
        with make_cache("full", model) as full:
            a = model(ids, **cache_kwargs(None, full)).logits
        with make_cache("fastkv", model, tsp_rate=1.0, budget=1.0) as ours:
            b = model(ids, **cache_kwargs(None, ours)).logits
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)  # fastkv's full layers attend by themselves
        with make_cache("fastkv", model, tsp_layer=3, tsp_rate=0.2, budget=0.1) as cache:
            out = model.generate(ids, **cache_kwargs(None, cache), max_new_tokens=4, do_sample=False, pad_token_id=0)
            index = cache.method.tsp_index
            assert out.shape == (1, 84)
            # the TSP set holds the sliding layers' window (last 15 tokens) + top tokens up to 0.2 * 80
            assert index.shape == (1, 16) and torch.equal(index[0, 1:], torch.arange(65, 80))
            for i, layer in enumerate(cache.layers):
                assert layer.get_seq_length() == 83
                assert layer.attended_length() == (15 if i not in (3, 7) else 8 + 3)
    # later layers (sliding and full, each with its own RoPE and mask) equal a run by hand on the TSP set
    with make_cache("fastkv", model, tsp_layer=3, tsp_rate=0.3, budget=0.2) as cache, torch.no_grad():
        logits = model(ids, **cache_kwargs(None, cache)).logits
        index = cache.method.tsp_index
    assert index.shape == (1, 24)
    torch.testing.assert_close(logits, _reference_after_tsp(model, ids, index, 3), atol=1e-4, rtol=1e-4)


def test_gemma3_without_usable_tsp_layer_is_a_clear_error(tiny_gemma):
    with pytest.raises(KVCompressError, match="no full-attention layer"):
        make_cache("fastkv", tiny_gemma)  # 6 layers: the only full-attention layer is the last one
    with pytest.raises(KVCompressError, match="sliding-window layer"):
        make_cache("fastkv", _gemma(), tsp_layer=2)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"tsp_layer": 3}, r"outside \[0, 2\]"),
        ({"tsp_layer": -1}, "tsp_layer"),
        ({"tsp_layer": "2"}, "tsp_layer"),
        ({"tsp_rate": 0.0}, "tsp_rate"),
        ({"tsp_rate": 1.5}, "tsp_rate"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.2}, "budget"),
        ({"budget": 0}, "budget"),
        ({"window": 0}, "window"),
        ({"pool": "median"}, "pool"),
        ({"kernel": 4}, "kernel"),
        ({"storage": "nope"}, "storage"),
        ({"tsp_ratio": 0.2}, "unknown option"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_model, options, match):
    with pytest.raises(KVCompressError, match=match):
        make_cache("fastkv", tiny_model, **options)


def test_model_without_llama_layout_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    with pytest.raises(KVCompressError, match="decoder layers"):
        make_cache("fastkv", model)


def test_hooks_are_removed_and_a_second_cache_is_independent(tiny_model):
    ids = _ids(1, 60)
    hooks = lambda: [(set(m._forward_pre_hooks), set(m._forward_hooks)) for m in tiny_model.modules()]  # noqa: E731
    before = hooks()
    with torch.no_grad():
        first = make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.5)
        assert hooks() != before
        first.close()
        with make_cache("full", tiny_model) as full:
            assert tiny_model(ids, **cache_kwargs(None, full)).logits.shape[1] == 60  # no reduction leaks
        with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.5) as second:
            assert tiny_model(ids, **cache_kwargs(None, second)).logits.shape[1] == 30
        assert hooks() == before


@pytest.mark.model
def test_smollm2_fastkv_keeps_the_next_token(smollm2, prose):
    model, tok = smollm2
    ids = tok(prose[:2000], return_tensors="pt").input_ids[:, :250]
    with torch.no_grad():
        with make_cache("full", model) as full:
            ref = model(ids, **cache_kwargs(None, full)).logits[:, -1]
        with make_cache("fastkv", model, tsp_rate=0.2, budget=0.2) as cache:
            out = model(ids, **cache_kwargs(None, cache)).logits
            assert cache.method.tsp_layer == 14 and out.shape[1] == 50
            assert {layer.attended_length() for layer in cache.layers} == {50}
            nxt = model(out[:, -1:].argmax(-1), **cache_kwargs(None, cache)).logits
    kl = torch.nn.functional.kl_div(out[:, -1].log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
    assert kl < 0.5 and out[:, -1].argmax() == ref.argmax()
    assert torch.isfinite(nxt).all()


# --------------------------------------------------------------------------------------------------------------------
# Calibration of tsp_layer
# --------------------------------------------------------------------------------------------------------------------


def test_choose_layer_rule():
    from kvcompress.calibration.fastkv import choose_layer

    scores = [{"layer": i, "similarity": s} for i, s in enumerate([0.7, 0.9, 0.96, 0.95, 0.99])]
    assert choose_layer(scores, 0.95) == 2  # earliest at or above the threshold
    assert choose_layer(scores, 0.999) == 4  # none reaches it: the most similar


def test_calibrate_scores_every_allowed_layer(tiny_model):
    from kvcompress.calibration.fastkv import calibrate, choose_layer

    windows = _ids(1, 48, seed=4)
    result = calibrate(tiny_model, windows, tsp_rate=0.25, threshold=0.9)
    assert [s["layer"] for s in result["layers"]] == [0, 1, 2]
    assert result["tsp_layer"] == choose_layer(result["layers"], 0.9)
    for s in result["layers"]:
        assert -1 <= s["similarity"] <= 1 + 1e-6 and s["last_token_kl"] >= -1e-6
    assert [s["prefill_fraction"] for s in result["layers"]] == sorted(s["prefill_fraction"] for s in result["layers"])
    # tsp_rate 1 propagates everything: the TSP run is the full run
    same = calibrate(tiny_model, windows, tsp_rate=1.0, layers=[1])
    assert same["layers"][0]["similarity"] == pytest.approx(1.0, abs=1e-5) and same["tsp_layer"] == 1
    with pytest.raises(KVCompressError, match="candidate layers"):
        calibrate(tiny_model, windows, layers=[3])
    with pytest.raises(KVCompressError, match="tsp_rate"):
        calibrate(tiny_model, windows, tsp_rate=0.0)


def test_calibrate_cli_is_registered():
    from kvcompress.cli import build_parser

    args = build_parser().parse_args(["calibrate", "fastkv", "--tsp-rate", "0.3", "--layers", "4", "6"])
    assert args.tsp_rate == 0.3 and args.layers == [4, 6] and callable(args.func)


def test_another_caches_forward_during_the_prefill_leaves_it_alone(tiny_model):
    """A forward of another cache on the same model while a FastKV prefill is under way (another thread, as in
    ``kvcompress eval --jobs 2``; here nested, so it happens deterministically) must not reset FastKV's prefill
    state (it did: the first block's hook cleared it before checking whose forward it was)."""
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.5, budget=0.3) as alone:
        with torch.no_grad():
            want = tiny_model(input_ids=ids, **cache_kwargs(tiny_model, alone), use_cache=True).logits
    fired = []

    def other_forward(module, args, kwargs):
        if not fired:
            fired.append(1)
            with make_cache("full", tiny_model) as other, torch.no_grad():
                tiny_model(input_ids=ids[:, :5], **cache_kwargs(tiny_model, other), use_cache=True)

    handle = decoder_layers(tiny_model)[1].register_forward_pre_hook(other_forward, with_kwargs=True)
    try:
        with make_cache("fastkv", tiny_model, tsp_layer=1, tsp_rate=0.5, budget=0.3) as cache, torch.no_grad():
            got = tiny_model(input_ids=ids, **cache_kwargs(tiny_model, cache), use_cache=True).logits
    finally:
        handle.remove()
    assert fired and torch.allclose(got, want, atol=1e-5)

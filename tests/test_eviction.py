"""Eviction primitives (kvcompress.eviction) and the StreamingLLM / H2O / SnapKV baselines."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress
from kvcompress import KVCompressError, make_cache
from kvcompress.cache import ModelGeometry
from kvcompress.eviction import EvictionLayer, pool_scores, received_attention, topk_keep, window_scores
from kvcompress.registry import list_methods
from kvcompress.storage import FP16Store
from kvcompress.compat import cache_kwargs

D = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def geometry(heads=4, kv_heads=2, head_dim=D, layers=1):
    return ModelGeometry(
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        layer_types=("full_attention",) * layers, sliding_window=None, max_positions=None,
        model_id="unit", dtype=torch.float32,
    )


def tagged_kv(b, h, start, n, d=D):
    """K/V whose channel 0 is the token's logical position (exact in fp16 up to 2048)."""
    k = torch.randn(b, h, n, d) * 0.1
    k[..., 0] = torch.arange(start, start + n, dtype=torch.float32)
    return k, k.clone()


def step(layer, k, v, query=None, padding=None):
    """One forward of a self-attending layer: update() then attend(); ``query (b, heads, q, d)`` (random if None).
    Returns the attention output ``(b, q, heads, d)``."""
    if query is None:
        query = torch.randn(k.shape[0], 2 * k.shape[1], k.shape[2], k.shape[3])
    keys, values = layer.update(k, v)
    return layer.attend(query, keys, values, padding, k.shape[-1] ** -0.5)


def kept_positions(layer):
    k, _ = layer.stored_kv()
    return k[..., 0].round().long()  # (b, h, kept)


class FakeObserver:
    """Stands in for kvcompress.observe.Observer: hands the layer the queries of the current step."""

    def __init__(self, d=D):
        self.query = None
        self.d = d

    def query_states(self, layer_idx, last=None):
        return self.query if last is None else self.query[:, :, -last:]

    def scaling(self, layer_idx):
        return self.d**-0.5


class FakeMethod:
    def __init__(self):
        self.observer = FakeObserver()


def brute_probs(query, keys, scaling):
    """(b, heads, q, k) causal softmax with keys repeated per query head (independent of grouped_probs)."""
    g = query.shape[1] // keys.shape[1]
    kr = keys.repeat_interleave(g, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", query.double(), kr.double()) * scaling
    q, k = query.shape[2], keys.shape[2]
    mask = torch.arange(k)[None, :] > (torch.arange(q)[:, None] + k - q)
    return torch.softmax(s.masked_fill(mask, -math.inf), dim=-1)


# ------------------------------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------------------------------


def test_keep_really_drops_and_follows_tokens():
    layer = EvictionLayer(geometry(), 0, track_positions=True)
    k, v = tagged_kv(2, 2, 0, 10)
    layer.update(k, v)
    layer.token_state["s"] = torch.arange(10, dtype=torch.float32).expand(2, 2, 10).clone()
    idx = torch.tensor([[[7, 1, 3], [0, 9, 8]], [[2, 4, 6], [5, 3, 1]]])
    layer.keep(idx)
    want = idx.sort(-1).values
    assert torch.equal(kept_positions(layer), want)
    assert torch.equal(layer.positions.long(), want)
    assert torch.equal(layer.token_state["s"].long(), want)
    assert layer.attended_length() == 3 and layer.k.shape == (2, 2, 3, D) and layer.k.dtype == torch.float16
    # held bytes: K+V fp16, positions int32, one fp32 state
    assert layer.nbytes() == 2 * 2 * 3 * (D * 2 * 2 + 4 + 4)
    # appending extends positions and zero-fills the per-token state
    layer.update(*tagged_kv(2, 2, 10, 1))
    assert layer.positions[..., -1].eq(10).all() and layer.token_state["s"][..., -1].eq(0).all()
    with pytest.raises(KVCompressError):
        layer.keep(torch.zeros(2, 3, dtype=torch.long))


def test_commit_moves_tokens_to_storage():
    g = geometry()
    layer = EvictionLayer(g, 0, storage=FP16Store(g))
    layer.update(*tagged_kv(1, 2, 0, 6))
    layer.keep(torch.tensor([0, 4, 5]))
    layer.commit()
    assert layer.k is None and layer.attended_length() == 3
    keys, _ = layer.update(*tagged_kv(1, 2, 6, 2))
    assert keys[0, 0, :, 0].round().tolist() == [0, 4, 5, 6, 7]
    assert layer.nbytes() == 1 * 2 * 5 * D * 2 * 2
    with pytest.raises(KVCompressError):
        layer.keep(torch.tensor([0]))


def test_topk_keep_hand_case():
    s = torch.tensor([[[5.0, 1.0, 4.0, 0.0, 3.0, 0.0, 0.0]]])
    assert topk_keep(s, 4, always_keep_last=2).tolist() == [[[0, 2, 5, 6]]]
    assert topk_keep(s, 3, always_keep_last=0).tolist() == [[[0, 2, 4]]]
    assert topk_keep(s, 2, always_keep_last=3).tolist() == [[[5, 6]]]  # window larger than the budget
    assert topk_keep(s, 9).tolist() == [[list(range(7))]]


def test_pool_scores_hand_case():
    s = torch.tensor([[[0.0, 0.0, 6.0, 0.0, 0.0, 0.0]]])
    assert torch.allclose(pool_scores(s, "avg", 3), torch.tensor([[[0.0, 2.0, 2.0, 2.0, 0.0, 0.0]]]))
    assert torch.equal(pool_scores(s, "max", 3), torch.tensor([[[0.0, 6.0, 6.0, 6.0, 0.0, 0.0]]]))
    assert torch.equal(pool_scores(s, "none", 3), s)


def test_received_attention_matches_brute_force():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, D), torch.randn(2, 2, 12, D)
    got = received_attention(q, k, 0.3, chunk=2)
    want = brute_probs(q, k, 0.3).view(2, 2, 2, 5, 12).sum(dim=(2, 3))
    assert torch.allclose(got.double(), want, atol=1e-5)
    # window_scores = the same, avg-pooled over the tokens before the window only
    ws = window_scores(q, k, 0.3, "avg", 3)
    assert torch.allclose(ws[..., -5:], got[..., -5:])
    assert torch.allclose(ws[..., :7], pool_scores(got[..., :7], "avg", 3))


# ------------------------------------------------------------------------------------------------------------------
# selection rules on hand-built cases
# ------------------------------------------------------------------------------------------------------------------


def test_streaming_keeps_sinks_and_last_window():
    from kvcompress.methods.streaming import StreamingLLM, StreamingLayer

    cfg = StreamingLLM.Config(sink=3, window=5)
    layer = StreamingLayer(geometry(), 0, cfg)
    step(layer, *tagged_kv(2, 2, 0, 20))
    assert kept_positions(layer)[1, 1].tolist() == [0, 1, 2, 15, 16, 17, 18, 19]
    for t in range(20, 23):
        step(layer, *tagged_kv(2, 2, t, 1))
    assert kept_positions(layer).eq(torch.tensor([0, 1, 2, 18, 19, 20, 21, 22])).all()
    assert layer.nbytes() == 2 * 2 * 8 * D * 2 * 2 and layer.get_seq_length() == 23
    # a budget sizes the window: 0.4 of 20 = 8 tokens = 3 sinks + 5 recent
    assert StreamingLLM.Config(sink=3, budget=0.4).sizes(20) == (3, 5)
    assert StreamingLLM.Config(sink=3, budget=6).sizes(20) == (3, 3)


def test_snapkv_keeps_what_the_window_attends_to():
    """KV head 0: only its first query head looks at token 3; KV head 1: its second query head at tokens 5 and 9."""
    from kvcompress.methods.snapkv import SnapKV, SnapKVLayer

    torch.manual_seed(1)
    n, w = 16, 4
    keys = torch.randn(1, 2, n, D) * 0.01
    keys[0, 0, 3] = torch.eye(D)[1] * 4
    keys[0, 1, 5] = torch.eye(D)[2] * 4
    keys[0, 1, 9] = torch.eye(D)[2] * 4
    query = torch.zeros(1, 4, n, D)
    query[0, 0, -w:, 1] = 4.0  # query head 0 belongs to KV head 0
    query[0, 3, -w:, 2] = 4.0  # query head 3 belongs to KV head 1
    cfg = SnapKV.Config(budget=w + 2, window=w, pool="none")
    layer = SnapKVLayer(geometry(), 0, cfg, FakeMethod())
    values = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, D)  # tags the tokens
    out = step(layer, keys, values, query)
    assert out.shape == (1, n, 4, D)
    ids = layer.stored_kv()[1][0, :, :, 0].round().long()
    assert ids[1].tolist() == [5, 9, 12, 13, 14, 15]
    assert ids[0, 0] == 3 and ids[0, 2:].tolist() == [12, 13, 14, 15]
    # decoding appends without eviction
    step(layer, torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
    assert layer.attended_length() == 7


def reference_h2o(queries, keys_steps, heavy, recent, group):
    """Plain-loop H2O for one batch row: per KV head a list of [token id, key, score]."""
    heads = keys_steps[0].shape[0]
    kept = [[] for _ in range(heads)]
    for query, new_keys in zip(queries, keys_steps):  # query (heads*group, q, d), new_keys (heads, q, d)
        q = new_keys.shape[1]
        for h in range(heads):
            base = len(kept[h])
            start_id = (kept[h][-1][0] + 1) if kept[h] else 0
            kept[h] += [[start_id + i, new_keys[h, i].half().double(), 0.0] for i in range(q)]
            ks = torch.stack([e[1] for e in kept[h]])
            for gi in range(group):
                for qi in range(q):
                    visible = base + qi + 1
                    logits = ks[:visible] @ query[h * group + gi, qi].double() * D**-0.5
                    p = torch.softmax(logits, 0)
                    for j in range(visible):
                        kept[h][j][2] += float(p[j])
            if len(kept[h]) > heavy + recent:
                old = kept[h][: len(kept[h]) - recent]
                top = sorted(sorted(old, key=lambda e: -e[2])[:heavy], key=lambda e: e[0])
                kept[h] = top + kept[h][len(kept[h]) - recent :]
    return kept


def test_h2o_scores_follow_tokens_through_evictions():
    from kvcompress.methods.h2o import H2O, H2OLayer

    torch.manual_seed(2)
    method = FakeMethod()
    layer = H2OLayer(geometry(), 0, H2O.Config(heavy=3, recent=2), method)
    steps = [10, 1, 1, 1, 3, 1]
    queries, keys_steps, t = [], [], 0
    for q in steps:
        k, v = tagged_kv(1, 2, t, q)
        query = torch.randn(1, 4, q, D)
        step(layer, k, v, query)
        queries.append(query[0])
        keys_steps.append(k[0])
        t += q
    ref = reference_h2o(queries, keys_steps, heavy=3, recent=2, group=2)
    for h in range(2):
        assert kept_positions(layer)[0, h].tolist() == [e[0] for e in ref[h]]
        assert torch.allclose(layer.token_state["score"][0, h].double(), torch.tensor([e[2] for e in ref[h]], dtype=torch.float64), atol=1e-4)
    assert layer.nbytes() == 2 * 5 * (D * 2 * 2 + 4)  # K, V fp16 + one fp32 score per kept token and head


# ------------------------------------------------------------------------------------------------------------------
# on the tiny models
# ------------------------------------------------------------------------------------------------------------------


def teacher_forced_logits(model, cache, ids, prompt_len, chunk=1):
    """Prefill ``prompt_len`` tokens, then feed the rest ``chunk`` tokens at a time; logits of every fed step."""
    with torch.no_grad():
        out = [model(ids[:, :prompt_len], **cache_kwargs(None, cache), use_cache=True).logits[:, -1:]]
        for s in range(prompt_len, ids.shape[1] - 1, chunk):
            out.append(model(ids[:, s : min(s + chunk, ids.shape[1] - 1)], **cache_kwargs(None, cache)).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_noop_budget_reproduces_full_cache(tiny_model, name):
    ids = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(3))
    with make_cache("full", tiny_model) as full:
        want = teacher_forced_logits(tiny_model, full, ids, 40)
    with make_cache(name, tiny_model, **list_methods()[name].noop_options) as cache:
        got = teacher_forced_logits(tiny_model, cache, ids, 40)
        assert cache.nbytes() == full.nbytes() + (2 * 2 * 59 * 4 * 4 if name == "h2o" else 0)  # + H2O scores
    # these layers attend by themselves (chunked fp32 online softmax) where the full cache uses transformers' sdpa:
    # the same sums in another order, ~3e-6 apart on these logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_eviction_changes_output_and_shrinks(tiny_model, name):
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    with make_cache("full", tiny_model) as full:
        want = teacher_forced_logits(tiny_model, full, ids, 80)
    with make_cache(name, tiny_model, **list_methods()[name].test_options) as cache:
        got = teacher_forced_logits(tiny_model, cache, ids, 80)
        assert cache.nbytes() < full.nbytes() / 2
        assert len({layer.attended_length() for layer in cache.layers}) == 1
        assert cache.get_seq_length() == 99
    assert not torch.allclose(got, want, atol=1e-3)


def test_multi_token_step_after_eviction_matches_single_steps(tiny_model):
    """After eviction the mask offset (seen - kept) keeps a multi-token step causal."""
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(5))
    res = []
    for chunk in (1, 7):
        with make_cache("snapkv", tiny_model, budget=0.3, window=8) as cache:
            res.append(teacher_forced_logits(tiny_model, cache, ids, 50, chunk=chunk))
    torch.testing.assert_close(res[0], res[1], rtol=1e-4, atol=1e-4)


def test_batch_rows_select_independently(tiny_model):
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(6))
    for name in ("snapkv", "h2o"):
        opts = list_methods()[name].test_options
        with make_cache(name, tiny_model, **opts) as both, torch.no_grad():
            tiny_model(ids, **cache_kwargs(None, both))
        for row in (0, 1):
            with make_cache(name, tiny_model, **opts) as one, torch.no_grad():
                tiny_model(ids[row : row + 1], **cache_kwargs(None, one))
            for lb, lo in zip(both.layers, one.layers):
                torch.testing.assert_close(lb.stored_kv()[0][row], lo.stored_kv()[0][0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_generate_tiny_llama_and_gemma_batch2(tiny_model, tiny_gemma, name):
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(7))
    for model in (tiny_model, tiny_gemma):
        with make_cache(name, model, **list_methods()[name].test_options) as cache:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(None, cache),
                                 max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 54)
        report = cache.memory_report()
        assert report.stored_bytes < report.reference_bytes
        g = cache.geometry
        for i, layer in enumerate(cache.layers):
            if g.is_sliding(i):  # Gemma-3 sliding layers stay the plain window
                assert type(layer).__name__ == "SlidingWindowLayer"
            else:
                assert layer.nbytes() >= 2 * layer.attended_length() * g.num_kv_heads * g.head_dim * 2 * 2


def test_snapkv_composes_with_storage(tiny_model):
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(8))
    with make_cache("snapkv", tiny_model, budget=0.5, window=8, storage="fp16") as fp16:
        a = teacher_forced_logits(tiny_model, fp16, ids, 64)
    with make_cache("snapkv", tiny_model, budget=0.5, window=8) as default:
        b = teacher_forced_logits(tiny_model, default, ids, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fp16.nbytes() == 4 * 1 * 2 * (32 + 15) * 16 * 2 * 2
    from kvcompress.storage import _STORAGES

    if "kivi" not in _STORAGES:
        pytest.skip("kivi store not registered yet")
    with make_cache("snapkv", tiny_model, budget=0.5, window=8, storage="kivi", bits=2, group_size=8, residual=8) as kivi:
        c = teacher_forced_logits(tiny_model, kivi, ids, 64)
        assert kivi.layers[0].attended_length() == 47
    assert kivi.nbytes() < fp16.nbytes()
    assert torch.isfinite(c).all()


def test_h2o_budget_splits_heavy_and_recent():
    from kvcompress.methods.h2o import H2O

    assert H2O.Config(budget=0.2).sizes(1000) == (100, 100)
    assert H2O.Config(budget=51).sizes(1000) == (25, 26)
    assert H2O.Config(heavy=0.3, recent=0.1).sizes(1000) == (300, 100)


@pytest.mark.parametrize(
    "name, opts",
    [
        ("streaming", {"budget": 0.0}),
        ("streaming", {"budget": 1.5}),
        ("streaming", {"budget": 4}),  # not more than the 4 sinks
        ("streaming", {"window": 10, "budget": 0.2}),
        ("streaming", {"window": 0}),
        ("streaming", {"sink": -1}),
        ("h2o", {"heavy": 0}),
        ("h2o", {"recent": -0.1}),
        ("h2o", {"heavy": True}),
        ("h2o", {"budget": 1.5}),
        ("snapkv", {"budget": "half"}),
        ("snapkv", {"window": 0}),
        ("snapkv", {"kernel": 4}),
        ("snapkv", {"pool": "median"}),
        ("snapkv", {"storage": "nope"}),
        ("snapkv", {"storage": "fp16", "bits": 2}),
        ("snapkv", {"ratio": 0.2}),
    ],
)
def test_bad_options(tiny_model, name, opts):
    with pytest.raises(KVCompressError):
        make_cache(name, tiny_model, **opts)


# ------------------------------------------------------------------------------------------------------------------
# real model
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.model
def test_smollm2_generate(smollm2, prose):
    """Half the prompt kept: generation runs, memory halves, next-token choices mostly agree with the full cache."""
    model, tok = smollm2
    ids = tok(prose[:3000], return_tensors="pt").input_ids[:, :137]
    with make_cache("full", model) as full:
        want = teacher_forced_logits(model, full, ids, 128)
    for name, opts in [("snapkv", {"budget": 0.5}), ("h2o", {"heavy": 0.25, "recent": 0.25}),
                       ("streaming", {"budget": 0.5})]:
        with make_cache(name, model, **opts) as cache:
            got = teacher_forced_logits(model, cache, ids, 128)
            kept = cache.layers[0].attended_length()
            assert kept == (64 + 8 if name == "snapkv" else 64), (name, kept)  # snapkv appends decoded tokens
            assert cache.memory_report().ratio > 1.7, name
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree > 0.5, (name, agree)
    with make_cache("snapkv", model, budget=0.5) as cache:
        out = model.generate(ids[:, :128], attention_mask=torch.ones_like(ids[:, :128]), **cache_kwargs(None, cache),
                             max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 132)

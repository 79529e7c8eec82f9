"""The one attention path (kvcompress.attention): exact merging over parts, padding, two caches at once, and forwards
without a kvcompress cache left to the model's own attention."""

from __future__ import annotations

import threading
from unittest import mock

import pytest

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvcompress import KVCompressError, make_cache
from kvcompress.attention import KVPart, attend_parts
from kvcompress.attention.interface import inner_of, uninstall
from kvcompress.compat import cache_kwargs


def dense_reference(query, keys, values, valid, q_new, scaling):
    """fp64 softmax attention of ``query (b, H, q, d)`` over ``keys/values (b, kv, n, d)``; the last ``q_new`` keys are
    the causal new tokens; ``valid (b, kv, n)``."""
    b, heads, q, d = query.shape
    kv, n = keys.shape[1], keys.shape[2]
    g = heads // kv
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", query.double(), k) * scaling
    cols = torch.arange(n)
    allowed = (cols[None, :] < n - q_new) | (cols[None, :] - (n - q_new) <= torch.arange(q)[:, None])
    mask = allowed[None, None] & valid.repeat_interleave(g, dim=1)[:, :, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, v).transpose(1, 2), p


@settings(max_examples=40, deadline=None)
@given(
    past=st.lists(st.integers(0, 23), min_size=0, max_size=3),
    q=st.integers(1, 6),
    group=st.sampled_from([1, 2, 3]),
    chunk=st.integers(1, 9),
    pad=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_parts_merge_exactly(past, q, group, chunk, pad, seed):
    """Any split of the past into parts, any chunk size, padding and GQA: the same as one dense softmax."""
    gen = torch.Generator().manual_seed(seed)
    b, kv, d = 2, 2, 8
    lengths = [*past, q]
    n = sum(lengths)
    keys, values = torch.randn(b, kv, n, d, generator=gen), torch.randn(b, kv, n, d, generator=gen)
    valid = torch.ones(b, kv, n, dtype=torch.bool)
    valid[1, :, : min(pad, n)] = False  # row 1 starts with padding
    query = torch.randn(b, kv * group, q, d, generator=gen)
    parts, start = [], 0
    for i, length in enumerate(lengths):
        sl = slice(start, start + length)
        part = KVPart.dense(keys[:, :, sl], values[:, :, sl], valid[:, :, sl], causal=i == len(lengths) - 1)
        part.chunk_tokens = chunk
        parts.append(part)
        start += length
    res = attend_parts(query, parts, d**-0.5, probs_last=q)
    want, probs = dense_reference(query, keys, values, valid, q, d**-0.5)
    torch.testing.assert_close(res.output.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.probs.double(), probs.view(b, kv, group, q, n), rtol=0, atol=1e-6)
    assert res.transient_bytes <= 2 * b * kv * max(min(chunk, max(lengths)), 1) * d * 4


@settings(max_examples=30, deadline=None)
@given(
    past=st.lists(st.integers(0, 23), min_size=0, max_size=3),
    group=st.sampled_from([1, 2, 3]),
    pad=st.integers(0, 30),
    per_head=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_one_query_fast_path_equals_the_dense_softmax(past, group, pad, per_head, seed):
    """A decode step (one query, no probabilities asked) over a short past takes the one-softmax path: the same as a
    dense softmax, with padding (a row whose keys are all padding but its own new token) and per-head validity."""
    gen = torch.Generator().manual_seed(seed)
    b, kv, d = 2, 2, 8
    lengths = [*past, 1]
    n = sum(lengths)
    keys, values = torch.randn(b, kv, n, d, generator=gen), torch.randn(b, kv, n, d, generator=gen)
    valid = torch.ones(b, kv, n, dtype=torch.bool)
    valid[1, :, : min(pad, n - 1)] = False
    if per_head:
        valid[0, 1, : (n - 1) // 2] = False  # one KV head of row 0 holds fewer tokens (FastGen's ragged past)
    query = torch.randn(b, kv * group, 1, d, generator=gen)
    parts, start = [], 0
    for i, length in enumerate(lengths):
        sl = slice(start, start + length)
        parts.append(KVPart.dense(keys[:, :, sl], values[:, :, sl], valid[:, :, sl], causal=i == len(lengths) - 1))
        start += length
    res = attend_parts(query, parts, d**-0.5)
    want, _ = dense_reference(query, keys, values, valid, 1, d**-0.5)
    torch.testing.assert_close(res.output.double(), want, rtol=0, atol=1e-5)
    assert res.transient_bytes == 2 * b * kv * n * d * 4  # every part read whole: the one-softmax path was taken


@settings(max_examples=40, deadline=None)
@given(
    q=st.integers(2, 40),
    group=st.sampled_from([1, 2, 3]),
    pad=st.integers(0, 45),
    window=st.sampled_from([None, 1, 3, 8, 64]),
    probs_last=st.integers(0, 6),
    seed=st.integers(0, 1000),
)
def test_prompt_path_equals_the_online_softmax(q, group, pad, window, probs_last, seed):
    """A step whose only keys are its own tokens (a prefill) takes one sdpa call: the same output and probabilities as
    the chunked online softmax (forced here by an empty past part), with left padding (rows that see nothing get 0),
    GQA and sliding windows (mask ``key > query - size``)."""
    gen = torch.Generator().manual_seed(seed)
    b, kv, d = 2, 2, 8
    keys, values = torch.randn(b, kv, q, d, generator=gen), torch.randn(b, kv, q, d, generator=gen)
    valid = torch.ones(b, 1, q, dtype=torch.bool)
    valid[1, :, : min(pad, q)] = False
    query = torch.randn(b, kv * group, q, d, generator=gen)
    probs_last = min(probs_last, q)
    win = None if window is None else (window, 0, 0)
    new = KVPart.dense(keys, values, valid, causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", wraps=sdpa) as spy:
        got = attend_parts(query, [new], d**-0.5, probs_last=probs_last, window=win)
    assert spy.call_count == 1  # the prompt path was taken
    empty = KVPart.dense(keys[:, :, :0], values[:, :, :0])
    want = attend_parts(query, [empty, new], d**-0.5, probs_last=probs_last, window=win)
    torch.testing.assert_close(got.output, want.output, rtol=0, atol=1e-5)
    assert not got.output.isnan().any()
    if probs_last:
        torch.testing.assert_close(got.probs, want.probs.nan_to_num(0.0), rtol=0, atol=1e-6)
    assert got.transient_bytes == 2 * b * kv * q * d * 4  # the new tokens read once, no chunks


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _generate(model, method, options, ids, mask, new=10):
    cache = make_cache(method, model, **options)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


#: methods whose padded rows are claimed exact, with integer budgets (the same token count for every row)
PADDING_EXACT = {
    "full": {},
    "streaming": {"sink": 2, "budget": 24},
    "h2o": {"heavy": 12, "recent": 12},
    "snapkv": {"budget": 24, "window": 4},
    "fastkv": {"tsp_layer": 1, "tsp_rate": 30, "budget": 20, "window": 4},
    "kivi": {"bits": 2, "group_size": 4, "residual": 8},
    "logquant": {"window": 4},
    "kvquant": {"nuq": False, "bits": 4, "sink": 2},
    "minicache": {"start_layer": 1},
    "fastgen": {"recovery": 0.6, "special_ids": (0,), "punct_ids": (1, 2, 3)},
}


@pytest.mark.parametrize("which", ["tiny_model", "tiny_gemma"])
@pytest.mark.parametrize("method", sorted(PADDING_EXACT))
def test_a_left_padded_row_generates_what_it_generates_alone(request, method, which):
    """On the tiny llama and on the tiny Gemma-3 (MQA, 16-token sliding windows: the 50-token row crosses them)."""
    model = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(11)
    long_row, short_row = torch.randint(1, 128, (50,), generator=gen), torch.randint(1, 128, (31,), generator=gen)
    ids, mask = _left_pad([long_row, short_row])
    try:
        both = _generate(model, method, PADDING_EXACT[method], ids, mask)
    except KVCompressError as exc:  # a method that cannot serve this model says so (fastkv: no full layer early)
        pytest.skip(f"{method} refuses {which}: {exc}")
    for i, row in enumerate([long_row, short_row]):
        alone = _generate(model, method, PADDING_EXACT[method], row[None], torch.ones(1, len(row), dtype=torch.long))
        assert both[i].tolist() == alone[0].tolist(), (method, i)


def _logits(model, method, options, ids, mask, steps=4):
    """Prefill ``ids`` then teacher-force ``steps`` more tokens; the logits of every step's last position."""
    cache = make_cache(method, model, **options)
    out = []
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache)).logits[:, -1]
        out.append(logits)
        for t in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            nxt = torch.full((ids.shape[0], 1), 5 + 7 * t)
            out.append(model(nxt, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(out, dim=1)  # (b, steps + 1, vocab)


#: methods whose choices do not rank scores: on the tiny random model attention is nearly uniform, so the scores of
#: h2o, snapkv and fastkv tie to ~1e-7 and summation order alone may flip which token is kept (their kept tokens
#: are checked through the generated tokens above and on SmolLM2)
LOGITS_EXACT = sorted(set(PADDING_EXACT) - {"h2o", "snapkv", "fastkv"})


@pytest.mark.parametrize("method", LOGITS_EXACT)
def test_a_left_padded_row_has_the_logits_it_has_alone(tiny_model, method):
    """Finer than the generated tokens: every step's logits of a padded row equal that row's alone, up to float
    summation order (atol 1e-4 on logits of size ~1). Pads never enter quantization statistics, retention ranges,
    the sink or positions."""
    gen = torch.Generator().manual_seed(5)
    long_row, short_row = torch.randint(1, 128, (48,), generator=gen), torch.randint(1, 128, (29,), generator=gen)
    ids, mask = _left_pad([long_row, short_row])
    both = _logits(tiny_model, method, PADDING_EXACT[method], ids, mask)
    for i, row in enumerate([long_row, short_row]):
        alone = _logits(tiny_model, method, PADDING_EXACT[method], row[None], torch.ones(1, len(row), dtype=torch.long))
        torch.testing.assert_close(both[i], alone[0], rtol=0, atol=1e-4, msg=f"{method} row {i}")


def test_padding_is_never_attended(tiny_model):
    """Changing what the pad positions hold changes nothing for a self-attending layer."""
    gen = torch.Generator().manual_seed(12)
    ids, mask = _left_pad([torch.randint(1, 128, (30,), generator=gen), torch.randint(1, 128, (18,), generator=gen)])
    other = ids.clone()
    other[1, :12] = 77
    a = _generate(tiny_model, "kivi", {"bits": 4, "group_size": 4, "residual": 8}, ids, mask)
    b = _generate(tiny_model, "kivi", {"bits": 4, "group_size": 4, "residual": 8}, other, mask)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("pair,which", [(("kivi", "snapkv"), "tiny_model"), (("fastgen", "fastgen"), "tiny_model"),
                                        (("kvquant", "minicache"), "tiny_model"), (("kivi", "kvquant"), "tiny_gemma"),
                                        (("kvquant", "kvquant"), "tiny_model"), (("fastkv", "kvquant"), "tiny_model")])
def test_two_caches_from_two_threads_generate_what_they_generate_alone(request, pair, which):
    tiny_model = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(13)
    jobs = {f"{m}-{i}": m for i, m in enumerate(pair)}
    prompts = {j: torch.randint(1, 128, (1, 40), generator=gen) for j in jobs}
    options = {**PADDING_EXACT, "kivi": {"bits": 2, "group_size": 8, "residual": 16}, "snapkv": {"budget": 16, "window": 4}}
    ones = {k: torch.ones_like(v) for k, v in prompts.items()}
    alone = {j: _generate(tiny_model, m, options[m], prompts[j], ones[j], new=16) for j, m in jobs.items()}
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def work(j):
        try:
            barrier.wait()
            for _ in range(3):
                got[j] = _generate(tiny_model, jobs[j], options[jobs[j]], prompts[j], ones[j], new=16)
                assert got[j].tolist() == alone[j].tolist()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {m: got[m].tolist() for m in got} == {m: alone[m].tolist() for m in alone}


def test_a_forward_without_our_cache_is_untouched(tiny_model):
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        before = tiny_model(ids, **cache_kwargs(tiny_model, DynamicCache())).logits
        make_cache("kivi", tiny_model)  # installs kvcompress attention on the model
        assert tiny_model.config._attn_implementation == "kvcompress_" + inner_of(tiny_model)
        after = tiny_model(ids, **cache_kwargs(tiny_model, DynamicCache())).logits
        plain = tiny_model(ids).logits
    assert torch.equal(before, after) and torch.equal(before, plain)


def test_attention_that_bypasses_the_layer_is_one_clear_error():
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=5, layers=2)  # a private model: the switch below must not touch the shared one
    cache = make_cache("kivi", model)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 12)), **cache_kwargs(model, cache))
        uninstall(model)
        model(torch.tensor([[3]]), **cache_kwargs(model, cache))  # attended by sdpa over the new token only
        with pytest.raises(KVCompressError, match="did not go through kvcompress"):
            model(torch.tensor([[4]]), **cache_kwargs(model, cache))


BOUNDED_TRANSIENT = {  # methods whose quantized past is read a chunk at a time
    "kivi": {"bits": 4, "group_size": 8, "residual": 8},
    "kvquant": {"nuq": False, "bits": 4, "sink": 2},
    "logquant": {"window": 8},
}


@pytest.mark.parametrize("method", sorted(BOUNDED_TRANSIENT))
def test_a_self_attending_layer_bounds_its_transient(tiny_model, monkeypatch, method):
    """The quantized past is read chunk by chunk: the transient stays at the chunk size (here 16 tokens; the
    full-precision parts are bounded too: LogQuant's <= 3W + 1 tokens) while the context grows to 128 tokens."""
    import kvcompress.attention as attention
    import kvcompress.attention.parts as parts
    from kvcompress import kernels

    monkeypatch.setattr(parts, "CHUNK", 16)
    monkeypatch.setattr(attention, "CHUNK", 16)
    cache = make_cache(method, tiny_model, **BOUNDED_TRANSIENT[method])
    with torch.no_grad(), kernels.fused(False):
        tiny_model(torch.randint(1, 128, (1, 8)), **cache_kwargs(tiny_model, cache))
        for t in range(120):
            tiny_model(torch.tensor([[1 + t % 100]]), **cache_kwargs(tiny_model, cache))
    g = cache.geometry
    bound = 2 * 1 * g.num_kv_heads * 32 * g.head_dim * 4  # K and V of 32 tokens in fp32 (a context of 128)
    assert 0 < cache.memory_report().peak_transient_bytes <= bound


def test_memory_report_says_quantizing_layers_read_chunk_by_chunk(tiny_model):
    """KVQuant and LogQuant hold their codes themselves: once they hold some, memory_report() says "fused-numba"
    while the kernel applies, "chunked" with it switched off (LogQuant's per-token keys too)."""
    from kvcompress import kernels

    for method, options, fused in (("kvquant", BOUNDED_TRANSIENT["kvquant"], "fused-numba"),
                                   ("logquant", BOUNDED_TRANSIENT["logquant"], "fused-numba"),
                                   ("logquant", dict(BOUNDED_TRANSIENT["logquant"], key_axis="token"), "fused-numba")):
        for on in (True, False):
            with kernels.fused(on), make_cache(method, tiny_model, **options) as cache, torch.no_grad():
                tiny_model(torch.randint(1, 128, (1, 40)), **cache_kwargs(tiny_model, cache))
                want = fused if on and kernels.AVAILABLE else "chunked"
                assert cache.memory_report().attention == {want: 4}, (method, options, on)


def partial_reference(keys, values, valid):
    """A stand-in fused kernel over dense tensors: ``fused(qg, valid) -> (acc, m, l)`` as KVPart documents."""

    def fused(qg, _valid):
        s = torch.matmul(qg, keys.float().transpose(-1, -2))
        if valid is not None:
            s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
        m = s.amax(dim=-1)
        safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - safe.unsqueeze(-1))
        return torch.matmul(p, values.float()), m, p.sum(dim=-1)

    return fused


def test_a_fused_part_merges_exactly():
    gen = torch.Generator().manual_seed(21)
    b, kv, d, q, group = 2, 2, 8, 3, 3
    keys, values = torch.randn(b, kv, 40, d, generator=gen), torch.randn(b, kv, 40, d, generator=gen)
    valid = torch.ones(b, kv, 40, dtype=torch.bool)
    valid[0, :, :7] = False
    query = torch.randn(b, kv * group, q, d, generator=gen)
    past = KVPart.dense(keys[:, :, :37], values[:, :, :37], valid[:, :, :37])
    past.read = None  # the fused kernel must be the only way in
    past.fused = partial_reference(keys[:, :, :37], values[:, :, :37], valid[:, :, :37])
    new = KVPart.dense(keys[:, :, 37:], values[:, :, 37:], valid[:, :, 37:], causal=True)
    got = attend_parts(query, [past, new], d**-0.5)
    want, _ = dense_reference(query, keys, values, valid, q, d**-0.5)
    torch.testing.assert_close(got.output.double(), want, rtol=0, atol=1e-5)


def test_token_runs_grow_without_copying_the_past():
    """Appending one token at a time: O(log n) runs, each token copied O(log n) times, nothing beyond what is held."""
    from kvcompress.storage import TokenRuns

    runs, copied = TokenRuns(), 0
    real_cat = torch.cat

    def counting_cat(tensors, dim=0):
        nonlocal copied
        copied += sum(t.shape[2] for t in tensors)
        return real_cat(tensors, dim=dim)

    torch.cat = counting_cat
    try:
        for t in range(1000):
            runs.append(torch.full((1, 1, 1, 2), float(t)))
    finally:
        torch.cat = real_cat
    lengths = [run[0].shape[2] for run in runs.runs]
    assert sum(lengths) == len(runs) == 1000 and lengths == sorted(lengths, reverse=True)
    assert len(lengths) == bin(1000).count("1")  # a binary counter: one run per set bit
    assert copied <= 1000 * 10  # log2(1000) < 10 copies per token; a cat onto the whole past per step: ~500k
    assert torch.equal(runs.joined()[0].flatten()[::2], torch.arange(1000, dtype=torch.float32))
    assert sum(t.numel() for t in runs.tensors()) == 1000 * 2  # no capacity slack


def test_fp16_storage_appends_without_copying_the_past(tiny_model):
    """SnapKV's decode appends go to its fp16 store: the big run from the prompt is never copied again."""
    cache = make_cache("snapkv", tiny_model, budget=64, window=4)
    with torch.no_grad():
        tiny_model(torch.randint(1, 128, (1, 200)), **cache_kwargs(tiny_model, cache))
        layer = cache.layers[0]
        prompt_run = layer.storage.kv.runs[0][0]
        for t in range(40):
            tiny_model(torch.tensor([[1 + t]]), **cache_kwargs(tiny_model, cache))
    assert len(layer.storage) == 64 + 40
    assert [run[0].shape[2] for run in layer.storage.kv.runs] == [64, 32, 8]  # 40 = 32 + 8: the newer runs
    assert layer.storage.kv.runs[0][0].data_ptr() == prompt_run.data_ptr()  # the prompt's run was never copied


#: SmolLM2 settings for the padded-batch check (the issue's scenario: two essay excerpts, the short one left-padded)
SMOLLM2_PADDING = {
    "full": {},
    "kivi": {"bits": 4},
    "logquant": {},
    "streaming": {"sink": 4, "budget": 200},
    "h2o": {"heavy": 100, "recent": 100},
    "snapkv": {"budget": 200},
    "fastkv": {"tsp_rate": 240, "budget": 200},
    "kvquant": {"nuq": False, "bits": 4},
    "minicache": {"select": "depth"},
    "fastgen": {},
}


@pytest.mark.model
@pytest.mark.parametrize("method", sorted(SMOLLM2_PADDING))
def test_smollm2_padded_rows_generate_what_they_generate_alone(smollm2, method):
    from pathlib import Path

    model, tok = smollm2
    essays = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "paul-graham-essays").glob("*.txt"))
    if essays:
        text = essays[0].read_text(encoding="utf-8")
    else:  # without ../shared: the built-in prose
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[0]
    long_row, short_row = ids[:500], ids[1000:1300]
    batch, mask = _left_pad([long_row, short_row], pad_id=tok.pad_token_id or 0)
    both = _generate(model, method, SMOLLM2_PADDING[method], batch, mask, new=16)
    for i, row in enumerate([long_row, short_row]):
        alone = _generate(model, method, SMOLLM2_PADDING[method], row[None], torch.ones(1, len(row), dtype=torch.long),
                          new=16)
        assert both[i].tolist() == alone[0].tolist(), (method, i)

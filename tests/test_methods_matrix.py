"""The same checks on every registered method (each declares ``test_options`` and ``noop_options``):
generate runs (tiny llama, tiny Gemma-3 with sliding window, batch 2, SmolLM2); compressing settings hold
fewer bytes than the fp16 reference, counted from the held tensors; no-op settings reproduce the full cache."""

from __future__ import annotations

import pytest
import torch

from kvcompress import KVCompressError, list_methods, make_cache
from kvcompress.compat import cache_kwargs

METHODS = list_methods()
COMPRESSING = [name for name in METHODS if name != "full"]
WITH_NOOP = [name for name, cls in METHODS.items() if cls.noop_options is not None]


def _prompt(batch=1, length=96, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _held(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.held_tensors() if t is not None)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("which,batch", [("tiny_model", 1), ("tiny_model", 2), ("tiny_gemma", 1)])
def test_generate_runs(request, name, which, batch):
    model = request.getfixturevalue(which)
    ids = _prompt(batch)
    try:
        cache = make_cache(name, model, **METHODS[name].test_options)
    except KVCompressError as exc:  # refusing an architecture is allowed, but only with a clear reason
        assert which == "tiny_gemma" and "sliding" in str(exc), exc
        pytest.skip(f"{name} refuses this model clearly: {exc}")
    with cache:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(None, cache),
            max_new_tokens=8,
            min_new_tokens=8,  # random tiny models may emit their EOS id
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape == (batch, ids.shape[1] + 8)
        assert cache.get_seq_length() == ids.shape[1] + 7  # the last generated token is never fed back
        assert cache.nbytes() >= _held(cache) > 0  # shared tensors (codebooks) may add to the per-layer ones


@pytest.mark.parametrize("name", COMPRESSING)
def test_compresses_for_real(tiny_model, name):
    ids = _prompt(1, 96)
    with make_cache(name, tiny_model, **METHODS[name].test_options) as cache:
        with torch.no_grad():
            tiny_model(ids, **cache_kwargs(None, cache))
            for t in range(4):
                tiny_model(torch.tensor([[7 + t]]), **cache_kwargs(None, cache))
        assert cache.nbytes() < cache.reference_nbytes(), cache.memory_report()
        for layer in cache.layers:  # transformers 5.2 passes the cache_position tensor where 5.3+ passes a length
            seen = layer.tokens_seen
            assert layer.get_mask_sizes(torch.arange(seen, seen + 3)) == layer.get_mask_sizes(3)
        report = cache.memory_report()
        assert report.stored_bytes == cache.nbytes()


@pytest.mark.parametrize("name", WITH_NOOP)
def test_noop_settings_reproduce_full_cache(tiny_model, name):
    ids = _prompt(1, 64, seed=4)
    steps = [torch.tensor([[11 + t]]) for t in range(4)]

    def run(method, options):
        logits = []
        with make_cache(method, tiny_model, **options) as cache, torch.no_grad():
            logits.append(tiny_model(ids, **cache_kwargs(None, cache)).logits[:, -1])
            for s in steps:
                logits.append(tiny_model(s, **cache_kwargs(None, cache)).logits[:, -1])
        return torch.stack(logits)

    torch.testing.assert_close(run(name, METHODS[name].noop_options), run("full", {}), atol=1e-3, rtol=1e-3)


@pytest.mark.model
@pytest.mark.parametrize("name", list(METHODS))
def test_generate_on_smollm2(smollm2, name):
    model, tok = smollm2
    inputs = tok(["Water boils at a temperature of"], return_tensors="pt")
    with make_cache(name, model, **METHODS[name].test_options) as cache:
        out = model.generate(**inputs, **cache_kwargs(None, cache), max_new_tokens=6, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 6
        if name != "full":
            assert cache.nbytes() <= cache.reference_nbytes()

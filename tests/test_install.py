"""What a new user meets on a fresh install (issue: a fresh install works and keeps working): the cache keyword of
the installed transformers, clear errors for the obscure failures, and any GGUF file by path."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress import KVCompressError, make_cache
from kvcompress.compat import cache_in, cache_keyword, cache_kwargs, uses_cache
from kvcompress.evaluate import ppl


def test_cache_is_read_under_either_name():
    c = object()
    assert cache_in({"cache": c}) is c and cache_in({"past_key_values": c}) is c
    assert uses_cache({"past_key_values": c}, c) and uses_cache({"cache": c}, c)
    assert not uses_cache({"cache": object()}, c) and not uses_cache({}, c) and not uses_cache({}, None)


def test_our_calls_use_the_installed_keyword_and_warn_nothing(tiny_model):
    """The evaluation protocol passes the cache under the name this transformers expects: no deprecation warning."""
    import inspect

    assert cache_keyword(tiny_model) in inspect.signature(type(tiny_model).forward).parameters
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            ppl.teacher_force(tiny_model, make_cache("snapkv", tiny_model, budget=16, window=4), ids, 30)
    ours = [w for w in caught if "past_key_values" in str(w.message) or "cache" in str(w.message).lower()]
    assert not ours, [str(w.message) for w in ours]


def test_evaluate_is_callable_more_than_once():
    """``kvcompress.evaluate`` used to be shadowed by its own subpackage after the first call."""
    for _ in range(2):
        with pytest.raises(KVCompressError, match="tokenizer"):
            kvcompress.evaluate(torch.nn.Linear(1, 1), ["full"])
    assert callable(kvcompress.evaluate) and kvcompress.evaluate.ppl is ppl


def test_make_cache_without_a_model_is_one_clear_error():
    with pytest.raises(KVCompressError, match="loaded transformers model"):
        make_cache("kivi", None)
    with pytest.raises(KVCompressError, match="loaded transformers model"):
        make_cache("kivi", "smollm2-135m")


@pytest.mark.parametrize("method", ["full", "kivi", "snapkv"])
def test_reusing_a_cache_for_another_batch_is_one_clear_error(tiny_model, method):
    cache = make_cache(method, tiny_model)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    tiny_model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(tiny_model, cache),
                        max_new_tokens=3, do_sample=False, pad_token_id=0)
    shapes = [(3, 24), (3, 40), (1, 8)]
    if cache_keyword(tiny_model) == "past_key_values":
        # transformers 5.2's generate slices a prompt shorter than the cached tokens to nothing and fails with its own
        # IndexError before the cache is called: only a longer prompt reaches our check there
        shapes = [(3, 40)]
    for shape in shapes:
        other = torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(2))
        with pytest.raises(KVCompressError, match="batch size changed|new cache"):
            tiny_model.generate(other, attention_mask=torch.ones_like(other), **cache_kwargs(tiny_model, cache),
                                max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_a_forward_with_no_new_token_is_one_clear_error(tiny_model):
    cache = make_cache("kivi", tiny_model)
    tiny_model(torch.randint(1, 128, (1, 10)), **cache_kwargs(tiny_model, cache))
    with pytest.raises(KVCompressError, match="no new one"):
        tiny_model(torch.zeros((1, 0), dtype=torch.long), **cache_kwargs(tiny_model, cache))


def test_missing_gguf_path_is_one_clear_error(tmp_path):
    with pytest.raises(KVCompressError, match="does not exist"):
        kvcompress.load_model(str(tmp_path / "nope.gguf"))


def test_a_conversion_is_read_back_only_by_the_transformers_that_wrote_it(tmp_path, monkeypatch):
    """transformers 5.2 saves SmolLM2's GGUF tokenizer as a CodeLlamaTokenizer that 5.24 reads as another tokenizer
    (other ids, no error): each version converts into its own directory, and a conversion of the old layout (files
    right in the model's directory) is removed once a new one is written."""
    import transformers

    import kvcompress.models as models

    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    made = []

    def fake_convert(gguf, name, target, progress):
        made.append((gguf, target))
        target.mkdir(parents=True)
        for f in ("config.json", "KVCOMPRESS_SOURCE"):
            (target / f).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    from dataclasses import replace

    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m",
                        replace(models.EMBEDDED["smollm2-135m"], locate_gguf=lambda: Path("model.gguf")))
    legacy = tmp_path / "models" / "smollm2-135m"
    legacy.mkdir(parents=True)
    for f in ("config.json", "KVCOMPRESS_SOURCE", "model.safetensors"):
        (legacy / f).write_text("old")
    first = models.resolve("smollm2-135m", progress=False)
    assert first == legacy / f"transformers-{transformers.__version__}" and len(made) == 1
    assert sorted(p.name for p in legacy.iterdir()) == [first.name]  # the old layout's files are gone
    assert models.resolve("smollm2-135m", progress=False) == first and len(made) == 1  # read back, not converted
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    other = models.resolve("smollm2-135m", progress=False)
    assert other == legacy / "transformers-9.9.9" and len(made) == 2 and (first / "config.json").exists()


@pytest.mark.model
def test_any_gguf_file_by_path_is_converted_once_and_cached(tmp_path, monkeypatch, smollm2):
    from kvcompress.models import _smollm2_gguf, gguf_cache_dir

    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    gguf = _smollm2_gguf()
    model, tok = kvcompress.load_model(str(gguf), progress=False)
    target = gguf_cache_dir(gguf)
    assert (target / "config.json").exists() and str(target).startswith(str(tmp_path))
    stamp = (target / "config.json").stat().st_mtime_ns
    again, _ = kvcompress.load_model(str(gguf), progress=False)  # from the cache: not converted again
    assert (target / "config.json").stat().st_mtime_ns == stamp
    ref, _ = smollm2
    ids = tok("The history of Rome", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, ref(ids).logits)

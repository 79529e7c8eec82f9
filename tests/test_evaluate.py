"""The evaluation harness: the protocol itself is checked against a plain forward pass, then determinism,
outputs, and bad input (one KVCompressError before any model work)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kvcompress import KVCompressError, list_methods, make_cache
from kvcompress.evaluate import run_eval
from kvcompress.evaluate import ppl as ppl_mod
from kvcompress.evaluate.spec import needs_calibration, parse_spec

from test_data import CharTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _window(n: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def forward_calls(tiny_model):
    """Counts forward passes of the tiny model (to prove errors come before any work)."""
    calls = []
    handle = tiny_model.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


def _tiny_eval(tiny_model, methods=("full",), **kw):
    opts = dict(
        tokenizer=CharTokenizer(),
        prompt_len=48,
        cont_len=12,
        windows=2,
        needle=(),
        speed=False,
        progress=False,
    )
    opts.update(kw)
    return run_eval(tiny_model, list(methods), **opts)


# -- the protocol is right ---------------------------------------------------------------------------------------------


def test_full_cache_protocol_equals_plain_forward(tiny_model):
    window, P = _window(64), 40
    with make_cache("full", tiny_model, dtype="model") as cache:
        got = ppl_mod.teacher_force(tiny_model, cache, window, P)
    assert got.logprobs.shape == (24, tiny_model.config.vocab_size)
    stepwise = ppl_mod.compare(got.logprobs, got.logprobs, window[P:])["nll_sum"] / 24
    plain = ppl_mod.plain_nll(tiny_model, window, P) / 24
    assert abs(stepwise - plain) < 1e-4
    assert got.memory_prefill.layers[0].tokens == P and got.memory_end.layers[0].tokens == 63


@pytest.mark.model
def test_full_cache_protocol_equals_plain_forward_smollm2(smollm2, prose):
    model, tok = smollm2
    ids = torch.tensor(tok(prose[:4000], add_special_tokens=False)["input_ids"][:96])
    P = 64
    with make_cache("full", model, dtype="model") as cache:
        got = ppl_mod.teacher_force(model, cache, ids, P)
    stepwise = ppl_mod.compare(got.logprobs, got.logprobs, ids[P:])["nll_sum"] / 32
    plain = ppl_mod.plain_nll(model, ids, P) / 32
    assert abs(stepwise - plain) < 1e-4
    assert 0.5 < stepwise < 8  # real prose, a real model


def test_compare_hand_computed():
    ref = torch.tensor([[0.4, 0.6], [0.9, 0.1]]).log()
    met = torch.tensor([[0.9, 0.1], [0.9, 0.1]]).log()
    got = ppl_mod.compare(ref, met, torch.tensor([1, 0]))
    kl0 = 0.4 * math.log(0.4 / 0.9) + 0.6 * math.log(0.6 / 0.1)  # step 1 identical: 0
    assert got["kl_sum"] == pytest.approx(kl0, abs=1e-6)
    assert got["nll_sum"] == pytest.approx(-math.log(0.1) - math.log(0.9), abs=1e-6)
    assert got["agree"] == 1 and got["tokens"] == 2  # step 0 disagrees, step 1 agrees
    summary = ppl_mod.summarize([got])
    assert summary["ppl"] == pytest.approx(math.exp(got["nll_sum"] / 2))


def test_full_vs_full_kl_zero_agreement_one(tiny_model):
    window, P = _window(60, seed=1), 40
    runs = []
    for _ in range(2):
        with make_cache("full", tiny_model) as cache:
            runs.append(ppl_mod.teacher_force(tiny_model, cache, window, P).logprobs)
    got = ppl_mod.compare(runs[0], runs[1], window[P:])
    assert got["kl_sum"] == 0.0 and got["agree"] == got["tokens"] == 20
    # a different storage precision is a different cache: KL small but not exactly zero
    with make_cache("full", tiny_model, dtype="bfloat16") as cache:
        other = ppl_mod.teacher_force(tiny_model, cache, window, P).logprobs
    kl = ppl_mod.compare(runs[0], other, window[P:])["kl_sum"]
    assert 0 < kl < 0.05


# -- run_eval end to end -----------------------------------------------------------------------------------------------


def test_run_eval_tiny_end_to_end(tiny_model, tmp_path):
    res = _tiny_eval(
        tiny_model,
        methods=["full", "full:dtype=bfloat16"],
        needle=(300,),
        needle_depths=(0.5,),
        needle_mode="aware",
        needle_tokens=3,
        speed=True,
        speed_context=32,
        speed_steps=2,
        speed_repeats=1,
        out=tmp_path / "o",
        command="kvcompress eval test",
    )
    rows = {r["spec"]: r for r in res["methods"]}
    full, bf = rows["full"], rows["full:dtype=bfloat16"]
    assert full["reference"] and full["ppl"]["kl"] == 0 and full["ppl"]["agreement"] == 1
    assert full["ppl"]["tokens"] == 24 and full["ppl"]["dppl_pct"] == 0
    assert full["memory"]["after_prefill"]["ratio"] == pytest.approx(1.0)
    assert bf["ppl"]["kl"] > 0 and abs(bf["ppl"]["dppl_pct"]) < 5
    assert set(bf["speed"]) >= {"ttft_ratio", "decode_ratio", "rounds"} and bf["speed"]["ttft_ratio"] > 0
    assert full["needle"]["accuracy"]["aware"]["300"] in (0.0, 1.0)
    files = res["files"]
    on_disk = json.loads(open(files["json"]).read())
    assert on_disk["command"] == "kvcompress eval test" and on_disk["data"]["sha256"] == res["data"]["sha256"]
    md = open(files["markdown"]).read()
    assert "kvcompress eval test" in md and "| full (ref) |" in md
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_eval_deterministic(tiny_model):
    a = _tiny_eval(tiny_model, methods=["full", "full:dtype=bfloat16"], seed=3)
    b = _tiny_eval(tiny_model, methods=["full", "full:dtype=bfloat16"], seed=3)
    c = _tiny_eval(tiny_model, methods=["full"], seed=4)
    for ra, rb in zip(a["methods"], b["methods"]):
        assert ra["ppl"] == rb["ppl"]
    assert a["methods"][0]["ppl"]["ppl"] != c["methods"][0]["ppl"]["ppl"]  # other windows


# -- bad input: one clear error before any work -----------------------------------------------------------------------


def test_bad_data_errors(tiny_model, forward_calls, tmp_path):
    with pytest.raises(KVCompressError, match="does not exist"):
        _tiny_eval(tiny_model, data=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(KVCompressError, match="empty"):
        _tiny_eval(tiny_model, data=tmp_path / "empty.txt")
    assert not forward_calls


def test_context_longer_than_model_max(tiny_model, forward_calls):
    with pytest.raises(KVCompressError, match="maximum of 4096"):
        _tiny_eval(tiny_model, prompt_len=4000, cont_len=200)
    with pytest.raises(KVCompressError, match="maximum of 4096"):
        _tiny_eval(tiny_model, needle=(8192,))
    assert not forward_calls


@pytest.mark.parametrize(
    "spec, match",
    [("nosuchmethod", "unknown method"), ("full:dtype='int3'", "dtype"), ("full:budget=1.5", "unknown option")],
)
def test_bad_method_spec(tiny_model, forward_calls, spec, match):
    with pytest.raises(KVCompressError, match=match):
        _tiny_eval(tiny_model, methods=["full", spec])
    assert not forward_calls


def _methods_with(field: str):
    return [n for n, c in list_methods().items() if field in {f.name for f in dataclasses.fields(c.Config)}]


@pytest.mark.parametrize("value", [1.5, 0.0, -0.2])
@pytest.mark.parametrize("name", _methods_with("budget") or [pytest.param("-", marks=pytest.mark.skip("none registered"))])
def test_bad_budget_before_work(tiny_model, forward_calls, name, value):
    with pytest.raises(KVCompressError):
        _tiny_eval(tiny_model, methods=[f"{name}:budget={value}"])
    assert not forward_calls


@pytest.mark.parametrize("name", _methods_with("bits") or [pytest.param("-", marks=pytest.mark.skip("none registered"))])
def test_unsupported_bits_before_work(tiny_model, forward_calls, name):
    with pytest.raises(KVCompressError):
        _tiny_eval(tiny_model, methods=[f"{name}:bits=7"])
    assert not forward_calls


def test_bad_numbers(tiny_model, forward_calls):
    bad = ({"prompt_len": 0}, {"windows": -1}, {"needle_mode": "sideways"}, {"needle_depths": (1.2,), "needle": (256,)})
    for kw in bad:
        with pytest.raises(KVCompressError):
            _tiny_eval(tiny_model, **kw)
    assert not forward_calls


# -- specs -------------------------------------------------------------------------------------------------------------


def test_parse_spec():
    s = parse_spec("full:dtype=bfloat16")
    assert s.name == "full" and s.kwargs == {"dtype": "bfloat16"} and s.label == "full:dtype=bfloat16"
    assert parse_spec("full").kwargs == {}
    with pytest.raises(KVCompressError, match="name=value"):
        parse_spec("full:dtype")


def test_needs_calibration_detection():
    @dataclasses.dataclass(frozen=True)
    class NeedsFile:
        calibration: str
        bits: int = 3

    class Calibrated:
        Config = NeedsFile

    class Flagged:
        requires_calibration = True
        Config = list_methods()["full"].Config

    assert needs_calibration(Calibrated) and needs_calibration(Flagged)
    assert not needs_calibration(list_methods()["full"])


def test_merge_runs_of_different_parts(tiny_model, tmp_path):
    from kvcompress.evaluate.report import markdown, merge

    a = _tiny_eval(tiny_model, methods=["full", "full:dtype=bfloat16"], out=tmp_path / "a", command="A")
    b = _tiny_eval(
        tiny_model, methods=["full", "full:dtype=bfloat16"], windows=0, needle=(300,), needle_depths=(0.5,),
        needle_mode="agnostic", needle_tokens=2, command="B",
    )
    assert not (tmp_path / "a" / "results.partial.json").exists()  # checkpoints are removed once complete
    m = merge([a, b])
    rows = {r["spec"]: r for r in m["methods"]}
    assert rows["full:dtype=bfloat16"]["ppl"] == a["methods"][1]["ppl"]
    assert rows["full:dtype=bfloat16"]["needle"] == b["methods"][1]["needle"]
    assert m["command"] == "A\nB" and m["config"]["windows"] == 2 and m["config"]["needle"]["modes"] == ["agnostic"]
    assert "needle 300 (agn.)" in markdown(m)
    with pytest.raises(ValueError, match="perplexity"):
        merge([a, a])

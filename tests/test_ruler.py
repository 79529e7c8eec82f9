"""RULER's synthetic tasks (kvcompress.evaluate.ruler): generation is deterministic and right (lengths, answers present
exactly once, distractors never answers, unambiguous word counts), scoring on hand-made outputs, the decode loop on a
scripted fake model, bad input, and the harness / CLI / report wiring on the tiny model."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from kvcompress import KVCompressError
from kvcompress.evaluate import ruler
from kvcompress.evaluate import run_eval
from kvcompress.evaluate.report import markdown, merge

from test_data import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HAYSTACK = "/work/shared/data/paul-graham-essays"
LEN = 1500  # characters = tokens with the CharTokenizer


@pytest.fixture(scope="module")
def text():
    """Haystack text: the Paul Graham essays where the shared data is present, else pydoc prose (always present)."""
    from pathlib import Path

    from kvcompress.data import load_text

    return load_text(HAYSTACK if Path(HAYSTACK).is_dir() else "pydoc")[:60_000]


@pytest.fixture(scope="module")
def tasks(text):
    return ruler.make_ruler_tasks(CharTokenizer(), text, LEN, n=4, seed=0)


def _ctx(task) -> str:
    return CharTokenizer().decode(list(task.context_ids))


def _count(text: str, s: str) -> int:
    return len(re.findall(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE))


# -- generation --------------------------------------------------------------------------------------------------------


def test_every_family_generated(tasks):
    assert Counter(t.family for t in tasks) == {f: 4 for f in ruler.FAMILIES}
    assert all(t.max_new_tokens == ruler.MAX_NEW_TOKENS[t.family] for t in tasks)


def test_deterministic_for_a_seed(text, tasks):
    again = ruler.make_ruler_tasks(CharTokenizer(), text, LEN, n=4, seed=0)
    assert again == tasks  # context, question, answers, distractors all equal
    other = ruler.make_ruler_tasks(CharTokenizer(), text, LEN, n=4, seed=1)
    assert all(a.answers != b.answers for a, b in zip(tasks, other))


def test_a_family_alone_gives_the_same_tasks(text, tasks):
    """Each family and length has its own random stream: asking for one family reproduces its tasks."""
    alone = ruler.make_ruler_tasks(CharTokenizer(), text, LEN, families=["vt", "cwe"], n=4, seed=0)
    assert alone == [t for t in tasks if t.family in ("vt", "cwe")]
    assert ruler.make_ruler_tasks(CharTokenizer(), text, LEN, families="fwe", n=2, seed=0) == [
        t for t in tasks if t.family == "fwe"
    ][:2]


def test_lengths_respected(tasks):
    for t in tasks:
        if t.family.startswith("niah") or t.family == "vt":
            assert t.length == LEN, t.family
        else:  # whole list entries / words: as close as they allow, never over
            assert LEN - 40 < t.length <= LEN, (t.family, t.length)
        assert t.input_ids == list(t.context_ids) + list(t.question_ids)


def test_needle_answers_once_and_distractors(tasks):
    for t in (t for t in tasks if t.family.startswith("niah")):
        ctx = _ctx(t)
        keys, asked = t.meta["keys"], t.meta["asked"]
        n_expected = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 4}[t.family]
        assert len(t.answers) == n_expected and len(set(t.answers)) == n_expected
        for a in t.answers:
            assert re.fullmatch(r"\d{7}", a) and _count(ctx, a) == 1, (t.family, a)
        assert not set(t.distractors) & set(t.answers)
        assert len(t.distractors) == (3 if t.family == "niah_multikey" else 0)
        for d in t.distractors:  # distractor needles are in the context, once each
            assert _count(ctx, d) == 1
        assert len(set(keys)) == len(keys)
        for k in asked:  # the asked key's needle sentence(s) are in the context
            assert ctx.count(f"special magic numbers for {k} is:") == (4 if t.family == "niah_multivalue" else 1)
        question = CharTokenizer().decode(list(t.question_ids))
        assert all(k in question for k in asked) and not any(a in question for a in t.answers)


def test_variable_tracking_chain(tasks):
    for t in (t for t in tasks if t.family == "vt"):
        ctx = _ctx(t)
        value, names = t.meta["value"], t.answers
        assert len(names) == 5 and len(set(names)) == 5
        assert _count(ctx, value) == 1 and f"VAR {names[0]} = {value}." in ctx
        for a, b in zip(names, names[1:]):
            assert f"VAR {b} = VAR {a}." in ctx
        # each name is assigned once; all but the last are read once
        assert [_count(ctx, n) for n in names] == [2, 2, 2, 2, 1]
        # the chain is in order through the context
        starts = [ctx.index(f"VAR {n} =") for n in names]
        assert starts == sorted(starts)


def test_common_words_unambiguous(tasks):
    for t in (t for t in tasks if t.family == "cwe"):
        entries = [line.split(". ", 1)[1] for line in _ctx(t).splitlines() if re.match(r"\d+\. ", line)]
        counts = Counter(entries)
        assert len(t.answers) == 10 and not set(t.answers) & set(t.distractors)
        assert all(counts[a] == t.meta["freq_cw"] for a in t.answers)
        assert all(counts[d] == t.meta["freq_ucw"] < t.meta["freq_cw"] for d in t.distractors)
        assert set(counts) == set(t.answers) | set(t.distractors)
        # numbered 1..N without gaps
        numbers = [int(line.split(".")[0]) for line in _ctx(t).splitlines() if re.match(r"\d+\. ", line)]
        assert numbers == list(range(1, len(numbers) + 1))


def test_frequent_words_unambiguous(tasks):
    for t in (t for t in tasks if t.family == "fwe"):
        words = _ctx(t).split("\n\n", 1)[1].split()
        counts = Counter(words)
        assert len(t.answers) == 3 and not set(t.answers) & set(t.distractors)
        third = min(counts[a] for a in t.answers)
        assert all(counts[d] < third for d in t.distractors)  # the top 3 are strictly the most frequent
        assert set(counts) == set(t.answers) | set(t.distractors)
        assert counts[t.answers[0]] > counts[t.answers[1]] > counts[t.answers[2]]


def test_chat_template_prefix_and_answer_prefix(text):
    """With a chat template the context starts with the template's user turn and the question ends with the
    assistant turn plus the answer prefix."""

    class Chat(CharTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "<user>" + messages[0]["content"] + "</user><assistant>"

    t = ruler.make_ruler_tasks(Chat(), text, LEN, families="niah_single", n=1, seed=0)[0]
    assert t.length == LEN
    assert _ctx(t).startswith("<user>A long text follows")
    q = Chat().decode(list(t.question_ids))
    assert q.endswith("</user><assistant>The special magic number for " + t.meta["asked"][0] + " mentioned in the provided text is")


# -- scoring -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, answers, expected",
    [
        (" 1234567.", ["1234567"], 1.0),
        ("The number is 12345678", ["1234567"], 0.0),  # not inside a longer number
        ("01234567", ["1234567"], 0.0),
        ("1. 1111111\n2. 2222222", ["1111111", "2222222", "3333333", "4444444"], 0.5),
        ("Cities and a CITY", ["city"], 1.0),  # case-insensitive, whole words
        ("cities only", ["city"], 0.0),
        ("ABCDE, FGHIJ", ["abcde", "fghij", "klmno"], 2 / 3),
        ("", ["x"], 0.0),
    ],
)
def test_score_hand_made(output, answers, expected):
    assert ruler.score(output, answers) == pytest.approx(expected)


def test_score_needs_answers():
    with pytest.raises(KVCompressError):
        ruler.score("anything", [])


def test_summarize_by_hand():
    rows = [
        {"mode": "aware", "context_len": 1024, "family": "niah_single", "score": 1.0, "bytes_ratio": 1.0},
        {"mode": "aware", "context_len": 1024, "family": "niah_single", "score": 0.0, "bytes_ratio": 1.0},
        {"mode": "aware", "context_len": 1024, "family": "cwe", "score": 0.5, "bytes_ratio": 3.0},
        {"mode": "aware", "context_len": 2048, "family": "cwe", "score": 1.0, "bytes_ratio": 3.0},
        {"mode": "agnostic", "context_len": 2048, "family": "cwe", "score": 0.25, "bytes_ratio": 4.0},
    ]
    s = ruler.summarize(rows)
    c = s["aware"]["1024"]
    assert c["n"] == 3 and c["score"] == pytest.approx(50.0) and c["se"] == pytest.approx(100 * math.sqrt(0.25 / 3))
    assert c["families"]["niah_single"] == {"score": 50.0, "se": pytest.approx(100 * math.sqrt(0.25 / 2)), "n": 2}
    assert c["families"]["cwe"]["se"] == pytest.approx(100 * math.sqrt(0.25))
    assert c["bytes_ratio"] == pytest.approx(5 / 3)
    assert s["aware"]["all"]["n"] == 4 and s["aware"]["all"]["score"] == pytest.approx(62.5)
    assert s["aware"]["2048"]["se"] == 0.0 and list(s["agnostic"]) == ["2048", "all"]
    assert ruler.binomial_se(0.5, 100) == pytest.approx(5.0)


# -- the decode loop on a scripted model -------------------------------------------------------------------------------


class ScriptedModel:
    """Emits ``script`` one character per forward (CharTokenizer ids), then EOS (id 0); counts forwards."""

    def __init__(self, script: str):
        self.ids = [ord(c) for c in script] + [0]
        self.calls = 0

    def __call__(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        logits = torch.zeros(1, input_ids.shape[1], 128)
        logits[0, -1, self.ids[min(self.calls, len(self.ids) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits)

    forward = __call__


def _task(answers, max_new=30):
    return ruler.RulerTask("niah_multivalue", (1, 2, 3), (4, 5), tuple(answers), 5, max_new, 0)


def test_answer_stops_when_all_found_and_at_the_limit():
    tok = CharTokenizer()
    m = ScriptedModel(" 1111111, 2222222, and more text")
    out = ruler.answer(m, None, _task(["1111111", "2222222"]), "aware", tok, {0})
    assert tok.decode(out) == " 1111111, 2222222," and m.calls == 1 + len(out) - 1  # one prefill, then a step per token
    m = ScriptedModel(" 1111111, 3333333")
    out = ruler.answer(m, None, _task(["1111111", "2222222"], max_new=5), "aware", tok, {0})
    assert tok.decode(out) == " 1111"
    m = ScriptedModel(" 9")  # EOS ends it
    assert tok.decode(ruler.answer(m, None, _task(["1"]), "aware", tok, {0})) == " 9"


def test_answer_agnostic_feeds_the_question_one_token_at_a_time():
    m = ScriptedModel("x" * 10)
    ruler.answer(m, None, _task(["y"], max_new=3), "agnostic", CharTokenizer(), {0})
    assert m.calls == 1 + 2 + 2  # context prefill, 2 question tokens, then 2 decode steps for 3 tokens
    with pytest.raises(KVCompressError):
        ruler.answer(m, None, _task(["y"]), "sideways", CharTokenizer(), {0})


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_bad_input(text):
    tok = CharTokenizer()
    with pytest.raises(KVCompressError, match="unknown RULER task family"):
        ruler.make_ruler_tasks(tok, text, LEN, families=["niah_single", "qa"], n=1)
    with pytest.raises(KVCompressError, match="too short"):
        ruler.make_ruler_tasks(tok, text, 300, families="niah_multikey", n=1)
    with pytest.raises(KVCompressError, match="too short"):
        ruler.make_ruler_tasks(tok, text, 120, families="cwe", n=1)
    with pytest.raises(KVCompressError, match=">= 1"):
        ruler.make_ruler_tasks(tok, text, LEN, n=0)
    with pytest.raises(KVCompressError, match="fewer than"):
        ruler.make_ruler_tasks(tok, text[:2000] + "\n", LEN * 2, families="niah_single", n=1)
    with pytest.raises(KVCompressError, match="maximum of 8192"):
        ruler.resolve_lengths([4096, 8192], 8192, 64)


def test_default_lengths_clamped_to_the_model():
    assert ruler.resolve_lengths(True, 8192, 64) == [1024, 2048, 4096, 8128]
    assert ruler.resolve_lengths(True, 2048, 64) == [1024, 1984]
    assert ruler.resolve_lengths(True, None, 64) == list(ruler.DEFAULT_LENGTHS)
    assert ruler.resolve_lengths([2048, 1024, 0, 2048], 8192, 64) == [1024, 2048]
    assert ruler.resolve_lengths((), 8192, 64) == []


# -- the harness, report, merge and CLI --------------------------------------------------------------------------------




def test_run_eval_ruler_on_the_tiny_model(tiny_model, text, tmp_path):
    (tmp_path / "hay.txt").write_text(text)
    hay = str(tmp_path / "hay.txt")
    kw = dict(tokenizer=CharTokenizer(), windows=0, needle=(), speed=False, progress=False, ruler_dir=hay, data=hay)
    r = run_eval(tiny_model, ["full", "streaming:budget=0.5"], ruler=(700,), ruler_per_task=1,
                 ruler_families=["niah_single", "fwe"], ruler_mode="both", out=tmp_path / "out", **kw)
    assert r["config"]["ruler"]["context_lens"] == [700] and r["config"]["ruler"]["families"] == ["niah_single", "fwe"]
    for row in r["methods"]:
        tasks = row["ruler"]["tasks"]
        assert len(tasks) == 4 and {t["mode"] for t in tasks} == {"aware", "agnostic"}
        assert all(0.0 <= t["score"] <= 1.0 and t["score"] == ruler.score(t["generated"], t["answers"]) for t in tasks)
        assert row["ruler"]["scores"]["aware"]["700"]["n"] == 2
    full, stream = r["methods"]
    assert full["ruler"]["scores"]["aware"]["700"]["bytes_ratio"] == pytest.approx(1.0)
    assert stream["ruler"]["scores"]["aware"]["700"]["bytes_ratio"] > 1.5
    md = (tmp_path / "out" / "results.md").read_text()
    assert "RULER, 700 tokens, query-aware" in md and "| niah_single | fwe | overall |" in md.replace("method | ", "")
    assert "RULER 700 (aware · agn.)" in md
    # a ruler-only run merges with a run of another part
    ppl_run = run_eval(tiny_model, ["full", "streaming:budget=0.5"], prompt_len=48, cont_len=8, **dict(kw, windows=1))
    merged = merge([ppl_run, r])
    assert merged["config"]["ruler"] == r["config"]["ruler"] and all("ruler" in m and "ppl" in m for m in merged["methods"])
    assert "RULER, 700 tokens" in markdown(merged)


def test_run_eval_ruler_errors_before_any_work(tiny_model):
    calls = []
    handle = tiny_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        kw = dict(tokenizer=CharTokenizer(), windows=0, needle=(), speed=False, progress=False, data="stdlib-code")
        with pytest.raises(KVCompressError, match="maximum of 4096"):  # the tiny model has 4096 positions
            run_eval(tiny_model, ["full"], ruler=(4096,), **kw)
        with pytest.raises(KVCompressError, match="unknown RULER task family"):
            run_eval(tiny_model, ["full"], ruler=(1024,), ruler_families=["nope"], **kw)
        with pytest.raises(KVCompressError, match="ruler_mode"):
            run_eval(tiny_model, ["full"], ruler=(1024,), ruler_mode="sometimes", **kw)
        with pytest.raises(KVCompressError, match="ruler_per_task"):
            run_eval(tiny_model, ["full"], ruler=(1024,), ruler_per_task=0, **kw)
    finally:
        handle.remove()
    assert calls == []


def test_cli_tasks_select_the_parts(monkeypatch):
    import kvcompress.evaluate as ev
    from kvcompress.cli import build_parser

    seen = {}

    def fake_run_eval(model, methods, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(ev, "run_eval", fake_run_eval)
    parser = build_parser()
    args = parser.parse_args(["eval", "--tasks", "ruler", "--ruler-lengths", "2048", "--ruler-per-task", "3"])
    with pytest.raises(RuntimeError, match="stop"):
        args.func(args)
    assert seen["windows"] == 0 and seen["needle"] == () and seen["speed"] is False
    assert seen["ruler"] == [2048] and seen["ruler_per_task"] == 3 and seen["ruler_mode"] == "aware"
    args = parser.parse_args(["eval", "--tasks", "ruler", "ppl"])
    with pytest.raises(RuntimeError):
        args.func(args)
    assert seen["ruler"] is True and seen["windows"] == 2 and seen["speed"] is False
    args = parser.parse_args(["eval"])  # default: the parts as before, no RULER
    with pytest.raises(RuntimeError):
        args.func(args)
    assert seen["ruler"] == () and seen["needle"] == [1024] and seen["speed"] is True
    args = parser.parse_args(["eval", "--ruler-lengths", "1024"])
    with pytest.raises(KVCompressError, match="--tasks"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--tasks", "rulers"])


@pytest.mark.model
def test_smollm2_tokenizer_lengths_and_answers(text):
    from transformers import AutoTokenizer

    from kvcompress.models import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m", progress=False)))
    for t in ruler.make_ruler_tasks(tok, text, 1024, n=2, seed=0):
        assert t.length == 1024 if t.family.startswith("niah") or t.family == "vt" else 984 < t.length <= 1024
        ctx = tok.decode(list(t.context_ids))
        if t.family.startswith("niah"):
            assert all(_count(ctx, a) == 1 for a in t.answers)
        assert all(_count(ctx, a) >= 1 for a in t.answers)

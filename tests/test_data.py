"""kvcompress.data: text sources, token windows, needle tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompress import KVCompressError
from kvcompress.data import (
    load_text,
    make_needle_tasks,
    needle_hit,
    text_sha256,
    token_windows,
    windows_from_ids,
)


class CharTokenizer:
    """One token per character (ids < 128, the tiny model's vocab); no chat template."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from kvcompress.models import resolve

    return AutoTokenizer.from_pretrained(str(resolve("smollm2-135m", progress=False)))


# -- sources ----------------------------------------------------------------------------------------------------------


def test_pydoc_is_default_and_stable():
    text = load_text()
    assert len(text) > 100_000 and text == load_text("pydoc")
    assert text_sha256(text) == text_sha256(load_text("pydoc"))


def test_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not a txt")
    assert load_text(tmp_path / "a.txt") == "first"
    assert load_text(str(tmp_path)) == "first\n\nsecond"  # sorted by name, .txt only


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(KVCompressError, match="empty"):
        load_text(path)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(KVCompressError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(KVCompressError, match="no .txt"):
        load_text(tmp_path)


def test_hf_dataset_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(KVCompressError, match="datasets"):
            load_text("hf:wikitext:wikitext-2-raw-v1:test")
    else:
        pytest.skip("datasets is installed; the offline path is not exercised here")


# -- windows -----------------------------------------------------------------------------------------------------------


def test_windows_deterministic_non_overlapping():
    ids = torch.arange(1000)
    a = windows_from_ids(ids, 50, 5, seed=3)
    assert a.shape == (5, 50)
    assert torch.equal(a, windows_from_ids(ids, 50, 5, seed=3))
    assert not torch.equal(a, windows_from_ids(ids, 50, 5, seed=4))
    starts = a[:, 0]
    assert torch.all(starts % 50 == 0) and torch.all(starts[1:] > starts[:-1])  # aligned chunks, corpus order
    assert torch.all(a == starts[:, None] + torch.arange(50))  # contiguous tokens
    assert len(set(a.flatten().tolist())) == 250  # no token in two windows


def test_windows_from_text_and_too_short():
    tok = CharTokenizer()
    w = token_windows(tok, "abcdefghij" * 10, 20, 3, seed=0)
    assert w.shape == (3, 20) and w.dtype == torch.long
    with pytest.raises(KVCompressError, match="room for 5"):
        token_windows(tok, "abcdefghij" * 10, 20, 6)


# -- needle ------------------------------------------------------------------------------------------------------------


def test_needle_hit_is_exact():
    assert needle_hit(" 1234567.", "1234567")
    assert needle_hit("The number is 1234567", "1234567")
    assert not needle_hit("12345678", "1234567")  # inside a longer number
    assert not needle_hit("123456", "1234567")
    assert not needle_hit("1 234 567", "1234567")


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_task_layout_char_tokenizer(depth):
    tok = CharTokenizer()
    (task,) = make_needle_tasks(tok, None, 600, depths=(depth,), n=1, seed=1)
    ids = task.input_ids
    assert len(ids) == 600
    text = tok.decode(task.context_ids)
    needle = f" The special magic number is {task.answer}."
    assert len(task.answer) == 7 and task.answer.isdigit()
    assert text.count(task.answer) == 1
    assert tok.decode(task.context_ids[task.needle_start : task.needle_start + task.needle_len]) == needle
    assert abs(task.actual_depth - depth) <= 64 / 550  # snapped back to a sentence end at most 64 tokens
    assert tok.decode(task.question_ids).rstrip().endswith("The special magic number is")
    assert task.answer not in tok.decode(task.question_ids)


def test_needle_tasks_deterministic_and_distinct():
    tok = CharTokenizer()
    a = make_needle_tasks(tok, None, 400, depths=(0.2, 0.8), n=2, seed=5)
    b = make_needle_tasks(tok, None, 400, depths=(0.2, 0.8), n=2, seed=5)
    c = make_needle_tasks(tok, None, 400, depths=(0.2, 0.8), n=2, seed=6)
    assert a == b and a != c
    assert len(a) == 4 and len({t.answer for t in a}) == 4
    assert [t.depth for t in a] == [0.2, 0.2, 0.8, 0.8]


def test_needle_bad_input(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(KVCompressError, match="too short"):
        make_needle_tasks(tok, None, 100)
    with pytest.raises(KVCompressError, match="outside"):
        make_needle_tasks(tok, None, 400, depths=(1.5,))
    with pytest.raises(KVCompressError, match="does not exist"):
        make_needle_tasks(tok, str(tmp_path / "missing"), 400)


@pytest.mark.model
def test_needle_task_chat_template_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    essays = Path(__file__).resolve().parents[2] / "shared" / "data" / "paul-graham-essays"
    if not essays.is_dir():
        pytest.skip(f"{essays} not present")
    (task,) = make_needle_tasks(tok, essays, 1024, depths=(0.5,), n=1, seed=0)
    assert len(task.input_ids) == 1024
    context = tok.decode(list(task.context_ids))
    assert context.startswith("<|im_start|>system")
    assert f"The special magic number is {task.answer}." in context
    question = tok.decode(list(task.question_ids))
    assert "<|im_start|>assistant" in question and question.endswith("The special magic number is")
    # the needle sits at the asked depth of the haystack tokens
    assert abs(task.actual_depth - 0.5) < 0.07


def test_stdlib_code_source_is_python_source():
    text = load_text("stdlib-code")
    assert len(text) > 1_000_000 and "def " in text and "import " in text
    assert text_sha256(text) == text_sha256(load_text("stdlib-code"))

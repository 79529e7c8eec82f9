"""Corpora and tasks for the evaluation protocol.

- :func:`load_text` — ``"pydoc"`` (the built-in ``pydoc_data.topics`` prose, always present), a text file, a
  directory of ``.txt`` files (sorted, concatenated), or ``"hf:NAME[:CONFIG[:SPLIT]]"`` (Hugging Face
  ``datasets``, only when installed and online).
- :func:`token_windows` — deterministic, non-overlapping token windows ``(n, length)`` for perplexity.
- :func:`make_needle_tasks` — needle-in-a-haystack prompts (a 7-digit number at a given depth), split into the
  context part and the question part so that the question can be asked after compression.

Bad input (missing path, empty text, too short a corpus) raises one :class:`KVCompressError`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .registry import KVCompressError

DEFAULT_SOURCE = "pydoc"
CODE_SOURCE = "stdlib-code"  # Python source: the standard library's own top-level .py files (every install has them)
HF_PREFIX = "hf:"


# --------------------------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------------------------


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _stdlib_code() -> str:
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return "\n\n".join(_read_file(f) for f in files)


def _read_file(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _hf_text(spec: str) -> str:
    """``NAME[:CONFIG[:SPLIT]]`` -> the dataset's text column joined by newlines."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise KVCompressError(f"bad Hugging Face data spec {HF_PREFIX}{spec!r}; write hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "test"
    try:
        import datasets
    except ImportError as exc:
        raise KVCompressError(
            f"data {HF_PREFIX}{spec} needs the `datasets` package (pip install datasets); or pass a text file"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, bad split: one clear error
        raise KVCompressError(f"could not load Hugging Face dataset {spec!r} (offline or unknown?): {exc}") from exc
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if not columns:
        raise KVCompressError(f"Hugging Face dataset {spec!r} has no string column")
    column = "text" if "text" in columns else columns[0]
    return "\n".join(ds[column])


def load_text(source: str | Path = DEFAULT_SOURCE) -> str:
    """The text of ``source``: ``"pydoc"`` (English prose), ``"stdlib-code"`` (Python source), a file, a directory of ``.txt`` files (sorted by name,
    joined by blank lines), or ``"hf:NAME[:CONFIG[:SPLIT]]"``. Raises KVCompressError if it is missing or empty."""
    src = str(source)
    if src == DEFAULT_SOURCE:
        text = _pydoc_text()
    elif src == CODE_SOURCE:
        text = _stdlib_code()
    elif src.startswith(HF_PREFIX):
        text = _hf_text(src[len(HF_PREFIX) :])
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise KVCompressError(
                f"data path {src!r} does not exist (use 'pydoc', 'stdlib-code', a text file, a directory of .txt files, "
                f"or {HF_PREFIX}NAME[:CONFIG[:SPLIT]] for a Hugging Face dataset)"
            )
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
            if not files:
                raise KVCompressError(f"data directory {src!r} has no .txt files")
            text = "\n\n".join(_read_file(p) for p in files)
        else:
            text = _read_file(path)
    if not text.strip():
        raise KVCompressError(f"data {src!r} is empty")
    return text


def text_sha256(text: str) -> str:
    """SHA-256 of the UTF-8 text (recorded with every result so a run can be matched to its data)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no length warning for long corpora)."""
    try:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    except TypeError:  # tokenizers without a ``verbose`` argument
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(tokenizer, text: str, length: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` non-overlapping windows of ``length`` tokens from ``text``: ``(n, length)`` int64.

    The corpus is cut into consecutive ``length``-token chunks; ``n`` of them are drawn without replacement
    with a generator seeded by ``seed`` and returned in corpus order (same seed -> same windows)."""
    return windows_from_ids(torch.tensor(encode(tokenizer, text), dtype=torch.long), length, n, seed)


def windows_from_ids(ids: torch.Tensor, length: int, n: int, seed: int = 0) -> torch.Tensor:
    """:func:`token_windows` on already tokenized ids ``(N,)``."""
    if length < 1 or n < 1:
        raise KVCompressError(f"window length and count must be >= 1, got length={length}, n={n}")
    chunks = ids.numel() // length
    if chunks < n:
        raise KVCompressError(
            f"the corpus has {ids.numel()} tokens: room for {chunks} non-overlapping windows of {length} tokens, "
            f"but {n} were asked for (use a longer text, fewer windows or shorter ones)"
        )
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(chunks, generator=gen)[:n].sort().values
    return ids[: chunks * length].view(chunks, length)[pick].clone()


# --------------------------------------------------------------------------------------------------------------------
# Needle in a haystack
# --------------------------------------------------------------------------------------------------------------------

NEEDLE = " The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the 7-digit number only."
ANSWER_PREFIX = "The special magic number is"
_PLACEHOLDER = "\x00CONTEXT\x00"


@dataclass(frozen=True)
class NeedleTask:
    """One needle prompt. ``context_ids + question_ids`` has exactly ``context_len`` tokens.

    ``context_ids``: chat-template prefix + haystack with the needle inside (what query-agnostic compresses).
    ``question_ids``: the question, the template's end of turn and the answer prefix (asked after compression).
    """

    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer: str  # the 7 digits
    depth: float  # requested depth in [0, 1]
    actual_depth: float  # needle start / haystack tokens (after snapping to a sentence end)
    needle_start: int  # index of the needle's first token in context_ids
    needle_len: int
    context_len: int

    @property
    def input_ids(self) -> list[int]:
        return list(self.context_ids) + list(self.question_ids)


def _template_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before the haystack and after it (question + end of turn + answer prefix)."""
    if getattr(tokenizer, "chat_template", None):
        user = _PLACEHOLDER + "\n\n" + QUESTION
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(_PLACEHOLDER)
        return encode(tokenizer, before), encode(tokenizer, after + ANSWER_PREFIX)
    return [], encode(tokenizer, "\n\nQuestion: " + QUESTION + "\nAnswer: " + ANSWER_PREFIX)


def _sentence_ends(tokenizer, ids: list[int]) -> torch.Tensor:
    """Bool per token: the token ends a sentence ('.', '!', '?' possibly followed by quotes/space)."""
    pieces = [tokenizer.decode([i]) for i in ids]
    return torch.tensor([bool(re.search(r"[.!?][\"')\]]?\s*$", p)) for p in pieces], dtype=torch.bool)


def _haystack_text(haystack: str | Path | None) -> str:
    """None -> pydoc prose; a Path, an existing path, 'pydoc', 'hf:...' or a short one-line string -> load_text
    (a missing path raises); anything else is the haystack text itself."""
    if haystack is None:
        return load_text(DEFAULT_SOURCE)
    if isinstance(haystack, Path):
        return load_text(haystack)
    s = str(haystack)
    if "\n" in s or len(s) > 1000:
        if not s.strip():
            raise KVCompressError("the needle haystack text is empty")
        return s
    return load_text(s)


def make_needle_tasks(
    tokenizer,
    haystack: str | Path | None,
    context_len: int,
    depths=(0.1, 0.5, 0.9),
    n: int = 1,
    seed: int = 0,
) -> list[NeedleTask]:
    """``n`` tasks per depth, each exactly ``context_len`` tokens long.

    ``haystack``: a directory of essays (Paul Graham's), a text file, raw text, or None (pydoc prose).
    Each task takes a random stretch of the haystack, puts the needle sentence with a random 7-digit number
    at ``depth`` (snapped back to the nearest sentence end within 64 tokens), and ends with the question.
    Uses the tokenizer's chat template when it has one. Deterministic given ``seed``."""
    text = _haystack_text(haystack)
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise KVCompressError(f"needle depth {d!r} is outside [0, 1]")
    if n < 1:
        raise KVCompressError(f"needle tasks per depth must be >= 1, got {n}")
    hay_ids = encode(tokenizer, text)
    prefix, question = _template_parts(tokenizer)
    rng = random.Random(f"needle:{seed}:{context_len}")
    tasks = []
    for depth in depths:
        for _ in range(n):
            number = str(rng.randint(1_000_000, 9_999_999))
            needle = encode(tokenizer, NEEDLE.format(number=number))
            room = context_len - len(prefix) - len(question) - len(needle)
            if room < 16:
                raise KVCompressError(
                    f"needle context of {context_len} tokens is too short for the template, needle and question "
                    f"({context_len - room} tokens)"
                )
            if room > len(hay_ids):
                raise KVCompressError(f"the haystack has {len(hay_ids)} tokens, fewer than the {room} needed")
            start = rng.randint(0, len(hay_ids) - room)
            hay = hay_ids[start : start + room]
            pos = round(float(depth) * room)
            if 0 < pos < room:
                lo = max(0, pos - 64)
                ends = _sentence_ends(tokenizer, hay[lo:pos]).nonzero().flatten()
                if ends.numel():
                    pos = lo + int(ends[-1]) + 1
            context = prefix + hay[:pos] + needle + hay[pos:]
            tasks.append(
                NeedleTask(
                    context_ids=tuple(context),
                    question_ids=tuple(question),
                    answer=number,
                    depth=float(depth),
                    actual_depth=pos / room,
                    needle_start=len(prefix) + pos,
                    needle_len=len(needle),
                    context_len=context_len,
                )
            )
    return tasks


def needle_hit(generated: str, answer: str) -> bool:
    """Exact match: the 7 digits appear in ``generated`` as a whole number (not inside a longer one)."""
    return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", generated) is not None

"""RULER-style synthetic long-context tasks, generated offline from any haystack text, scored like RULER.

Families (all generated here; no download):

- ``niah_single``     one needle "One of the special magic numbers for <key> is: <7 digits>."; asked for that key.
- ``niah_multikey``   the asked needle plus 3 distractor needles with other keys and other numbers.
- ``niah_multivalue`` 4 needles with the same key and 4 different numbers; all 4 expected.
- ``niah_multiquery`` 4 needles with 4 keys; all 4 asked at once, all 4 numbers expected.
- ``vt``              variable tracking: "VAR A = 12345." then 4 hops "VAR B = VAR A." ... spread through the haystack;
                      every variable that ends up holding the value is expected (5 names).
- ``cwe``             common-word extraction: a numbered list of words where 10 words appear ``freq_cw`` times and the
                      others ``freq_ucw`` < ``freq_cw`` times; the 10 common words are expected.
- ``fwe``             frequent-word extraction: a text of coded (random-letter) words with Zipf-like counts
                      ``floor(C / rank**2)``; the 3 most frequent (strictly more frequent than any other) are expected.

The needle and variable-tracking tasks are exactly ``context_len`` tokens long (chat-template prefix + haystack stretch
+ inserted sentences + question); the word-list tasks fill the length as closely as whole entries allow (never over).
Score of one output = the share of expected strings it contains (case-insensitive, whole words) — RULER's
"string_match_all"; a family's or a length's score is the mean in points with the binomial standard error
``100 * sqrt(p (1 - p) / n)`` (for partial-credit tasks an upper bound on the sample standard error).

Modes as for the needle: ``aware`` (the question is in the prompt the method compresses), ``agnostic`` (compress the
context, then feed the question through the compressed cache). Deterministic given ``seed``.
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass, field

import torch

from ..compat import cache_kwargs
from ..data import _haystack_text, _sentence_ends, encode
from ..registry import KVCompressError

FAMILIES = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
MODES = ("aware", "agnostic")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_PER_TASK = 15  # per family and length: 7 x 15 = 105 tasks per length -> binomial SE <= 4.9 points
# greedy tokens decoded at most per family (enough for the expected strings with separators on SmolLM2 / Gemma-3)
MAX_NEW_TOKENS = {
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 64,
    "cwe": 64,
    "fwe": 24,
}
_PLACEHOLDER = "\x00CONTEXT\x00"
_NIAH_KEYS = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}
_NIAH_VALUES_PER_KEY = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 1}
_VT_HOPS = 4
_CWE_COMMON = 10
_FWE_TOP = 3
_SLACK = 32  # extra haystack tokens drawn per stretch
_CWE_TEXT = (
    "Below is a numbered list of words. Some words appear far more often than the others; remember which.",
    f"What are the {_CWE_COMMON} most common words in the list above?",
    f"The {_CWE_COMMON} most common words in the list are:",
)
_FWE_TEXT = (
    "Below is a text of coded words. Keep track of how often each coded word appears.",
    f"What are the {_FWE_TOP} most frequent coded words in the text above?",
    f"The {_FWE_TOP} most frequent coded words are:",
)
# words of every template (answers never come from these); chat-template words are not known here and not needed
_TEMPLATE_WORDS = set(re.findall(r"[a-z]+", " ".join(_CWE_TEXT + _FWE_TEXT).lower())) | {
    "question", "answer", "special", "magic", "number", "numbers", "variable", "variables", "assigned", "value",
}


@dataclass(frozen=True)
class RulerTask:
    """One prompt. ``context_ids + question_ids`` has ``length`` tokens (== ``context_len`` for needle / vt tasks,
    ``<= context_len`` for the word lists).

    ``context_ids``: template prefix + context (what query-agnostic compresses); ``question_ids``: the question, end
    of turn and answer prefix. ``answers``: the strings expected in the output; ``distractors``: strings in the
    context that are not answers (other needles' numbers, rare words)."""

    family: str
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answers: tuple[str, ...]
    context_len: int
    max_new_tokens: int
    index: int  # task number within its family and length
    distractors: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def input_ids(self) -> list[int]:
        return list(self.context_ids) + list(self.question_ids)

    @property
    def length(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def found(text: str, expected: str) -> bool:
    """``expected`` occurs in ``text`` as a whole word / number (case-insensitive; '1234567' is not in '12345678')."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(expected)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE) is not None


def score(text: str, answers) -> float:
    """Share of ``answers`` found in ``text`` (RULER's string_match_all, per task): in [0, 1]."""
    answers = list(answers)
    if not answers:
        raise KVCompressError("a RULER task needs at least one expected answer")
    return sum(found(text, a) for a in answers) / len(answers)


def binomial_se(p: float, n: int) -> float:
    """Standard error of a mean score ``p`` in [0, 1] over ``n`` tasks, in points: ``100 sqrt(p (1 - p) / n)``."""
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def _cell(scores: list[float]) -> dict:
    p = sum(scores) / len(scores)
    return {"score": 100.0 * p, "se": binomial_se(p, len(scores)), "n": len(scores)}


def summarize(results: list[dict]) -> dict:
    """Per mode, per context length and overall: ``{"aware": {"1024": {"score", "se", "n", "families": {family:
    {"score", "se", "n"}}, "bytes_ratio"}, "all": {...}}}``; scores and standard errors in points."""
    out: dict = {}
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        by_len: dict = {}
        for key, sel in [(str(n), [r for r in rows if r["context_len"] == n]) for n in sorted({r["context_len"] for r in rows})] + [
            ("all", rows)
        ]:
            cell = _cell([r["score"] for r in sel])
            cell["families"] = {
                f: _cell([r["score"] for r in sel if r["family"] == f]) for f in FAMILIES if any(r["family"] == f for r in sel)
            }
            ratios = [r["bytes_ratio"] for r in sel if r.get("bytes_ratio") is not None]
            cell["bytes_ratio"] = sum(ratios) / len(ratios) if ratios else None
            by_len[key] = cell
        out[mode] = by_len
    return out


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


def check_families(families) -> tuple[str, ...]:
    """None -> every family; otherwise the names, checked (unknown -> KVCompressError), in the canonical order."""
    if families is None:
        return FAMILIES
    names = [families] if isinstance(families, str) else list(families)
    names = [n.strip() for x in names for n in str(x).split(",") if n.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        raise KVCompressError(f"unknown RULER task famil{'y' if len(unknown) == 1 else 'ies'} {unknown or names!r}; known: {', '.join(FAMILIES)}")
    return tuple(f for f in FAMILIES if f in names)


def _parts(tokenizer, intro: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before the context (template + intro) and after it (question + end of turn + answer prefix)."""
    if getattr(tokenizer, "chat_template", None):
        user = intro + "\n\n" + _PLACEHOLDER + "\n\n" + question
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        before, after = text.split(_PLACEHOLDER)
        return encode(tokenizer, before), encode(tokenizer, after + answer_prefix)
    return encode(tokenizer, intro + "\n\n"), encode(tokenizer, "\n\nQuestion: " + question + "\nAnswer: " + answer_prefix)


def _vocabulary(text: str) -> list[str]:
    """Distinct lowercase words of 4-10 letters in the haystack, sorted (the word lists and needle keys), less the
    words of the task templates (an answer word must not be given away by the prompt)."""
    return sorted(w for w in set(re.findall(r"(?<![A-Za-z])[a-z]{4,10}(?![A-Za-z])", text)) if w not in _TEMPLATE_WORDS)


def _number(rng: random.Random, digits: int, avoid: set[str], hay_text: str) -> str:
    """A random ``digits``-digit number not in ``avoid`` and not in the haystack text."""
    while True:
        s = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if s not in avoid and not found(hay_text, s):
            avoid.add(s)
            return s


def _name(rng: random.Random, avoid: set[str], hay_text: str) -> str:
    """A random 5-letter uppercase variable name not in ``avoid`` and not in the haystack text."""
    while True:
        s = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if s not in avoid and not found(hay_text, s):
            avoid.add(s)
            return s


def _insert(tokenizer, hay: list[int], sentences: list[list[int]], depths: list[float]) -> list[int]:
    """``hay`` with each sentence's ids inserted at its depth (snapped back to a sentence end within 64 tokens);
    sentences keep their order (depths sorted ascending)."""
    room = len(hay)
    positions = []
    for d in depths:
        pos = round(d * room)
        if 0 < pos < room:
            lo = max(0, pos - 64)
            ends = _sentence_ends(tokenizer, hay[lo:pos]).nonzero().flatten()
            if ends.numel():
                pos = lo + int(ends[-1]) + 1
        positions.append(pos)
    out, prev = [], 0
    for pos, sent in zip(positions, sentences):  # depths are sorted; max() keeps snapped positions in order too
        pos = max(pos, prev)
        out += hay[prev:pos] + sent
        prev = pos
    return out + hay[prev:]


class _Generator:
    """Everything shared by the tasks of one haystack and tokenizer (tokenized once)."""

    def __init__(self, tokenizer, haystack):
        self.tokenizer = tokenizer
        self.text = _haystack_text(haystack)
        self.hay_ids = encode(tokenizer, self.text)
        self.vocab = _vocabulary(self.text)

    def _stretch(self, rng: random.Random, room: int, what: str, context_len: int) -> list[int]:
        """A random stretch of ``room + _SLACK`` haystack tokens (the slack absorbs sentences whose final token count
        differs from the probe's; the caller cuts the stretch to the exact room)."""
        if room < 16:
            raise KVCompressError(f"a {what} task of {context_len} tokens is too short for its template and sentences")
        if room + _SLACK > len(self.hay_ids):
            raise KVCompressError(f"the haystack has {len(self.hay_ids)} tokens, fewer than the {room + _SLACK} a {what} task of {context_len} needs")
        start = rng.randint(0, len(self.hay_ids) - room - _SLACK)
        return self.hay_ids[start : start + room + _SLACK]

    @staticmethod
    def _cut(hay: list[int], room: int, what: str) -> list[int]:
        if not 16 <= room <= len(hay):
            raise KVCompressError(f"could not fit a {what} task's sentences into its length")
        return hay[:room]

    def _key(self, rng: random.Random, avoid: set[str]) -> str:
        if len(self.vocab) < 8:
            raise KVCompressError(f"the haystack has only {len(self.vocab)} distinct words; RULER keys need more text")
        while True:
            k = f"{rng.choice(self.vocab)}-{rng.choice(self.vocab)}"
            if k not in avoid:
                avoid.add(k)
                return k

    # -- needle variants --------------------------------------------------------------------------------------------
    def niah(self, family: str, rng: random.Random, context_len: int, index: int) -> RulerTask:
        tok = self.tokenizer
        n_keys, n_vals = _NIAH_KEYS[family], _NIAH_VALUES_PER_KEY[family]
        keys_used: set[str] = set()
        keys = [self._key(rng, keys_used) for _ in range(n_keys)]
        asked = keys if family == "niah_multiquery" else keys[:1]
        if family == "niah_multiquery":
            kq = ", ".join(asked[:-1]) + " and " + asked[-1]
            question = f"What are the special magic numbers for {kq} mentioned in the provided text?"
            prefix_text = f"The special magic numbers for {kq} mentioned in the provided text are"
        elif family == "niah_multivalue":
            question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
            prefix_text = f"The special magic numbers for {asked[0]} mentioned in the provided text are"
        else:
            question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
            prefix_text = f"The special magic number for {asked[0]} mentioned in the provided text is"
        intro = "A long text follows with some special magic numbers hidden in it. Remember them: you will be asked about them afterwards."
        prefix, q_ids = _parts(tok, intro, question, prefix_text)
        # probe the sentences' length with a fixed number; the real numbers are drawn after the stretch (never in it)
        probe = [encode(tok, f" One of the special magic numbers for {k} is: 1234567.") for k in keys for _ in range(n_vals)]
        hay = self._stretch(rng, context_len - len(prefix) - len(q_ids) - sum(map(len, probe)), family, context_len)
        hay_text = tok.decode(hay)
        numbers: set[str] = set()
        needles = [(k, _number(rng, 7, numbers, hay_text)) for k in keys for _ in range(n_vals)]
        sentences = [encode(tok, f" One of the special magic numbers for {k} is: {v}.") for k, v in needles]
        hay = self._cut(hay, context_len - len(prefix) - len(q_ids) - sum(map(len, sentences)), family)
        order = list(range(len(needles)))
        rng.shuffle(order)
        depths = sorted(rng.random() for _ in needles)
        body = _insert(tok, hay, [sentences[i] for i in order], depths)
        answers = tuple(v for k, v in needles if k in asked)
        distractors = tuple(v for k, v in needles if k not in asked)
        context = prefix + body
        return RulerTask(family, tuple(context), tuple(q_ids), answers, context_len, MAX_NEW_TOKENS[family], index, distractors,
                         {"keys": keys, "asked": asked})

    # -- variable tracking ------------------------------------------------------------------------------------------
    def vt(self, rng: random.Random, context_len: int, index: int) -> RulerTask:
        tok = self.tokenizer
        intro = "Memorize the variable assignments hidden in the following text; you will be asked to follow them."
        probe = [encode(tok, " VAR ABCDE = 12345.")] + [encode(tok, " VAR ABCDE = VAR ABCDE.") for _ in range(_VT_HOPS)]
        p_pre, p_q = _parts(tok, intro, self._vt_question("12345"), self._vt_prefix("12345", _VT_HOPS + 1))
        hay = self._stretch(rng, context_len - len(p_pre) - len(p_q) - sum(map(len, probe)), "vt", context_len)
        hay_text = tok.decode(hay)
        value = _number(rng, 5, set(), hay_text)
        used: set[str] = set()
        names = [_name(rng, used, hay_text) for _ in range(_VT_HOPS + 1)]
        sentences = [encode(tok, f" VAR {names[0]} = {value}.")]
        sentences += [encode(tok, f" VAR {names[i + 1]} = VAR {names[i]}.") for i in range(_VT_HOPS)]
        prefix, q_ids = _parts(tok, intro, self._vt_question(value), self._vt_prefix(value, len(names)))
        hay = self._cut(hay, context_len - len(prefix) - len(q_ids) - sum(map(len, sentences)), "vt")
        depths = sorted(rng.random() for _ in sentences)
        body = _insert(tok, hay, sentences, depths)
        return RulerTask("vt", tuple(prefix + body), tuple(q_ids), tuple(names), context_len, MAX_NEW_TOKENS["vt"], index, (),
                         {"value": value})

    @staticmethod
    def _vt_question(value: str) -> str:
        return f"Which variables are assigned the value {value}, directly or through other variables, in the text above? List them all."

    @staticmethod
    def _vt_prefix(value: str, n: int) -> str:
        return f"Following the chain of assignments, the {n} variables assigned the value {value} are:"

    # -- word lists -------------------------------------------------------------------------------------------------
    def _fit(self, what: str, context_len: int, budget: int, render, lo: int, hi: int) -> tuple[list[int], int]:
        """The largest ``k`` in [lo, hi] with ``len(encode(render(k))) <= budget`` (binary search); its ids."""
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            ids = encode(self.tokenizer, render(mid))
            if len(ids) <= budget:
                best, lo = (ids, mid), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise KVCompressError(f"a {what} task of {context_len} tokens is too short for its template and word list")
        return best

    def cwe(self, rng: random.Random, context_len: int, index: int) -> RulerTask:
        tok = self.tokenizer
        prefix, q_ids = _parts(tok, *_CWE_TEXT)
        budget = context_len - len(prefix) - len(q_ids)
        sample = rng.sample(self.vocab, min(len(self.vocab), 40)) if self.vocab else []
        per_entry = len(encode(tok, "".join(f"{i + 100}. {w}\n" for i, w in enumerate(sample)))) / max(len(sample), 1)
        entries = max(budget, 1) / max(per_entry, 1.0)
        freq_cw = int(min(30, max(3, entries // 20)))
        freq_ucw = int(min(3, max(1, freq_cw // 4)))
        n_rare = int(max(0, (entries - _CWE_COMMON * freq_cw) / freq_ucw * 1.3)) + 8
        if len(self.vocab) < _CWE_COMMON + n_rare:
            n_rare = len(self.vocab) - _CWE_COMMON
            if n_rare < 1:
                raise KVCompressError(f"the haystack has only {len(self.vocab)} distinct words; cwe needs more text")
        words = rng.sample(self.vocab, _CWE_COMMON + n_rare)
        common, rare = words[:_CWE_COMMON], words[_CWE_COMMON:]
        rank = {w: i for i, w in enumerate(rare)}
        order = [w for w in common for _ in range(freq_cw)] + [w for w in rare for _ in range(freq_ucw)]
        rng.shuffle(order)

        def render(k: int) -> str:
            kept = [w for w in order if rank.get(w, -1) < k]
            return "".join(f"{i + 1}. {w}\n" for i, w in enumerate(kept)).rstrip("\n")

        ids, k = self._fit("cwe", context_len, budget, render, 0, n_rare)
        return RulerTask("cwe", tuple(prefix + ids), tuple(q_ids), tuple(common), context_len, MAX_NEW_TOKENS["cwe"], index,
                         tuple(rare[:k]), {"freq_cw": freq_cw, "freq_ucw": freq_ucw})

    def fwe(self, rng: random.Random, context_len: int, index: int) -> RulerTask:
        tok = self.tokenizer
        prefix, q_ids = _parts(tok, *_FWE_TEXT)
        budget = context_len - len(prefix) - len(q_ids)
        coded: list[str] = []
        seen: set[str] = set()

        def new_word() -> str:
            while True:
                w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
                if w not in seen and w not in _TEMPLATE_WORDS:
                    seen.add(w)
                    coded.append(w)
                    return w

        sample = [new_word() for _ in range(40)]
        per_word = len(encode(tok, " ".join(sample))) / len(sample)
        n_words = max(budget, 1) / max(per_word, 1.0)
        c = max(18, round(0.25 * n_words))
        counts = []
        r = 1
        while (cnt := c // (r * r)) >= 2:
            counts.append(cnt)
            r += 1
        assert counts[_FWE_TOP - 1] > counts[_FWE_TOP] if len(counts) > _FWE_TOP else True
        top = coded[: len(counts)] + [new_word() for _ in range(len(counts) - len(coded))]
        n_tail = int(max(0, n_words - sum(counts)) * 1.3) + 8
        tail = [new_word() for _ in range(n_tail)]
        rank = {w: i for i, w in enumerate(tail)}
        order = [w for w, cnt in zip(top, counts) for _ in range(cnt)] + tail
        rng.shuffle(order)

        def render(k: int) -> str:
            return " ".join(w for w in order if rank.get(w, -1) < k)

        ids, k = self._fit("fwe", context_len, budget, render, 0, n_tail)
        answers = tuple(top[:_FWE_TOP])
        return RulerTask("fwe", tuple(prefix + ids), tuple(q_ids), answers, context_len, MAX_NEW_TOKENS["fwe"], index,
                         tuple(top[_FWE_TOP:]) + tuple(tail[:k]), {"counts": counts})


def make_ruler_tasks(tokenizer, haystack, context_len: int, families=None, n: int = DEFAULT_PER_TASK, seed: int = 0,
                     *, _gen: _Generator | None = None) -> list[RulerTask]:
    """``n`` tasks of each family (default all of :data:`FAMILIES`) at ``context_len`` tokens.

    ``haystack``: a directory of essays, a text file, raw text, or None (pydoc prose) — as for the needle. Uses the
    tokenizer's chat template when it has one. Deterministic given ``seed`` (each family and length has its own
    random stream, so adding a family or a length does not change the others' tasks)."""
    fams = check_families(families)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KVCompressError(f"RULER tasks per family must be an integer >= 1, got {n!r}")
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
        raise KVCompressError(f"RULER context length must be an integer >= 1, got {context_len!r}")
    gen = _gen or _Generator(tokenizer, haystack)
    tasks = []
    for fam in fams:
        rng = random.Random(f"ruler:{seed}:{fam}:{context_len}")
        for i in range(n):
            if fam.startswith("niah"):
                tasks.append(gen.niah(fam, rng, context_len, i))
            else:
                tasks.append(getattr(gen, fam)(rng, context_len, i))
    return tasks


def make_all(tokenizer, haystack, lengths, families=None, n: int = DEFAULT_PER_TASK, seed: int = 0) -> list[RulerTask]:
    """:func:`make_ruler_tasks` for every length (the haystack tokenized once), ordered by length, then task number,
    then family, so that a run stopped part-way has seen every family about equally often."""
    gen = _Generator(tokenizer, haystack)
    tasks = [t for length in lengths for t in make_ruler_tasks(tokenizer, None, length, families, n, seed, _gen=gen)]
    return sorted(tasks, key=lambda t: (t.context_len, t.index, FAMILIES.index(t.family)))


def resolve_lengths(lengths, limit: int | None, extra: int) -> list[int]:
    """``True``/``"default"`` -> :data:`DEFAULT_LENGTHS` clamped to ``limit - extra`` (the model's positions less the
    answer tokens); a sequence -> those lengths, each checked against the limit (too long -> KVCompressError);
    ``()``/None/False/0 -> no RULER."""
    if lengths is None or lengths is False:
        return []
    if lengths is True or lengths == "default":
        cap = None if limit is None else limit - extra
        return sorted({n if cap is None else min(n, cap) for n in DEFAULT_LENGTHS})
    if isinstance(lengths, int):
        lengths = (lengths,)
    out = set()
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise KVCompressError(f"RULER context length must be an integer >= 0, got {n!r}")
        if n and limit is not None and n + extra > limit:
            raise KVCompressError(
                f"RULER context {n} + {extra} answer tokens exceeds the model's maximum of {limit} positions "
                f"(longest possible: {limit - extra})"
            )
        if n:
            out.add(n)
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------------
# Running one method
# --------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def answer(model, cache, task: RulerTask, mode: str, tokenizer, eos_ids: set[int]) -> list[int]:
    """Greedy answer tokens for ``task`` through ``cache``: at most ``task.max_new_tokens``, stopping at EOS or as soon
    as every expected string is in the output and closed by a delimiter (more text could only add matches, so this
    changes no score).
    Prefill ``(1, length)`` (aware) or ``(1, len(context))`` then the question one token at a time (agnostic)."""
    kw = cache_kwargs(model, cache)
    if mode == "aware":
        logits = model(input_ids=torch.tensor([task.input_ids]), **kw, use_cache=True, logits_to_keep=1).logits[0, -1]
    elif mode == "agnostic":
        logits = model(input_ids=torch.tensor([task.context_ids]), **kw, use_cache=True, logits_to_keep=1).logits[0, -1]
        for tok in task.question_ids:
            logits = model(input_ids=torch.tensor([[tok]]), **kw, use_cache=True).logits[0, -1]
    else:
        raise KVCompressError(f"RULER mode must be one of {MODES}, got {mode!r}")
    out: list[int] = []
    while len(out) < task.max_new_tokens:
        nxt = int(logits.argmax())
        if nxt in eos_ids:
            break
        out.append(nxt)
        if len(out) == task.max_new_tokens or _complete(tokenizer.decode(out, skip_special_tokens=True), task.answers):
            break
        logits = model(input_ids=torch.tensor([[nxt]]), **kw, use_cache=True).logits[0, -1]
    return out


def _complete(text: str, answers) -> bool:
    """Every answer is in ``text`` and no more text can change that: the text ends in a non-alphanumeric character
    (an answer at the very end could still grow into a longer word or number, which would not count)."""
    return bool(text) and not text[-1].isalnum() and score(text, answers) == 1.0


def run_task(model, tokenizer, spec, task: RulerTask, mode: str) -> dict:
    """One task, one mode, a fresh cache of ``spec``. Returns ``{"family", "context_len", "length", "index", "mode",
    "answers", "generated", "score", "bytes_ratio"}``."""
    from .needle import _eos_ids

    with spec.make(model) as cache:
        tokens = answer(model, cache, task, mode, tokenizer, _eos_ids(tokenizer))
        ratio = cache.memory_report().ratio
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {
        "family": task.family,
        "context_len": task.context_len,
        "length": task.length,
        "index": task.index,
        "mode": mode,
        "answers": list(task.answers),
        "generated": text,
        "score": score(text, task.answers),
        "bytes_ratio": ratio,
    }

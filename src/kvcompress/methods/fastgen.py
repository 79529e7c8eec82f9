"""``fastgen``: adaptive per-head KV eviction (Ge et al., ICLR 2024, "Model Tells You What to Discard").

At the prompt, each KV head's attention map (pooled over its query heads) picks the cheapest hybrid policy
(special < +punct < +frequent < +local < full) whose recovery reaches ``T`` (``recovery``), see
:mod:`.fastgen_policies`. The policy is then applied at the prompt and at every decode step: a new token is kept
if the head's policy keeps it (special/punct by token id; local = the ``ceil(r_l * n)`` most recent tokens;
frequent = the ``ceil(r_f * n)`` tokens with the largest cumulative attention, updated with every step's
probabilities), and held tokens that fall out of every kept set are dropped.

Storage is ragged and really freed: per layer one flat buffer ``(tokens held over all rows and heads, head_dim)``
for K and one for V (2-byte floats), row-major over ``(batch row, kv head)``, with the per-head counts as Python
ints (like ``seen``). Per-token metadata is held only where some head of the layer needs it: the position
(int32, local), the cumulative attention (fp32, frequent) and a protected flag (bool: kept as special/punct).
The layers attend by themselves (kvcompress's attention path): each head's past is masked to the slots it holds,
and the step's probabilities (frequent policy) come from that same attention.

Token classes: ``special`` = ``tokenizer.all_special_ids``; ``punct`` = tokens whose decoded text (whitespace
stripped) is only Unicode ``P*`` characters (:func:`.fastgen_policies.punctuation_ids`). The tokenizer is the
``tokenizer`` option (object or name/path), else the model's own (``config._name_or_path`` through
``kvcompress.models.resolve``); ``special_ids``/``punct_ids`` override it. Policies without special/punct
(``policy="local+frequent"``...) need no tokenizer. Batch > 1: each row is profiled on its own real tokens
(left padding is never stored). Sliding-window layers (Gemma-3) keep their plain window (``sliding_layer``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..attention.interface import inner_of
from ..cache import KVLayer, Method
from ..config import check_positive_int, check_ratio
from ..registry import KVCompressError, register
from .fastgen_policies import (
    FREQUENT,
    FULL,
    LOCAL,
    PUNCT,
    SPECIAL,
    choose,
    column_stats,
    local_window,
    parse_policy,
    prompt_keep,
    punctuation_ids,
    recoveries,
    topk_mask,
)
from .fastgen_hooks import FastGenHooks, StepInputs


def _check_ids(value, name: str):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise KVCompressError(f"fastgen: {name} must be a list of token ids (ints >= 0), got {value!r}")
    return tuple(value)


@register("fastgen")
class FastGen(Method):
    summary = "adaptive per-head eviction: profile the prompt, keep special/punct/frequent/local/full per KV head"
    attention = "kvcompress: ragged per-head past (each head masked to what it holds), probabilities from it"
    test_options = {"recovery": 0.6, "special_ids": (0,), "punct_ids": (1, 2, 3)}
    noop_options = {"recovery": 1.0}

    @dataclass(frozen=True)
    class Config:
        recovery: float = 0.95  # T in (0, 1]: each head keeps the cheapest hybrid recovering >= T of its attention
        local: float = 0.3  # r_l in (0, 1): the local policy keeps the ceil(r_l * length) most recent tokens
        frequent: float = 0.3  # r_f in (0, 1): the frequent policy keeps ceil(r_f * length) top cumulative-attention tokens
        policy: str = "adaptive"  # adaptive | one policy forced on every head: local, frequent, local+frequent, full...
        tokenizer: object = None  # tokenizer (object or name/path) for special/punct ids; None = the model's own
        special_ids: tuple | None = None  # explicit special token ids (override the tokenizer's)
        punct_ids: tuple | None = None  # explicit punctuation token ids (override the tokenizer's)
        chunk: int = 256  # prompt queries per profiling chunk (transient map: kv_heads x group x chunk x length)
        local_always: bool = False  # refinement (not the paper): adaptive heads choose only among hybrids with local

        def __post_init__(self):
            check_ratio(self.recovery, "recovery", "fastgen", high_open=False)
            check_ratio(self.local, "local", "fastgen")
            check_ratio(self.frequent, "frequent", "fastgen")
            parse_policy(self.policy)
            check_positive_int(self.chunk, "chunk", "fastgen")
            if not isinstance(self.local_always, bool):
                raise KVCompressError(f"fastgen: local_always must be True or False, got {self.local_always!r}")
            object.__setattr__(self, "special_ids", _check_ids(self.special_ids, "special_ids"))
            object.__setattr__(self, "punct_ids", _check_ids(self.punct_ids, "punct_ids"))
            tok = self.tokenizer
            if tok is not None and not isinstance(tok, str) and not hasattr(tok, "all_special_ids"):
                raise KVCompressError(f"fastgen: tokenizer must be a tokenizer object or a name/path, got {type(tok).__name__}")

    # -- config vs model --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        text_cfg = self.model.config.get_text_config(decoder=True)
        if getattr(text_cfg, "attn_logit_softcapping", None):
            raise KVCompressError("fastgen: models with attention logit softcapping are not supported")
        impl = inner_of(self.model)
        if impl not in ("sdpa", "eager"):
            raise KVCompressError(f"fastgen runs on sdpa or eager attention; this model uses {impl!r}")
        self.forced = parse_policy(self.config.policy)
        self.tokens = self._token_classes(text_cfg.vocab_size) if self._needs_tokens() else None

    def _needs_tokens(self) -> bool:
        if self.forced is None:
            return self.config.recovery < 1.0
        return bool(self.forced & (SPECIAL | PUNCT)) and not self.forced & FULL

    def _token_classes(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        special, punct = cfg.special_ids, cfg.punct_ids
        if special is None or punct is None:
            tok = self._tokenizer()
            special = special if special is not None else tuple(tok.all_special_ids)
            punct = punct if punct is not None else tuple(punctuation_ids(tok))
        bad = [i for i in (*special, *punct) if i >= vocab]
        if bad:
            raise KVCompressError(f"fastgen: token ids {bad[:5]} are outside the model's vocabulary ({vocab})")
        uses = SPECIAL | PUNCT if self.forced is None else self.forced
        if uses & SPECIAL and not special:
            raise KVCompressError(
                "fastgen: no special token ids (the tokenizer defines none); pass special_ids=[...] or force a "
                "policy without 'special' (e.g. policy='local+frequent')"
            )
        if uses & PUNCT and not punct:
            raise KVCompressError("fastgen: no punctuation token ids; pass punct_ids=[...] or a policy without 'punct'")
        as_ids = lambda ids: torch.tensor(sorted(set(ids)), dtype=torch.int32)  # noqa: E731
        return as_ids(special), as_ids(punct)

    def _tokenizer(self):
        tok = self.config.tokenizer
        if tok is not None and not isinstance(tok, str):
            return tok
        name = tok or str(getattr(self.model.config, "_name_or_path", "") or "")
        try:
            from transformers import AutoTokenizer

            from ..models import resolve

            return AutoTokenizer.from_pretrained(str(resolve(name, progress=False)))
        except (KVCompressError, OSError, ValueError) as exc:
            raise KVCompressError(
                "fastgen needs special and punctuation token ids: make_cache('fastgen', model, tokenizer=tok) or "
                f"special_ids=[...], punct_ids=[...] (could not load a tokenizer for {name!r}: {exc})"
            ) from exc

    # -- layers and hooks -------------------------------------------------------------------------------------------
    def build_layers(self, cache):
        self.inputs = StepInputs(self.tokens)
        return super().build_layers(cache)

    def make_layer(self, layer_idx: int) -> KVLayer:
        if self.geometry.is_sliding(layer_idx):
            return self.sliding_layer(layer_idx)
        return FastGenLayer(self.geometry, layer_idx, self.config, self.forced, self.tokens, self.inputs)

    def install_hooks(self, cache):
        return FastGenHooks(self.model, cache, self.inputs)

    def shared_tensors(self) -> list[torch.Tensor]:
        """The special and punctuation id sets (int32), held once per cache."""
        return list(self.tokens) if self.tokens is not None else []

    def describe(self) -> str:
        def show(name):
            value = getattr(self.config, name)
            return type(value).__name__ if name == "tokenizer" and value is not None and not isinstance(value, str) else repr(value)

        return f"{self.name}(" + ", ".join(f"{f.name}={show(f.name)}" for f in dataclasses.fields(self.config)) + ")"


# --------------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------------


class _Layout:
    """Where each (row, head)'s held tokens sit in the zero-padded ``(rows, lmax)`` view of a flat buffer."""

    def __init__(self, lengths: list[int], device):
        self.lmax = max(lengths, default=0)
        self.lengths = torch.tensor(lengths, device=device)  # (rows,)
        self.dense = all(n == self.lmax for n in lengths)
        self.held = torch.arange(self.lmax, device=device)[None] < self.lengths[:, None]  # (rows, lmax)
        self.index = None if self.dense else self.held.view(-1).nonzero().squeeze(1)

    def padded(self, flat: torch.Tensor, fill=0) -> torch.Tensor:
        """``flat (held, ...)`` -> ``(rows, lmax, ...)``, slots past a head's length set to ``fill``."""
        rows, tail = self.lengths.shape[0], flat.shape[1:]
        if self.dense:
            return flat.view(rows, self.lmax, *tail)
        out = flat.new_full((rows * self.lmax, *tail), fill)
        return out.index_copy_(0, self.index, flat).view(rows, self.lmax, *tail)


@dataclass
class _Pending:
    """What ``_gather`` handed to attention, waiting for ``_after_attention``."""

    prefill: bool
    k: torch.Tensor  # (batch, kv_heads, slots, d) storage dtype: the prompt, or [padded past | new]
    v: torch.Tensor
    ids: torch.Tensor  # (batch, q) token ids of the new tokens
    real: torch.Tensor  # (batch, q) bool, False = padding
    layout: _Layout | None  # of the held past tokens (None at the prompt)


class FastGenLayer(KVLayer):
    """Per-(row, KV head) ragged storage; see the module docstring. Attends by itself: the held past zero-padded to
    the longest head with each head's slots beyond its length masked, then the step's new tokens (causal, padding
    masked)."""

    attends = True

    def __init__(self, geometry, layer_idx, config, forced, tokens, inputs: StepInputs):
        super().__init__(geometry, layer_idx)
        self.cfg, self.forced, self.tokens, self.inputs = config, forced, tokens, inputs
        self.k: torch.Tensor | None = None  # (held tokens, head_dim)
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (held,) int32 position among the row's real tokens (local)
        self.score: torch.Tensor | None = None  # (held,) fp32 cumulative attention (frequent)
        self.prot: torch.Tensor | None = None  # (held,) bool kept as special/punct (never evicted)
        self.lengths: list[int] = []  # held tokens per (row, kv head), row-major
        self.policies: list[int] = []  # policy bit flags per (row, kv head)
        self.n_real: list[int] = []  # real (non-padding) tokens seen per row
        self.recoveries: torch.Tensor | None = None  # (batch, kv_heads, 5) recovery of each hybrid at the prompt
        self.profile_seconds = 0.0  # time spent profiling and compressing the prompt
        self._gathered: _Pending | None = None  # this step's [past | new] between _gather and _after_attention

    # -- store / attention / evict ----------------------------------------------------------------------------------
    def attend_step(self, query, keys, values, new_valid, scaling):
        from ..attention import KVPart, attend_parts

        k, v = self._gather(keys, values)
        pend, q = self._gathered, keys.shape[2]
        b, kv, past = k.shape[0], k.shape[1], k.shape[2] - q
        parts = []
        if past:
            held = None if pend.layout.dense else pend.layout.held.view(b, kv, past)
            parts.append(KVPart.dense(k[:, :, :past], v[:, :, :past], held))
        new = None if pend.real.all() else pend.real[:, None, :]
        parts.append(KVPart.dense(k[:, :, past:], v[:, :, past:], new, causal=True))
        needs_probs = not pend.prefill and any(p & FREQUENT and not p & FULL for p in self.policies)
        result = attend_parts(query, parts, scaling, probs_last=q if needs_probs else 0)
        self._after_attention(query, k, result.probs, scaling)
        return result.output, result.transient_bytes

    def _gather(self, key_states, value_states):
        """``(b, kv, q, d)`` new K/V -> ``[held past zero-padded to the longest head | new]`` in the storage dtype,
        returned in the compute dtype; remembered until :meth:`_after_attention`."""
        ids, real = self.inputs.get(key_states.shape[-2])
        sd = self.geometry.storage_dtype
        k, v = key_states.to(sd), value_states.to(sd)
        layout = None
        if self.seen:
            layout = _Layout(self.lengths, k.device)
            b, kv, _, d = k.shape
            k = torch.cat([layout.padded(self.k).view(b, kv, layout.lmax, d), k], dim=2)
            v = torch.cat([layout.padded(self.v).view(b, kv, layout.lmax, d), v], dim=2)
        self._gathered = _Pending(self.seen == 0, k, v, ids, real, layout)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def _after_attention(self, query, key, weights, scaling: float) -> None:
        """After this step's attention: profile + compress the prompt, or apply the policies to a step (``weights
        (b, kv, group, q, slots)``: the step's probabilities when a head follows the frequent policy)."""
        pend, self._gathered = self._gathered, None
        if pend.prefill:
            t0 = time.perf_counter()
            with torch.no_grad():
                self._compress_prompt(pend, query, key, scaling)
            self.profile_seconds += time.perf_counter() - t0
        else:
            with torch.no_grad():
                self._step(pend, weights)

    def _compress_prompt(self, pend: _Pending, query, key, scaling) -> None:
        cfg, kv = self.cfg, self.geometry.num_kv_heads
        adaptive = self.forced is None
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("k", "v", "pos", "score", "prot")}
        recs, self.lengths, self.policies, self.n_real = [], [], [], []
        for r in range(self.batch_size):
            idx = pend.real[r].nonzero().squeeze(1)
            n = idx.numel()
            special, punct = (c[r, idx] for c in self.inputs.classes())
            colsum = None
            if adaptive and cfg.recovery >= 1.0:
                pols = [FULL] * kv
            elif adaptive or self.forced & FREQUENT:
                colsum, bandcol = column_stats(query[r][:, idx], key[r][:, idx], scaling, cfg.local, cfg.chunk, band=adaptive)
                if adaptive:
                    recs.append(recoveries(colsum, bandcol, special, punct, cfg.frequent))
                pols = choose(recs[-1], cfg.recovery, cfg.local_always) if adaptive else [self.forced] * kv
            else:
                pols = [self.forced] * kv
            keep, prot = prompt_keep(pols, special, punct, colsum, cfg.local, cfg.frequent)
            all_kept = bool(keep.all()) and n == pend.k.shape[2]
            parts["k"].append(pend.k[r].reshape(-1, pend.k.shape[-1]) if all_kept else pend.k[r][:, idx][keep])
            parts["v"].append(pend.v[r].reshape(-1, pend.v.shape[-1]) if all_kept else pend.v[r][:, idx][keep])
            parts["pos"].append(torch.arange(n, dtype=torch.int32, device=idx.device).expand(kv, n)[keep])
            parts["score"].append(colsum[keep] if colsum is not None else torch.zeros(int(keep.sum()), device=idx.device))
            parts["prot"].append(prot[keep])
            self.lengths += keep.sum(dim=1).tolist()
            self.policies += pols
            self.n_real.append(n)
        cat = lambda name: parts[name][0] if len(parts[name]) == 1 else torch.cat(parts[name])  # noqa: E731
        self.k, self.v = cat("k"), cat("v")
        self._set_metadata(cat("pos"), cat("score"), cat("prot"))
        self.recoveries = torch.stack(recs).view(self.batch_size, kv, -1) if recs else None

    def _set_metadata(self, pos, score, prot) -> None:
        """Hold per-token metadata only where some head of the layer needs it."""
        dynamic = [p for p in self.policies if not p & FULL]
        self.pos = pos if any(p & LOCAL for p in dynamic) else None
        self.score = score if any(p & FREQUENT for p in dynamic) else None
        self.prot = prot if any(p & (LOCAL | FREQUENT) for p in dynamic) else None

    def _step(self, pend: _Pending, weights) -> None:
        """Apply each head's policy after a decode step: ``pend.k`` is ``[padded past | q new]``."""
        b, kv, slots, d = pend.k.shape
        q, rows, lay = pend.ids.shape[1], b * kv, pend.layout
        past = slots - q
        real = pend.real.repeat_interleave(kv, dim=0) if b > 1 else pend.real.expand(kv, q)  # (rows, q)
        n_before = self.n_real
        self.n_real = [n + q for n in n_before] if self.inputs.all_real else [n + int(s) for n, s in zip(n_before, pend.real.sum(1))]
        pos = score = prot = None
        if all(p & FULL for p in self.policies):
            keep = None if self.inputs.all_real and lay.dense else torch.cat([lay.held, real], dim=1)
        else:
            dev = pend.k.device
            valid = torch.cat([lay.held, real], dim=1)
            bits = torch.tensor(self.policies, device=dev)[:, None]
            has = lambda flag: (bits & flag).bool()  # noqa: E731
            special, punct = (c.repeat_interleave(kv, dim=0) for c in self.inputs.classes())
            prot_past = lay.padded(self.prot, False) if self.prot is not None else lay.held
            prot = torch.cat([prot_past, (special & has(SPECIAL)) | (punct & has(PUNCT))], dim=1)
            keep = has(FULL) | prot
            n_after = torch.tensor(self.n_real, device=dev).repeat_interleave(kv)
            if self.pos is not None:
                pos_new = torch.tensor(n_before, device=dev).repeat_interleave(kv)[:, None] + real.cumsum(dim=1) - 1
                pos = torch.cat([lay.padded(self.pos).long(), pos_new], dim=1)
                keep |= has(LOCAL) & (pos >= (n_after - local_window(n_after, self.cfg.local))[:, None])
            if self.score is not None:
                w = weights.float().view(b, kv, -1, q, slots)
                if not self.inputs.all_real:
                    w = w * pend.real[:, None, None, :, None]
                gained = w.mean(dim=2).sum(dim=2).reshape(rows, slots)
                score = torch.cat([lay.padded(self.score), gained.new_zeros(rows, q)], dim=1) + gained
                top = topk_mask(score.masked_fill(~valid, float("-inf")), local_window(n_after, self.cfg.frequent))
                keep |= has(FREQUENT) & top
            keep &= valid
        flat_k, flat_v = pend.k.view(rows * slots, d), pend.v.view(rows * slots, d)
        if keep is None:  # every head full and no padding: plain append (pend.k is [past | new] already)
            self.k, self.v = flat_k, flat_v
            self.lengths = [n + q for n in self.lengths]
            return
        index = keep.view(-1).nonzero().squeeze(1)
        self.k, self.v = flat_k.index_select(0, index), flat_v.index_select(0, index)
        self.lengths = keep.sum(dim=1).tolist()
        take = lambda t: None if t is None else t.reshape(-1).index_select(0, index)  # noqa: E731
        self.pos = take(pos.int() if pos is not None else None)
        self.score, self.prot = take(score), (take(prot) if self.prot is not None else None)

    # -- accounting -------------------------------------------------------------------------------------------------
    def kept_length(self) -> int:
        return max(self.lengths, default=0)

    def held_tensors(self):
        return [self.k, self.v, self.pos, self.score, self.prot, self.recoveries]

    def head_policies(self) -> list[list[int]]:
        """Policy bit flags per batch row and KV head (after the prompt)."""
        kv = self.geometry.num_kv_heads
        return [self.policies[r * kv : (r + 1) * kv] for r in range(len(self.policies) // kv)]

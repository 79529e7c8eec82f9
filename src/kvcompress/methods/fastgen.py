"""``fastgen``: adaptive per-head KV eviction (Ge et al., ICLR 2024, "Model Tells You What to Discard").

At the prompt, each KV head's attention map (pooled over its query heads) picks the cheapest hybrid policy
(special < +punct < +frequent < +local < full) whose recovery reaches ``T`` (``recovery``), see
:mod:`.fastgen_policies`. The policy is then applied at the prompt and at every decode step: a new token is kept
if the head's policy keeps it (special/punct by token id; local = the ``ceil(r_l * n)`` most recent tokens;
frequent = the ``ceil(r_f * n)`` tokens with the largest cumulative attention, updated with every step's
probabilities), and held tokens that fall out of every kept set are dropped.

Storage is ragged and really freed: per layer one flat buffer ``(slots, head_dim)`` for K and one for V (2-byte
floats), one region of slots per ``(batch row, kv head)``, row-major, with the per-head counts as Python ints (like
``seen``). A decode step works in place: an evicted token's slot is marked free, a kept new token goes to its
region's next slot; the past is never copied per step. When a region runs out of slots the buffers are rebuilt
(the held tokens copied in order, the freed slots dropped, every region getting about 1/32 spare slots, counted in
``nbytes()``; see :class:`FastGenLayer`). Per-token metadata is held only where some head of the layer needs it:
the position (int32, local), the cumulative attention (fp32, frequent), a protected flag (bool: kept as
special/punct) and a held flag (bool: heads that evict). The layers attend by themselves (kvcompress's attention
path): each head's held past, in token order, masked to its length, and the step's probabilities (frequent policy)
come from that same attention.

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
    def prepare(self) -> None:
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
            # a tokenizer may define special tokens the model has no embedding for (transformers 5.2 gives SmolLM2's
            # GGUF tokenizer five code-infilling tokens past its vocabulary): they can never be in the cache
            special = special if special is not None else tuple(i for i in tok.all_special_ids if i < vocab)
            punct = punct if punct is not None else tuple(i for i in punctuation_ids(tok) if i < vocab)
        bad = [i for i in (*special, *punct) if i >= vocab]  # ids the user gave
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


def _headroom(n: int) -> int:
    """Spare slots a region holding ``n`` tokens gets when the buffers are rebuilt: ``4 + n // 32`` (the share of
    :class:`kvcompress.storage.GrowingTokens`). A region that gains a slot per step (a new token kept, or one kept
    while an older one is evicted) is rebuilt every ~n/32 steps: the past is never copied per step, and the slack,
    counted in ``nbytes()``, stays near 1/32."""
    return 4 + n // 32


class FastGenLayer(KVLayer):
    """Per-(row, KV head) ragged storage; see the module docstring. Attends by itself: the held past (gathered
    region by region in token order, each head's slots beyond its length masked), then the step's new tokens
    (causal, padding masked).

    Growth without copying the past: the flat buffers ``k``/``v`` ``(capacity, head_dim)`` (and the metadata
    ``pos``/``score``/``prot``/``alive`` ``(capacity,)``) hold one region per (row, KV head), row-major: region
    ``i`` is slots ``[offsets[i], offsets[i] + caps[i])``; its first ``used[i]`` slots hold tokens in token order,
    of which ``lengths[i]`` are held (``alive``; an evicted token's slot is only marked, never moved). A decode step
    writes in place: evictions clear ``alive``, kept new tokens go to the next free slots. Only when a region runs
    out of slots are the buffers rebuilt: the held tokens copied in order (dropping the evicted slots), every region
    getting ``_headroom`` spare slots (counted in ``nbytes()``). Attention and the policies see exactly what they
    saw when the layer rebuilt a compact buffer every step (the held tokens of each head in token order), so the
    results are the same."""

    attends = True

    def __init__(self, geometry, layer_idx, config, forced, tokens, inputs: StepInputs):
        super().__init__(geometry, layer_idx)
        self.cfg, self.forced, self.tokens, self.inputs = config, forced, tokens, inputs
        self.k: torch.Tensor | None = None  # (capacity, head_dim) storage dtype, every region
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (capacity,) int32 position among the row's real tokens (local)
        self.score: torch.Tensor | None = None  # (capacity,) fp32 cumulative attention (frequent)
        self.prot: torch.Tensor | None = None  # (capacity,) bool kept as special/punct (never evicted)
        self.alive: torch.Tensor | None = None  # (capacity,) bool slot holds a kept token (held where heads evict)
        self.lengths: list[int] = []  # held tokens per (row, kv head), row-major
        self.used: list[int] = []  # slots used per region (held tokens + evicted ones not yet dropped)
        self.caps: list[int] = []  # slots per region
        self.offsets: torch.Tensor | None = None  # (rows,) int64 first slot of each region
        self.rebuilds = 0  # times the buffers were rebuilt after the prompt (a region ran out of slots)
        self.policies: list[int] = []  # policy bit flags per (row, kv head)
        self.n_real: list[int] = []  # real (non-padding) tokens seen per row
        self.recoveries: torch.Tensor | None = None  # (batch, kv_heads, 5) recovery of each hybrid at the prompt
        self.profile_seconds = 0.0  # time spent profiling and compressing the prompt

    # -- attention ----------------------------------------------------------------------------------------------------
    def attend_step(self, query, keys, values, new_valid, scaling):
        """``query (b, heads, q, d)``, new ``keys``/``values (b, kv, q, d)``: attend over the held past and the new
        tokens, then profile + compress the prompt, or apply the policies to the step."""
        from ..attention import KVPart, attend_parts

        q = keys.shape[2]
        ids, real = self.inputs.get(q)
        sd = self.geometry.storage_dtype
        nk, nv = keys.to(sd), values.to(sd)  # (b, kv, q, d): what the cache holds of the new tokens
        prefill = self.tokens_seen == 0
        lmax = 0 if prefill else max(self.lengths, default=0)
        slots = self._held_slots(lmax) if lmax else None
        parts = [self._past_part(keys.shape[0], keys.shape[1], lmax, slots)] if lmax else []
        new = None if real.all() else real[:, None, :]
        nk_c, nv_c = nk.to(keys.dtype), nv.to(values.dtype)
        parts.append(KVPart.dense(nk_c, nv_c, new, causal=True))
        needs_probs = not prefill and any(p & FREQUENT and not p & FULL for p in self.policies)
        result = attend_parts(query, parts, scaling, probs_last=q if needs_probs else 0)
        with torch.no_grad():
            if prefill:
                t0 = time.perf_counter()
                self._compress_prompt(real, nk, nv, query, nk_c, scaling)
                self.profile_seconds += time.perf_counter() - t0
            else:
                self._step(real, nk, nv, lmax, slots, result.probs)
        return result.output, result.transient_bytes

    def _held_slots(self, lmax: int) -> torch.Tensor:
        """``(rows, lmax)`` int64: the flat slot of each head's ``j``-th held token in token order (``j <
        lengths[i]``; further entries point at some slot of the buffer, masked)."""
        dev = self.offsets.device
        last = self.k.shape[0] - 1
        if self.alive is None or self.used == self.lengths:  # no evicted slot: the first lengths[i] slots
            return (self.offsets[:, None] + torch.arange(lmax, device=dev)[None]).clamp_(max=last)
        umax = max(self.used)
        cols = torch.arange(umax, device=dev)[None]
        region = (self.offsets[:, None] + cols).clamp_(max=last)
        held = self.alive[region] & (cols < torch.tensor(self.used, device=dev)[:, None])  # (rows, umax)
        r, s = held.nonzero(as_tuple=True)
        rank = held.cumsum(dim=1)[r, s] - 1
        out = torch.full((len(self.used), lmax), last, dtype=torch.long, device=dev)
        out[r, rank] = self.offsets[r] + s
        return out

    def _past_part(self, b: int, kv: int, lmax: int, slots: torch.Tensor):
        """The held past as one attention part of ``lmax`` slots per head, each head's tokens in token order:
        ``read(start, stop)`` gathers entries ``[start, stop)`` of ``slots (rows, lmax)`` into ``(b, kv, stop - start,
        d)`` (a transient of the chunk); a head's entries beyond its length are masked (``valid (b, kv, lmax)``, None
        when every head holds ``lmax``)."""
        from ..attention import KVPart

        k, v, d = self.k, self.v, self.k.shape[1]
        valid = None
        if any(n != lmax for n in self.lengths):
            lengths = torch.tensor(self.lengths, device=k.device)
            valid = (torch.arange(lmax, device=k.device)[None] < lengths[:, None]).view(b, kv, lmax)

        def read(start, stop, dtype):
            idx, n = slots[:, start:stop].reshape(-1), stop - start
            return k[idx].view(b, kv, n, d).to(dtype), v[idx].view(b, kv, n, d).to(dtype)

        return KVPart(lmax, read, valid, kind="fastgen", kv_heads=kv)

    # -- the prompt ---------------------------------------------------------------------------------------------------
    def _compress_prompt(self, real, nk, nv, query, key, scaling) -> None:
        """Profile each row's real prompt tokens and keep what its heads' policies keep: ``real (b, n)`` bool,
        ``nk``/``nv (b, kv, n, d)`` the prompt in the storage dtype, ``key`` the same in the compute dtype."""
        cfg, kv = self.cfg, self.geometry.num_kv_heads
        adaptive = self.forced is None
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("k", "v", "pos", "score", "prot")}
        recs, lengths, self.policies, self.n_real = [], [], [], []
        for r in range(self.batch_size):
            idx = real[r].nonzero().squeeze(1)
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
            all_kept = bool(keep.all()) and n == nk.shape[2]
            parts["k"].append(nk[r].reshape(-1, nk.shape[-1]) if all_kept else nk[r][:, idx][keep])
            parts["v"].append(nv[r].reshape(-1, nv.shape[-1]) if all_kept else nv[r][:, idx][keep])
            parts["pos"].append(torch.arange(n, dtype=torch.int32, device=idx.device).expand(kv, n)[keep])
            parts["score"].append(colsum[keep] if colsum is not None else torch.zeros(int(keep.sum()), device=idx.device))
            parts["prot"].append(prot[keep])
            lengths += keep.sum(dim=1).tolist()
            self.policies += pols
            self.n_real.append(n)
        cat = lambda name: parts[name][0] if len(parts[name]) == 1 else torch.cat(parts[name])  # noqa: E731
        # what some head of the layer needs: the position (local), the cumulative attention (frequent), the
        # protected flag and the held flag of a slot (heads that evict: local or frequent)
        dynamic = [p for p in self.policies if not p & FULL]
        evicts = any(p & (LOCAL | FREQUENT) for p in dynamic)
        prot_all = cat("prot")
        held = {"k": cat("k"), "v": cat("v"),
                "pos": cat("pos") if any(p & LOCAL for p in dynamic) else None,
                "score": cat("score") if any(p & FREQUENT for p in dynamic) else None,
                "prot": prot_all if evicts else None,
                "alive": torch.ones_like(prot_all) if evicts else None}
        self.lengths, self.used = lengths, list(lengths)
        self._rebuild(lengths, held, spare=False)  # exact after the prompt
        self.recoveries = torch.stack(recs).view(self.batch_size, kv, -1) if recs else None

    def _rebuild(self, needed: list[int], buffers: dict, spare: bool = True) -> None:
        """Allocate the buffers with ``needed[i]`` slots for region ``i``, plus ``_headroom(needed[i])`` with
        ``spare`` (zeros: a masked slot must hold finite values), and copy each region's held tokens, in order, to
        the start of its new region. ``buffers``: ``{name: (slots, ...) tensor or None}`` laid out by ``offsets`` and
        ``used`` (or, at the prompt, compact: region after region, ``lengths[i]`` each, all held)."""
        dev = buffers["k"].device
        caps = [n + _headroom(n) if spare else n for n in needed]
        offsets = torch.tensor([0] + caps[:-1], dtype=torch.long, device=dev).cumsum(0)
        if self.offsets is None:  # the prompt: compact
            src = torch.arange(buffers["k"].shape[0], device=dev)
        else:
            lmax = max(self.lengths, default=0)
            slots = self._held_slots(lmax)
            src = slots[torch.arange(lmax, device=dev)[None] < torch.tensor(self.lengths, device=dev)[:, None]]
        counts = torch.tensor(self.lengths, dtype=torch.long, device=dev)
        region = torch.arange(len(caps), device=dev).repeat_interleave(counts)
        within = torch.arange(region.numel(), device=dev) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        dst = offsets[region] + within
        for name, old in buffers.items():
            if old is None:
                setattr(self, name, None)
                continue
            new = old.new_zeros((sum(caps), *old.shape[1:]))
            new[dst] = old[src]
            setattr(self, name, new)
        self.caps, self.offsets, self.used = caps, offsets, list(self.lengths)

    # -- a decode step ------------------------------------------------------------------------------------------------
    def _step(self, real, nk, nv, lmax: int, slots: torch.Tensor, weights) -> None:
        """Apply each head's policy after a decode step: ``real (b, q)`` bool, ``nk``/``nv (b, kv, q, d)`` the new
        tokens in the storage dtype, ``lmax`` past tokens attended per head, ``slots (rows, lmax)`` where they are
        (:meth:`_held_slots`), ``weights (b, kv, group, q, lmax + q)`` the step's probabilities (when a head follows
        the frequent policy). The keep decision is made over the ``(rows, lmax + q)`` view [held past in token order
        | new tokens] (metadata only), then applied in place."""
        b, kv, q, d = nk.shape
        rows, dev = b * kv, nk.device
        width = lmax + q
        lengths = torch.tensor(self.lengths, device=dev)
        held = torch.arange(lmax, device=dev)[None] < lengths[:, None]  # (rows, lmax)
        real_rows = real.repeat_interleave(kv, dim=0) if b > 1 else real.expand(kv, q)  # (rows, q)
        n_before = self.n_real
        self.n_real = [n + q for n in n_before] if self.inputs.all_real else [n + int(s) for n, s in zip(n_before, real.sum(1))]
        valid = torch.cat([held, real_rows], dim=1)  # (rows, width)
        pos = score = prot = None
        if all(p & FULL for p in self.policies):
            keep = valid
        else:
            bits = torch.tensor(self.policies, device=dev)[:, None]
            has = lambda flag: (bits & flag).bool()  # noqa: E731
            special, punct = (c.repeat_interleave(kv, dim=0) for c in self.inputs.classes())
            prot_past = self.prot[slots] & held if self.prot is not None else held
            prot = torch.cat([prot_past, (special & has(SPECIAL)) | (punct & has(PUNCT))], dim=1)
            keep = has(FULL) | prot
            n_after = torch.tensor(self.n_real, device=dev).repeat_interleave(kv)
            if self.pos is not None:
                pos_new = torch.tensor(n_before, device=dev).repeat_interleave(kv)[:, None] + real_rows.cumsum(dim=1) - 1
                pos = torch.cat([self.pos[slots].long(), pos_new], dim=1)
                keep |= has(LOCAL) & (pos >= (n_after - local_window(n_after, self.cfg.local))[:, None])
            if self.score is not None:
                w = weights.float().view(b, kv, -1, q, width)
                if not self.inputs.all_real:
                    w = w * real[:, None, None, :, None]
                gained = w.mean(dim=2).sum(dim=2).reshape(rows, width)
                score = torch.cat([self.score[slots] * held, gained.new_zeros(rows, q)], dim=1) + gained
                top = topk_mask(score.masked_fill(~valid, float("-inf")), local_window(n_after, self.cfg.frequent))
                keep |= has(FREQUENT) & top
                self.score[slots[held]] = score[:, :lmax][held]  # every held token's score grew, in place
            keep &= valid
        self._apply(keep, lmax, slots, held, nk.reshape(rows * q, d), nv.reshape(rows * q, d), pos, score, prot)

    def _apply(self, keep, lmax: int, slots, held, new_k, new_v, pos, score, prot) -> None:
        """Hold exactly the kept tokens: ``keep (rows, lmax + q)`` bool over [held past | new tokens]; ``slots``,
        ``held (rows, lmax)`` where the past is and which entries are tokens; ``new_k``/``new_v (rows * q, d)``;
        ``pos``/``score``/``prot (rows, lmax + q)`` the metadata (None where not held). Evicted tokens are marked in
        ``alive``; the kept new tokens are written to each region's next free slots (the buffers rebuilt first when
        a region has too few). Copies only the new tokens, in place."""
        q, dev = keep.shape[1] - lmax, keep.device
        if self.alive is not None and lmax:
            evicted = held & ~keep[:, :lmax]
            self.alive[slots[evicted]] = False
        lengths = keep.sum(dim=1).tolist()
        kept_new = keep[:, lmax:]  # (rows, q)
        gained = kept_new.sum(dim=1).tolist()
        if any(u + g > c for u, g, c in zip(self.used, gained, self.caps)):
            self.lengths = [n - g for n, g in zip(lengths, gained)]  # the past tokens still held
            names = ("k", "v", "pos", "score", "prot", "alive")
            self._rebuild(lengths, {n: getattr(self, n) for n in names})
            self.rebuilds += 1
        r, c = kept_new.nonzero(as_tuple=True)
        if r.numel():
            used = torch.tensor(self.used, device=dev)
            dst = self.offsets[r] + used[r] + kept_new.long().cumsum(dim=1)[r, c] - 1
            src = r * q + c
            self.k.index_copy_(0, dst, new_k[src])
            self.v.index_copy_(0, dst, new_v[src])
            for name, meta in (("pos", pos), ("score", score), ("prot", prot)):
                buf = getattr(self, name)
                if buf is not None:
                    buf.index_copy_(0, dst, meta[r, lmax + c].to(buf.dtype))
            if self.alive is not None:
                self.alive[dst] = True
        self.used = [u + g for u, g in zip(self.used, gained)]
        self.lengths = lengths

    def held_slots(self, name: str = "k") -> torch.Tensor:
        """The held entries of buffer ``name`` (``k``, ``v``, ``pos``, ``score``, ``prot``), region by region (row-major
        over (batch row, KV head)), each region's in token order: ``(sum(lengths), ...)``, a copy."""
        lmax = max(self.lengths, default=0)
        slots = self._held_slots(lmax)
        lengths = torch.tensor(self.lengths, device=slots.device)
        return getattr(self, name)[slots[torch.arange(lmax, device=slots.device)[None] < lengths[:, None]]]

    # -- accounting -------------------------------------------------------------------------------------------------
    def attended_length(self) -> int:
        return max(self.lengths, default=0)

    def held_tensors(self):
        return [self.k, self.v, self.pos, self.score, self.prot, self.alive, self.recoveries, self.offsets]

    def head_policies(self) -> list[list[int]]:
        """Policy bit flags per batch row and KV head (after the prompt)."""
        kv = self.geometry.num_kv_heads
        return [self.policies[r * kv : (r + 1) * kv] for r in range(len(self.policies) // kv)]

"""``fastkv``: FastKV (Jo et al., 2025, arXiv 2502.01068) — token-selective propagation (TSP) + GQA-aware
SnapKV-style KV selection, two separate budgets.

Prefill (the first forward of the cache), ``N`` prompt tokens:

- layers ``0 … tsp_layer`` run on all ``N`` tokens;
- at ``tsp_layer`` the last ``window`` queries score the prompt (attention summed over the window and over each
  KV group's query heads, pooled along the tokens per KV head, then summed over all KV heads); the top
  ``tsp_rate·N − window`` tokens plus the window, in original order, are the *TSP set*. A forward hook on that
  decoder layer returns only their hidden states; forward pre-hooks on the later decoder layers slice
  ``position_embeddings`` / ``position_ids`` / ``attention_mask`` to them (original positions: RoPE and the
  causal order stay right). Layers after ``tsp_layer`` therefore run on ``|TSP|`` tokens only — the saved
  prefill compute — and the model returns logits for the TSP set only; the last prompt token is always in it,
  so ``logits[:, -1]`` is the next-token distribution;
- every full-attention layer keeps ``budget`` tokens per KV head (SnapKV-style on what it received: ``N`` tokens
  up to ``tsp_layer``, ``|TSP|`` after). All layers keep the same count (one mask serves all layers), so the
  kept count is ``min(budget·N, |TSP|)``: a KV budget above the TSP rate is clamped to the TSP set.

Decoding runs every layer on the new token and appends without eviction. Every layer reports the logical
length ``N`` (``seen``) after prefill, also those that received only the TSP set, so decode positions are right.

Gemma-3-like models (sliding-window layers, a RoPE per layer type): the hooks slice each layer's own
``position_embeddings`` and mask, so they work; ``tsp_layer`` must be a full-attention layer (a sliding layer's
scores cannot see beyond its window) and the TSP set always contains the last ``sliding_window − 1`` prompt
tokens, so the sliding layers after ``tsp_layer`` hold exactly the window they need (this makes the TSP set,
and the compute saved, depend on the window). Sliding layers keep their window, as in every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import Method, SlidingWindowLayer
from ..config import check_budget, check_positive_int, resolve_budget
from ..attention.interface import PADDING_MARK
from ..eviction import EvictionLayer, StorageOptions, check_pool, pool_window_scores, topk_keep
from ..observe import Observer, cache_hook, decoder_layers
from ..registry import KVCompressError, register

#: default TSP layer as a share of depth: the paper's 15 of 32 (Llama-3.1-8B)
DEFAULT_TSP_DEPTH = 15 / 32


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastKVConfig(StorageOptions):
    tsp_layer: int | None = None  # last layer run on the full prompt; None = full-attention layer nearest 15/32 of depth
    tsp_rate: float | int = 0.2  # propagated past tsp_layer (window included): share of the prompt in (0, 1] or tokens
    budget: float | int = 0.1  # KV kept per layer and KV head (window included): share of the prompt or tokens
    window: int = 8  # N_obs: last prompt queries that score the tokens (always kept and propagated)
    pool: str = "max"  # max (latest paper version) | avg (earlier version) | none
    kernel: int = 7  # pooling kernel (odd)

    def __post_init__(self):
        if self.tsp_layer is not None:
            check_positive_int(self.tsp_layer, "tsp_layer", "fastkv", minimum=0)
        check_budget(self.tsp_rate, "fastkv", "tsp_rate")
        check_budget(self.budget, "fastkv")
        check_positive_int(self.window, "window", "fastkv")
        check_pool(self.pool, self.kernel, "fastkv")


@dataclass
class Prefill:
    """State of one reduced prefill: prompt length ``n``, TSP set size, KV budget, and (after ``tsp_layer``)
    the selected token indices ``index (batch, tsp_len)`` in original order."""

    n: int
    tsp_len: int
    recent: int  # last prompt tokens always in the TSP set
    kv_budget: int
    scores: torch.Tensor | None = None  # (batch, n) TSP scores, set by the cache layer at tsp_layer
    index: torch.Tensor | None = None
    sliced: dict = field(default_factory=dict)  # id(original kwarg) -> (original, sliced), shared by later layers


# --------------------------------------------------------------------------------------------------------------------
# Selection and slicing
# --------------------------------------------------------------------------------------------------------------------


def tsp_select(scores: torch.Tensor, keep: int, recent: int) -> torch.Tensor:
    """TSP set: ``scores (batch, n)`` -> ``(batch, keep)`` indices in original order, the last ``recent``
    tokens always included."""
    return topk_keep(scores.unsqueeze(1), keep, always_keep_last=recent).squeeze(1)


def gather_tokens(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Select ``index (batch, k)`` along ``dim`` of ``t`` (batch first; a batch of 1 is broadcast)."""
    b = index.shape[0]
    t = t.expand(b, *t.shape[1:]) if t.shape[0] != b else t
    shape = [1] * t.dim()
    shape[0], shape[dim] = b, index.shape[1]
    idx = index.view(shape).expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1 :])
    return t.gather(dim, idx)


def slice_mask(mask, index: torch.Tensor):
    """``(batch|1, 1|heads, n, n)`` mask -> rows and columns of the selected tokens; ``None`` stays ``None``
    (sdpa's implicit causal mask is right for a subset kept in original order). The padding the mask carries for
    kvcompress's attention (``(batch, tokens)``) is sliced to the selected tokens too."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise KVCompressError(
            f"fastkv needs a 4-D attention mask tensor (sdpa or eager attention), got {type(mask).__name__}"
        )
    sliced = gather_tokens(gather_tokens(mask, index, 2), index, 3)
    padding = getattr(mask, PADDING_MARK, None)
    if padding is not None:
        setattr(sliced, PADDING_MARK, gather_tokens(padding[:, -mask.shape[2] :], index, 1))
    return sliced


# --------------------------------------------------------------------------------------------------------------------
# Storage layers
# --------------------------------------------------------------------------------------------------------------------


class _LogicalPrompt:
    """Mixin: after a reduced prefill a layer beyond ``tsp_layer`` saw ``|TSP|`` tokens but represents ``N``."""

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        run = self.method.prefill  # set only during the prefill forward
        if run is not None and not self.attends:
            self.tokens_seen = run.n
        return out

    def attend(self, *args, **kwargs):
        out = super().attend(*args, **kwargs)
        run = self.method.prefill
        if run is not None:
            self.tokens_seen = run.n
        return out


class FastKVLayer(_LogicalPrompt, EvictionLayer):
    """Full-attention layer: at prefill attends over what it received, then keeps ``kv_budget`` tokens per (row, KV
    head) scored by the last ``window`` queries of that same attention (SnapKV-style; the TSP scores are taken here at
    ``tsp_layer``); decoding appends. Padding scores nothing: never selected unless a row is shorter than the budget
    (then it stays masked)."""

    attends = True

    def __init__(self, geometry, layer_idx, config, method):
        super().__init__(geometry, layer_idx, storage=config.make_storage(geometry))
        self.config = config
        self.method = method

    def _picks_tsp(self, n: int) -> bool:
        """This is the TSP layer and the prefill of ``n`` tokens propagates fewer."""
        return self.layer_idx == self.method.tsp_layer and self.method.prefill.tsp_len < n

    def _selects(self, n: int) -> bool:
        run = self.method.prefill
        if self.committed or run is None:
            return False
        return run.kv_budget < n or self._picks_tsp(n)

    def attend_step(self, query, keys, values, new_valid, scaling):
        if not self.committed and self.method.prefill is None:
            raise KVCompressError("fastkv: the prefill did not pass through the model's hooks (wrong model?)")
        return super().attend_step(query, keys, values, new_valid, scaling)

    def probs_wanted(self, q):
        return min(self.config.window, q) if self._selects(q) else 0

    def after_attention(self, probs, q):
        if self.committed:
            return
        run = self.method.prefill
        if probs is not None:
            window = probs.shape[3]
            scores = self.selection_scores(
                pool_window_scores(probs.sum(dim=(2, 3)), window, self.config.pool, self.config.kernel))
            if self._picks_tsp(q):
                run.scores = scores.sum(dim=1)  # (b, n): over all heads (padding stays -inf)
            if run.kv_budget < q:
                self.keep(topk_keep(scores, run.kv_budget, always_keep_last=window))
        self.commit()


class FastKVSlidingLayer(_LogicalPrompt, SlidingWindowLayer):
    """Sliding-window layer (Gemma-3): keeps its window; beyond ``tsp_layer`` it receives the TSP set, whose
    last ``sliding_window − 1`` tokens are the last prompt positions."""

    def __init__(self, geometry, layer_idx, method):
        super().__init__(geometry, layer_idx, geometry.storage_dtype)
        self.method = method


# --------------------------------------------------------------------------------------------------------------------
# Hooks: select at tsp_layer, slice the later layers' inputs
# --------------------------------------------------------------------------------------------------------------------


class TSPHooks(Observer):
    """Decoder-layer hooks for TSP, active only in the prefill forward of ``cache``. Removed on ``cache.close()``."""

    def __init__(self, method: "FastKV", cache):
        super().__init__(method.model, cache, layers=[])  # no attention hooks: scores come from the attention itself
        self.method = method
        blocks = method.blocks
        tsp = method.tsp_layer
        self._handles.append(cache_hook(blocks[0], cache, self._start, pre=True))
        self._handles.append(cache_hook(blocks[tsp], cache, self._select, pre=False))
        for block in blocks[tsp + 1 :]:
            self._handles.append(cache_hook(block, cache, self._reduce, pre=True))
        self._handles.append(cache_hook(blocks[-1], cache, self._finish, pre=False))

    # (each hook runs in the forwards of this cache only, :func:`kvcompress.observe.cache_hook`: another cache's forward,
    # maybe in another thread, leaves this one's state alone)
    def _start(self, module, args, kwargs):
        self.method.prefill = None
        if self._cache_ref().get_seq_length() > 0:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or kwargs.get("position_embeddings") is None:
            raise KVCompressError(
                "fastkv needs decoder layers called with hidden_states and position_embeddings (a llama-like RoPE model)"
            )
        self.method.prefill = self.method.plan(hidden.shape[1])
        return None

    def _select(self, module, args, kwargs, output):
        run = self.method.prefill
        if run is None or run.tsp_len >= run.n:
            return None
        if run.scores is None:
            raise KVCompressError("fastkv: no TSP scores were computed at the TSP layer (is the cache attached?)")
        run.index = tsp_select(run.scores, run.tsp_len, run.recent)
        run.scores = None
        self.method.tsp_index = run.index  # kept for inspection (tests, calibration)
        hidden = output[0] if isinstance(output, tuple) else output
        reduced = gather_tokens(hidden, run.index, 1)
        return (reduced, *output[1:]) if isinstance(output, tuple) else reduced

    def _reduce(self, module, args, kwargs):
        run = self.method.prefill
        if run is None or run.index is None:
            return None
        kwargs = dict(kwargs)
        for name in ("position_embeddings", "position_ids", "attention_mask"):
            value = kwargs.get(name)
            if value is None:
                continue
            key = id(value)
            if key not in run.sliced:
                if name == "position_embeddings":
                    sliced = tuple(gather_tokens(t, run.index, 1) for t in value)
                elif name == "position_ids":
                    sliced = gather_tokens(value, run.index, 1)
                else:
                    sliced = slice_mask(value, run.index)
                run.sliced[key] = (value, sliced)  # the original is held so its id stays unique
            kwargs[name] = run.sliced[key][1]
        return args, kwargs

    def _finish(self, module, args, kwargs, output):
        self.method.prefill = None
        return None


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@register("fastkv")
class FastKV(Method):
    summary = (
        "FastKV: token-selective propagation past tsp_layer (faster prefill) + GQA-aware SnapKV-style KV budget"
    )
    attention = "kvcompress: kept tokens, scores from it"
    sliding = "plain fp16 window of the propagated (TSP) tokens; no KV budget"
    test_options = {"tsp_layer": 1, "tsp_rate": 0.5, "budget": 0.3}
    noop_options = {"tsp_rate": 1.0, "budget": 1.0}
    Config = FastKVConfig

    def prepare(self) -> None:
        g, cfg = self.geometry, self.config
        self.prefill: Prefill | None = None
        self.tsp_index: torch.Tensor | None = None  # (batch, |TSP|) of the last reduced prefill
        self.blocks = decoder_layers(self.model)  # raises for a model without the llama-like layout
        if len(self.blocks) != g.num_layers:
            raise KVCompressError(
                f"fastkv: found {len(self.blocks)} decoder layers but the config has {g.num_layers}"
            )
        self.tsp_layer = self.default_tsp_layer() if cfg.tsp_layer is None else cfg.tsp_layer
        if not 0 <= self.tsp_layer <= g.num_layers - 2:
            raise KVCompressError(
                f"fastkv: tsp_layer={self.tsp_layer} is outside [0, {g.num_layers - 2}] for a {g.num_layers}-layer model"
            )
        if g.is_sliding(self.tsp_layer):
            raise KVCompressError(
                f"fastkv: tsp_layer={self.tsp_layer} is a sliding-window layer (its attention cannot score tokens "
                f"outside its window); choose a full-attention layer: {self.full_layers() or 'none in range'}"
            )
        cfg.make_storage(g)  # unknown storage / storage options fail here, before any work

    def full_layers(self) -> list[int]:
        """Full-attention layers that can be the TSP layer (``0 … L−2``)."""
        return [i for i in range(self.geometry.num_layers - 1) if not self.geometry.is_sliding(i)]

    def default_tsp_layer(self) -> int:
        """The full-attention layer nearest to ``15/32`` of the depth (ties: the earlier one)."""
        candidates = self.full_layers()
        if not candidates:
            raise KVCompressError(
                "fastkv: this model has no full-attention layer in [0, L−2] to select tokens at "
                f"(layer types {sorted(set(self.geometry.layer_types))}, {self.geometry.num_layers} layers)"
            )
        target = int(DEFAULT_TSP_DEPTH * self.geometry.num_layers)
        return min(candidates, key=lambda i: (abs(i - target), i))

    def plan(self, n: int) -> Prefill:
        """Sizes for an ``n``-token prompt: TSP set (window and, with sliding layers, their window included)
        and the per-layer KV budget (at most the TSP set)."""
        cfg, g = self.config, self.geometry
        recent = min(cfg.window, n)
        if g.sliding_window is not None:
            recent = max(recent, min(g.sliding_window - 1, n))
        tsp_len = max(resolve_budget(cfg.tsp_rate, n), recent)
        return Prefill(n=n, tsp_len=tsp_len, recent=recent, kv_budget=min(resolve_budget(cfg.budget, n), tsp_len))

    def prefill_fraction(self, n: int) -> float:
        """Share of the full prefill's decoder-layer token passes that FastKV runs for an ``n``-token prompt."""
        p, L = self.plan(n), self.geometry.num_layers
        return ((self.tsp_layer + 1) * n + (L - self.tsp_layer - 1) * p.tsp_len) / (L * n)

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):
            return FastKVSlidingLayer(self.geometry, layer_idx, self)
        return FastKVLayer(self.geometry, layer_idx, self.config, self)

    def install_hooks(self, cache):
        self.observer = TSPHooks(self, cache)
        return self.observer

    def shared_tensors(self) -> list[torch.Tensor]:
        """The last reduced prefill's selected positions ``(batch, |TSP|)`` int64, kept for inspection: held, so
        counted once per cache."""
        return [] if self.tsp_index is None else [self.tsp_index]

    def describe(self) -> str:
        return super().describe().replace("tsp_layer=None", f"tsp_layer={self.tsp_layer}")

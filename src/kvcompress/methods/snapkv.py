"""``snapkv``: SnapKV (Li et al., 2024) — prompt-only eviction. The last ``window`` prompt queries score the
earlier tokens (attention summed over the window and over each KV group's query heads, pooled along the
tokens); per KV head the top ``budget - window`` tokens are kept plus the window itself. Decoding appends
without eviction. Kept tokens go into a ``TokenStorage`` (``storage="kivi", bits=2`` composes with KIVI).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..cache import Method
from ..config import check_budget, check_positive_int, resolve_budget
from ..eviction import EvictionLayer, StorageOptions, check_pool, pool_window_scores, topk_keep
from ..registry import register


@register("snapkv")
class SnapKV(Method):
    summary = "SnapKV: the last prompt queries pick the kept tokens per KV head (prompt-only); composes with storage"
    attention = "kvcompress: kept tokens, scores from it"
    test_options = {"budget": 0.3, "window": 8}
    noop_options = {"budget": 1.0}

    @dataclass(frozen=True)
    class Config(StorageOptions):
        budget: float | int = 0.2  # kept prompt tokens including the window: share of the prompt or tokens
        window: int = 32  # observation window: last prompt queries that score the rest (always kept)
        pool: str = "avg"  # avg | max | none: smoothing of the scores along the tokens
        kernel: int = 5  # pooling kernel (odd)

        def __post_init__(self):
            check_budget(self.budget, "snapkv")
            check_positive_int(self.window, "window", "snapkv")
            check_pool(self.pool, self.kernel, "snapkv")

    def prepare(self) -> None:
        self.config.make_storage(self.geometry)  # unknown storage / storage options fail here, before any work

    def describe(self) -> str:
        opts = {k: v for k, v in dataclasses.asdict(self.config).items() if v is not None}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):
            return self.sliding_layer(layer_idx)
        return SnapKVLayer(self.geometry, layer_idx, self.config, self)


class SnapKVLayer(EvictionLayer):
    """At the first call (the prompt) attends over the whole prompt, then keeps ``budget`` tokens per (row, KV head),
    scored by the last ``window`` queries' attention from that same computation, and moves them to the store;
    later calls append. Padding scores nothing and is kept only where a row has fewer real tokens than the budget
    (then it stays masked)."""

    attends = True

    def __init__(self, geometry, layer_idx, config, method):
        super().__init__(geometry, layer_idx, storage=config.make_storage(geometry))
        self.config = config
        self.method = method

    def probs_wanted(self, q):
        if self.committed or resolve_budget(self.config.budget, q) >= q:
            return 0
        return min(self.config.window, q)

    def after_attention(self, probs, q):
        if self.committed:
            return
        if probs is not None:
            window = probs.shape[3]
            scores = pool_window_scores(probs.sum(dim=(2, 3)), window, self.config.pool, self.config.kernel)
            self.keep(topk_keep(self.selection_scores(scores), resolve_budget(self.config.budget, q),
                                always_keep_last=window))
        self.commit()

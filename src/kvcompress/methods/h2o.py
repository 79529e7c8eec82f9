"""``h2o``: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023) — keep the tokens that received the most
cumulative attention ("heavy hitters") plus the most recent tokens. The cache holds ``heavy + recent`` tokens
(sized from the prompt) per KV head; every forward adds the step's attention probabilities (from the
step's own attention, summed over the query heads of each KV group) to the kept tokens'
scores, then evicts down to the budget. Scores are held per token and follow it through evictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import Method
from ..config import check_budget, resolve_budget
from ..eviction import EvictionLayer, topk_keep
from ..registry import register


@register("h2o")
class H2O(Method):
    summary = "H2O: heavy hitters (cumulative attention) + recent tokens; scores updated at every decode step"
    attention = "kvcompress: kept tokens, scores from it"
    test_options = {"heavy": 0.15, "recent": 0.15}
    noop_options = {"heavy": 1 << 20, "recent": 1 << 20}

    @dataclass(frozen=True)
    class Config:
        heavy: float | int = 0.1  # heavy-hitter tokens: share of the prompt (float) or tokens (int)
        recent: float | int = 0.1  # most recent tokens always kept: share of the prompt or tokens
        budget: float | int | None = None  # total kept (share or tokens), split half heavy / half recent; overrides both

        def __post_init__(self):
            check_budget(self.heavy, "h2o", "heavy")
            check_budget(self.recent, "h2o", "recent")
            if self.budget is not None:
                check_budget(self.budget, "h2o", "budget")

        def sizes(self, prompt_len: int) -> tuple[int, int]:
            """``(heavy, recent)`` in tokens for a prompt of ``prompt_len`` tokens."""
            if self.budget is not None:
                total = max(resolve_budget(self.budget, prompt_len), 2)
                return total // 2, total - total // 2
            return resolve_budget(self.heavy, prompt_len), resolve_budget(self.recent, prompt_len)

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):
            return self.sliding_layer(layer_idx)
        return H2OLayer(self.geometry, layer_idx, self.config, self)


class H2OLayer(EvictionLayer):
    """Holds at most ``heavy + recent`` tokens per (row, KV head) and their cumulative attention
    ``token_state["score"] (batch, kv_heads, kept)`` fp32 (counted in ``nbytes``). The step's attention
    probabilities come from the step's own attention (``attends``); padding receives none and goes first."""

    attends = True

    def __init__(self, geometry, layer_idx, config, method):
        super().__init__(geometry, layer_idx)
        self.config = config
        self.method = method
        self.heavy = self.recent = None  # sized from the prompt at the first call

    def attend_step(self, query, keys, values, new_valid, scaling):
        if self.heavy is None:
            self.heavy, self.recent = self.config.sizes(keys.shape[-2])
            b, h = keys.shape[:2]
            self.token_state["score"] = torch.zeros(b, h, 0, dtype=torch.float32, device=keys.device)
        return super().attend_step(query, keys, values, new_valid, scaling)

    def probs_wanted(self, q):
        return q

    def after_attention(self, probs, q):
        self.token_state["score"] += probs.sum(dim=(2, 3))  # over the group's query heads and the step's queries
        if self.attended_length() > self.heavy + self.recent:
            scores = self.selection_scores(self.token_state["score"])
            self.keep(topk_keep(scores, self.heavy + self.recent, always_keep_last=self.recent))

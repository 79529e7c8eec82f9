"""``streaming``: StreamingLLM (Xiao et al., ICLR 2024) — keep the first ``sink`` tokens and the most recent
``window`` tokens, at prefill and after every decode step.

Keys are stored post-RoPE with their original positions (no re-rotation into cache positions), which is
exact within the model's trained context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import Method
from ..config import check_budget, check_positive_int, resolve_budget
from ..eviction import EvictionLayer
from ..registry import KVCompressError, register

DEFAULT_WINDOW = 2000  # the paper's setting when neither window nor budget is given


@register("streaming")
class StreamingLLM(Method):
    summary = "StreamingLLM: attention sinks + recent window; evicts at prefill and every decode step"
    attention = "kvcompress: kept tokens"
    test_options = {"sink": 4, "budget": 0.25}
    noop_options = {"window": 1 << 20}

    @dataclass(frozen=True)
    class Config:
        sink: int = 4  # first tokens always kept (attention sinks)
        window: int | None = None  # recent tokens kept; default 2000 unless budget is given
        budget: float | int | None = None  # share of the prompt (float) or tokens (int): sizes window = budget - sink

        def __post_init__(self):
            check_positive_int(self.sink, "sink", "streaming", minimum=0)
            if self.window is not None and self.budget is not None:
                raise KVCompressError("streaming: give either window or budget, not both")
            if self.window is not None:
                check_positive_int(self.window, "window", "streaming")
            if self.budget is not None:
                check_budget(self.budget, "streaming")
                if isinstance(self.budget, int) and self.budget <= self.sink:
                    raise KVCompressError(
                        f"streaming: budget={self.budget} tokens leaves no room for a window after sink={self.sink}"
                    )

        def sizes(self, prompt_len: int) -> tuple[int, int]:
            """``(sink, window)`` in tokens for a prompt of ``prompt_len`` tokens."""
            if self.budget is None:
                return self.sink, self.window if self.window is not None else DEFAULT_WINDOW
            total = resolve_budget(self.budget, prompt_len)
            sink = min(self.sink, total - 1)  # a ratio budget always leaves at least one recent token
            return sink, total - sink

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):
            return self.sliding_layer(layer_idx)
        return StreamingLayer(self.geometry, layer_idx, self.config)


class StreamingLayer(EvictionLayer):
    """Holds ``sink + window`` tokens at most: the first ``sink`` real tokens and the last ``window`` (per batch row:
    padding is never a sink and is the first to go)."""

    attends = True

    def __init__(self, geometry, layer_idx, config):
        super().__init__(geometry, layer_idx)
        self.config = config
        self.sink = self.window = None  # sized from the prompt at the first call

    def attend_step(self, query, keys, values, new_valid, scaling):
        if self.sink is None:
            self.sink, self.window = self.config.sizes(keys.shape[-2])
        return super().attend_step(query, keys, values, new_valid, scaling)

    def after_attention(self, probs, q):
        n = self.attended_length()
        budget = self.sink + self.window
        if n <= budget:
            return
        if self.valid is None:  # no padding: the same tokens for every row and head
            self.keep(torch.cat([torch.arange(self.sink), torch.arange(n - self.window, n)]))
            return
        # per row: the first `sink` real tokens, then the most recent, padding last
        pos = torch.arange(n, device=self.valid.device).expand_as(self.valid)
        rank = self.valid.cumsum(dim=-1)
        sink = self.valid & (rank <= self.sink)
        score = torch.where(sink, float(2 * n), pos.float()).masked_fill(~self.valid, -1.0)
        self.keep(torch.topk(score, budget, dim=-1).indices)

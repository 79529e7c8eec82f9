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
    """Holds ``sink + window`` tokens at most: ``[0, sink)`` and the last ``window`` (same for every head)."""

    def __init__(self, geometry, layer_idx, config):
        super().__init__(geometry, layer_idx)
        self.config = config
        self.sink = self.window = None  # sized from the prompt at the first call

    def store(self, key_states, value_states):
        if self.sink is None:
            self.sink, self.window = self.config.sizes(key_states.shape[-2])
        keys, values = self.append(key_states, value_states)
        n = self.kept_length()
        if n > self.sink + self.window:
            idx = torch.cat([torch.arange(self.sink), torch.arange(n - self.window, n)])
            self.keep(idx)
        return keys, values

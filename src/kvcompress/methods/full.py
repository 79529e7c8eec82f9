"""``full``: the uncompressed baseline (transformers DynamicCache semantics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import FullLayer, Method, SlidingWindowLayer
from ..registry import KVCompressError, register

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "model": None}


@register("full")
class FullCache(Method):
    noop_options = {}
    summary = "uncompressed K/V (the reference); dtype='float16' stores 2 bytes per value, 'model' the model's own dtype"
    attention = "transformers: as DynamicCache"

    @dataclass(frozen=True)
    class Config:
        dtype: str = "float16"  # storage dtype: float16 | bfloat16 | float32 | model (= exactly DynamicCache)

        def __post_init__(self):
            if self.dtype not in _DTYPES:
                raise KVCompressError(f"full: dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")

    def make_layer(self, layer_idx: int):
        dtype = _DTYPES[self.config.dtype]
        if self.geometry.is_sliding(layer_idx):
            return SlidingWindowLayer(self.geometry, layer_idx, dtype)
        return FullLayer(self.geometry, layer_idx, dtype)

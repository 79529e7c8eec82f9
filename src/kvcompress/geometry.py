"""What a method needs to know about the model, read from its config (never from model classes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import KVCompressError


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None
    max_positions: int | None
    model_id: str
    dtype: torch.dtype

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    @classmethod
    def from_model(cls, model) -> "ModelGeometry":
        cfg = model.config.get_text_config(decoder=True)
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_layers = cfg.num_hidden_layers
        types = tuple(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
        unsupported = sorted({t for t in types} - {"full_attention", "sliding_attention"})
        if unsupported:
            raise KVCompressError(
                f"this model has attention layer types {unsupported}; kvcompress serves full and sliding-window "
                "softmax attention only"
            )
        if getattr(cfg, "num_kv_shared_layers", 0):
            raise KVCompressError("models that share KV caches across layers are not supported")
        sliding = getattr(cfg, "sliding_window", None) if "sliding_attention" in types else None
        try:
            dtype = next(model.parameters()).dtype
        except (StopIteration, AttributeError):
            dtype = torch.float32
        return cls(
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            layer_types=types,
            sliding_window=sliding,
            max_positions=getattr(cfg, "max_position_embeddings", None),
            model_id=str(getattr(model.config, "_name_or_path", "") or getattr(cfg, "model_type", "")),
            dtype=dtype,
        )

    @property
    def storage_dtype(self) -> torch.dtype:
        """The 2-byte float type used for full-precision parts of a compressed cache."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16

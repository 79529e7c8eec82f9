"""Rotary position embedding in the rotate-half convention used by llama-like transformers models.

``cos``/``sin`` are what the model's rotary module produced: ``(batch, seq, head_dim)``; tensors ``x`` are
``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the positions whose ``cos``/``sin`` are given."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def unapply_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope` (also when cos/sin carry an attention scaling factor)."""
    cos, sin = cos.unsqueeze(1).to(y.dtype), sin.unsqueeze(1).to(y.dtype)
    return (y * cos - rotate_half(y) * sin) / (cos * cos + sin * sin)

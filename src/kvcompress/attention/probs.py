"""Attention probabilities recomputed for scoring (H2O, SnapKV, FastKV, FastGen), GQA-aware.

Shapes: ``query (batch, heads, q, head_dim)``, ``keys (batch, kv_heads, k, head_dim)``; the query heads of a
KV group are kept on their own axis: probabilities come back as ``(batch, kv_heads, group, q, k)``.
"""

from __future__ import annotations

import torch


def grouped_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, causal: bool = True) -> torch.Tensor:
    """Softmax attention of ``query`` over ``keys`` in fp32.

    With ``causal`` the queries are taken to be the *last* ``q`` positions of the ``k`` keys (prefill, or the
    current decode step), so key ``j`` is visible to query ``i`` iff ``j <= k - q + i``.
    """
    b, h, q, d = query.shape
    kv = keys.shape[1]
    g = h // kv
    qg = query.float().view(b, kv, g, q, d)
    scores = torch.matmul(qg, keys.float().unsqueeze(2).transpose(-1, -2)) * scaling  # (b, kv, g, q, k)
    if causal and q > 1:
        k = keys.shape[-2]
        qi = torch.arange(q, device=keys.device).unsqueeze(1) + (k - q)
        kj = torch.arange(k, device=keys.device).unsqueeze(0)
        scores = scores.masked_fill(kj > qi, float("-inf"))
    return torch.softmax(scores, dim=-1)

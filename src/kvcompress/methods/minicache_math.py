"""MiniCache merge math (fp32): magnitude/direction split, SLERP, angular distance, the retention rule.

Shapes: states ``(batch, kv_heads, n, head_dim)``; distances and masks ``(batch, kv_heads, n)``. Used by
:mod:`kvcompress.methods.minicache` and :mod:`kvcompress.profiles.layers`.
"""

from __future__ import annotations

import math

import torch


def unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (..., d)`` -> (norms ``(...)``, directions ``(..., d)``); a zero vector gets a zero direction."""
    norm = x.norm(dim=-1)
    return norm, x / norm.clamp_min(1e-30).unsqueeze(-1)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle ``arccos(a . b)`` between unit vectors ``(..., d)`` -> ``(...)``."""
    return torch.acos((a * b).sum(-1).clamp(-1.0, 1.0))


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(a . b) / pi`` in [0, 1] for unit vectors ``(..., d)`` -> ``(...)``."""
    return _angle(a, b) / math.pi


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, omega: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation of unit vectors ``(..., d)``: t = 0 gives ``a``, t = 1 gives ``b``; unit norm.
    Nearly parallel (or antipodal) pairs, where sin(omega) ~ 0, fall back to the normalized linear blend.
    ``omega``: their angle when the caller has it."""
    omega = _angle(a, b) if omega is None else omega
    sin = torch.sin(omega)
    ok = sin > 1e-6
    safe = torch.where(ok, sin, torch.ones_like(sin))
    wa = torch.where(ok, torch.sin((1 - t) * omega) / safe, torch.full_like(sin, 1 - t))
    wb = torch.where(ok, torch.sin(t * omega) / safe, torch.full_like(sin, t))
    return unit(wa.unsqueeze(-1) * a + wb.unsqueeze(-1) * b)[1]


def merge_states(xa: torch.Tensor, xb: torch.Tensor, t: float, how: str = "slerp"):
    """Merge the states of layers l-1 (``xa``) and l (``xb``), ``(b, h, n, d)``.

    Returns the shared direction ``(b, h, n, d)``, the magnitudes ``(2 [layer l-1, layer l], b, h, n)`` and the
    angular distance ``(b, h, n)`` of the two states."""
    na, ua = unit(xa.float())
    nb, ub = unit(xb.float())
    omega = _angle(ua, ub)
    dist = omega / math.pi
    if how == "slerp":
        return slerp(ua, ub, t, omega), torch.stack([na, nb]), dist
    nm, um = unit((1 - t) * xa.float() + t * xb.float())
    return um, torch.stack([nm, nm]), dist


def retained(dist: torch.Tensor, gamma: float, lo=None, hi=None) -> torch.Tensor:
    """``dist: (b, h, n)`` -> bool ``(b, h, n)``: normalized distance ``(d - lo) / (hi - lo)`` is ``>= 1 - gamma``;
    ``lo``, ``hi``: ``(b, h, 1)``, default the min and max over the n tokens (a constant row normalizes to 0).
    gamma = 0 retains nothing, gamma = 1 everything."""
    if gamma <= 0:
        return torch.zeros_like(dist, dtype=torch.bool)
    lo = dist.amin(-1, keepdim=True) if lo is None else lo
    hi = dist.amax(-1, keepdim=True) if hi is None else hi
    span = hi - lo
    norm = torch.where(span > 0, (dist - lo) / span.clamp_min(1e-30), torch.zeros_like(dist))
    return norm >= 1 - gamma


def retention_mask(ka, va, kb, vb, gamma: float, span: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                   dist: torch.Tensor | None = None):
    """Entries whose K or V states (``(b, h, n, d)``, layers l-1 and l) are retained: bool ``(b, h, n)``, and the
    distance range ``(2 [min, max], 2 [K, V], b, h)`` fp32 extended by these tokens (``span``: the range so far).
    ``valid (b, n)`` bool: padding (False) neither extends the range nor is retained. ``dist (2 [K, V], b, h, n)``:
    the angular distances of K and of V when the caller has them (:func:`merge_states`' third result)."""
    if dist is None:
        dist = torch.stack([angular_distance(unit(xa.float())[1], unit(xb.float())[1])
                            for xa, xb in ((ka, kb), (va, vb))])
    if valid is None:
        new = torch.stack([dist.amin(-1), dist.amax(-1)])
    else:
        pad = ~valid[None, :, None, :].to(torch.bool)
        new = torch.stack([dist.masked_fill(pad, float("inf")).amin(-1), dist.masked_fill(pad, float("-inf")).amax(-1)])
    if span is not None:
        new = torch.stack([torch.minimum(span[0], new[0]), torch.maximum(span[1], new[1])])
    lo, hi = new[0].unsqueeze(-1), new[1].unsqueeze(-1)
    keep = retained(dist[0], gamma, lo[0], hi[0]) | retained(dist[1], gamma, lo[1], hi[1])
    if valid is not None:
        keep &= valid[:, None, :].to(torch.bool)
    return keep, new

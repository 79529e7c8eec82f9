"""Dense bit-packing of small integer codes into uint8 byte streams.

Codes of ``bits`` bits each are laid out as a little-endian bit stream along
the last dimension: code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``,
least-significant bit first, and stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``.  No bits are wasted: ``n`` codes take exactly
``ceil(n * bits / 8)`` bytes (e.g. 3-bit: 8 codes in 3 bytes).
"""

from __future__ import annotations

import math
import operator

import torch

from ..registry import KVCompressError

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "validate_bits"]


def validate_bits(bits: int) -> int:
    """Return ``bits`` as int, raising KVCompressError unless it is an integer in 1..8."""
    if isinstance(bits, bool):
        raise KVCompressError(f"bits must be an integer in 1..8, got {bits!r}")
    try:
        b = operator.index(bits)
    except TypeError:
        raise KVCompressError(f"bits must be an integer in 1..8, got {bits!r}") from None
    if not 1 <= b <= 8:
        raise KVCompressError(f"bits must be in 1..8, got {b}")
    return b


def packed_nbytes(n: int, bits: int) -> int:
    """Number of bytes holding ``n`` codes of ``bits`` bits: ``ceil(n*bits/8)``."""
    bits = validate_bits(bits)
    if n < 0:
        raise KVCompressError(f"n must be >= 0, got {n}")
    return (n * bits + 7) // 8


def _pad_last(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the last dim of ``t`` up to ``length``."""
    extra = length - t.shape[-1]
    if extra == 0:
        return t
    pad = t.new_zeros(*t.shape[:-1], extra)
    return torch.cat([t, pad], dim=-1)


def pack_bits(codes: torch.Tensor, bits: int, *, validate: bool = True) -> torch.Tensor:
    """Pack integer codes (..., n) with values in [0, 2**bits) into uint8 (..., ceil(n*bits/8)).

    ``validate=False`` skips the range check (saves a device sync) when the
    caller guarantees valid codes.
    """
    bits = validate_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise KVCompressError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise KVCompressError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() == 0:
        raise KVCompressError("codes must have at least one dimension")
    n = codes.shape[-1]
    if validate and codes.numel() > 0:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << bits):
            raise KVCompressError(
                f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, got range [{lo}, {hi}]"
            )
    c = codes.to(torch.uint8)
    lead = c.shape[:-1]
    out_len = packed_nbytes(n, bits)
    if bits == 8:
        return c.contiguous()
    device = c.device

    if 8 % bits == 0:
        # bits in {1, 2, 4}: an integral number of codes per byte.
        # byte u = code[u*per] | code[u*per + 1] << bits | ...: one strided OR per code slot (a reduction over the
        # small last axis, torch.sum(c << shifts), measured 2-4x slower on the CPU)
        per = 8 // bits
        c = _pad_last(c, out_len * per).reshape(*lead, out_len, per)
        out = c[..., 0].clone()
        for k in range(1, per):
            out |= c[..., k] << (k * bits)
        return out

    # General case (3, 5, 6, 7 bits): 8 codes form a block of `bits` bytes, built as one int64 word.
    n_blocks = math.ceil(n / 8)
    c = _pad_last(c, n_blocks * 8).reshape(*lead, n_blocks, 8).to(torch.int64)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=device)
    word = torch.sum(c << code_shifts, dim=-1, keepdim=True)  # (..., blocks, 1)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=device)
    packed = ((word >> byte_shifts) & 0xFF).to(torch.uint8)  # (..., blocks, bits)
    return packed.reshape(*lead, n_blocks * bits)[..., :out_len].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n*bits/8)) -> uint8 codes (..., n)."""
    bits = validate_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise KVCompressError("packed must be a torch.uint8 tensor")
    if packed.dim() == 0:
        raise KVCompressError("packed must have at least one dimension")
    expected = packed_nbytes(n, bits)
    if packed.shape[-1] != expected:
        raise KVCompressError(
            f"packed last dim is {packed.shape[-1]} but {n} codes of {bits} bits need {expected} bytes"
        )
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.clone()
    device = packed.device
    mask = (1 << bits) - 1

    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask  # (..., nbytes, per)
        return codes.reshape(*lead, expected * per)[..., :n].contiguous()

    # 8 codes form a block of `bits` bytes: read the block as one little-endian integer (<= 56 bits fits in
    # int64), then cut the 8 codes out of it with shifts -- a handful of tensor ops instead of a per-bit expansion.
    n_blocks = math.ceil(n / 8)
    p = _pad_last(packed, n_blocks * bits).reshape(*lead, n_blocks, bits).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=device)
    word = torch.sum(p << byte_shifts, dim=-1, keepdim=True)  # (..., blocks, 1)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=device)
    codes = ((word >> code_shifts) & mask).to(torch.uint8)  # (..., blocks, 8)
    return codes.reshape(*lead, n_blocks * 8)[..., :n].contiguous()


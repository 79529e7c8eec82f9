"""Shared option checks and budget arithmetic, so every method validates the same idea the same way."""

from __future__ import annotations

import math

from .registry import KVCompressError


def check_bits(bits: int, allowed: tuple[int, ...], method: str, name: str = "bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise KVCompressError(f"{method}: {name}={bits!r} is not supported; choose one of {list(allowed)}")


def check_ratio(value: float, name: str, method: str, *, low_open=True, high_open=True) -> None:
    """Check ``value`` lies in (0, 1) (each end open or closed as asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise KVCompressError(f"{method}: {name} must be a number, got {value!r}")
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise KVCompressError(f"{method}: {name}={value!r} is outside {lo}, {hi}")


def check_positive_int(value: int, name: str, method: str, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVCompressError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")


def check_budget(budget: float | int, method: str, name: str = "budget") -> None:
    """A budget is a share of the prompt in (0, 1] (float) or a token count >= 1 (int)."""
    if isinstance(budget, bool):
        raise KVCompressError(f"{method}: {name} must be a float in (0, 1] or an int >= 1, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise KVCompressError(f"{method}: {name}={budget} tokens must be >= 1")
        return
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0):
            raise KVCompressError(f"{method}: {name}={budget} is outside (0, 1] (a share of the prompt)")
        return
    raise KVCompressError(f"{method}: {name} must be a float in (0, 1] or an int >= 1, got {budget!r}")


def resolve_budget(budget: float | int, length: int) -> int:
    """Tokens kept out of ``length`` for a ratio or absolute budget (at least 1, at most ``length``)."""
    if isinstance(budget, float):
        kept = math.ceil(budget * length)
    else:
        kept = int(budget)
    return max(1, min(kept, length))


def set_threads(threads: int | None) -> None:
    """A command's ``--threads``: torch's intra-op threads (None leaves torch's choice); below 1 is an error."""
    if threads is None:
        return
    if threads < 1:
        raise KVCompressError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)

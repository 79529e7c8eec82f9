"""Memory: stored bytes vs the fp16 reference (from ``cache.memory_report()``) and the process's peak RSS."""

from __future__ import annotations

import resource
import sys

from ..cache import MemoryReport


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def summarize(reports: list[MemoryReport]) -> dict:
    """Pool reports of several windows: mean stored / reference bytes and ratio = sum(reference) / sum(stored)."""
    stored = sum(r.stored_bytes for r in reports)
    ref = sum(r.reference_bytes for r in reports)
    n = max(len(reports), 1)
    return {
        "stored_bytes": stored / n,
        "reference_bytes": ref / n,
        "ratio": ref / stored if stored else float("inf"),
        "peak_transient_bytes": max((r.peak_transient_bytes for r in reports), default=0),
    }

"""The one attention path of kvcompress.

- :mod:`.interface` registers a kvcompress attention function (and mask function) with transformers' public
  ``AttentionInterface`` / ``AttentionMaskInterface``. A cache layer that attends by itself hands the model a
  marked K/V pair from ``update()``; the attention function sees the mark and asks that layer for the output.
  Every other call (another cache, no cache, a layer that does not attend by itself) goes to the model's own
  implementation with the arguments unchanged.
- :mod:`.parts` is the exact attention over a layer's stored parts, chunk by chunk, merged by log-sum-exp, so
  no step materializes the whole dequantized past.
- :mod:`.probs` recomputes attention probabilities for profiling tools.
"""

from .parts import CHUNK, AttentionResult, KVPart, attend_parts, grow_validity, sliding_view, with_validity
from .probs import grouped_probs

__all__ = ["CHUNK", "AttentionResult", "KVPart", "attend_parts", "chunk_tokens", "grow_validity", "sliding_view",
           "with_validity", "grouped_probs"]


def chunk_tokens(multiple: int) -> int:
    """Tokens per chunk for a part whose blocks are ``multiple`` tokens (a key group): :data:`CHUNK` rounded down to a
    multiple of it, at least one block. Read at call time from this package, where tests tune ``CHUNK``."""
    return max(multiple, CHUNK - CHUNK % multiple)

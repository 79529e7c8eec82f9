"""FastGen's per-forward inputs: the token ids and the 2-D padding mask of the step in flight.

FastGen's special and punctuation policies go by token id, which attention never sees. :class:`FastGenHooks` puts
a pre-hook on the decoder that records ``input_ids`` and the padding mask of every forward that uses *its* cache
(:class:`StepInputs`, one per cache), and a post-hook that clears them. Attention itself goes through kvcompress's
attention function like every other method (:mod:`kvcompress.attention`): FastGen's layers attend by themselves
over their ragged per-head storage. Nothing in transformers is patched and no global setting is switched, so two
caches on one model, in two threads, do not see each other.
"""

from __future__ import annotations

import torch

from ..observe import cache_hook
from ..registry import KVCompressError


class StepInputs:
    """Token ids ``(b, q)`` and real-token flags ``(b, q)`` (False = padding) of the forward pass in flight, and
    their token classes. ``tokens``: ``(special ids, punct ids)`` int32 or None."""

    def __init__(self, tokens=None):
        self.tokens = tokens
        self.clear()

    def set(self, ids: torch.Tensor, attention_mask) -> None:
        q = ids.shape[1]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.real = attention_mask[:, -q:].to(device=ids.device, dtype=torch.bool)
            self.all_real = bool(self.real.all())
        else:  # no 2-D padding mask: every token is real
            self.real = torch.ones_like(ids, dtype=torch.bool)
            self.all_real = True
        self.ids = ids

    def clear(self) -> None:
        self.ids = self.real = self._classes = None
        self.all_real = True

    def classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(special, punct)`` bool ``(b, q)`` of this step's tokens (computed once per forward)."""
        if self._classes is None:
            if self.tokens is None:
                none = torch.zeros_like(self.ids, dtype=torch.bool)
                self._classes = (none, none)
            else:
                special = torch.isin(self.ids, self.tokens[0].to(self.ids.device))
                self._classes = (special, torch.isin(self.ids, self.tokens[1].to(self.ids.device)) & ~special)
        return self._classes

    def get(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ids is None:
            raise KVCompressError(
                "fastgen saw K/V without the step's token ids: pass the cache to the model (cache=...) and the "
                "tokens as input_ids (not inputs_embeds), and do not use a closed cache"
            )
        if self.ids.shape[1] != q:
            raise KVCompressError(f"fastgen: {self.ids.shape[1]} token ids for {q} new K/V positions")
        return self.ids, self.real


class FastGenHooks:
    """The hooks of one FastGen cache (removed by :meth:`remove`, which the cache calls on ``close()``), run in the
    forwards of that cache only (:func:`kvcompress.observe.cache_hook`)."""

    def __init__(self, model, cache, inputs: StepInputs):
        self.inputs = inputs
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self._handles = [
            cache_hook(decoder, cache, self._enter, pre=True),
            cache_hook(decoder, cache, self._exit, pre=False, always_call=True),
        ]

    def _enter(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise KVCompressError("fastgen needs input_ids (its special/punctuation policies go by token id), not inputs_embeds")
        self.inputs.set(ids, kwargs.get("attention_mask"))
        return None

    def _exit(self, module, args, kwargs, output):
        self.inputs.clear()
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.inputs.clear()

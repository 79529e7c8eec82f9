"""The base of every compression method: a frozen config, validation against the model, one layer per model layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from typing import TYPE_CHECKING

from .geometry import ModelGeometry
from .layers import KVLayer, SlidingWindowLayer

if TYPE_CHECKING:
    from .cache import CompressedCache


class Method:
    """Base of a compression method. Subclasses set ``Config`` (a frozen dataclass) and ``summary``,
    implement :meth:`make_layer`, and may override :meth:`prepare`, :meth:`build_layers`,
    :meth:`install_hooks`."""

    name: str = "?"
    summary: str = ""
    #: options that make the method compress a ~100-token prompt on the tiny test model (test matrix)
    test_options: dict = {}
    #: options under which the method keeps every token exactly at 2-byte precision, or None if it has none
    noop_options: dict | None = None
    #: how its full-attention layers attend (``kvcompress list``): over their stored parts through kvcompress's
    #: attention function, or a dense K/V copy handed to transformers' attention
    attention: str = "transformers: dense K/V copy"
    #: what happens to sliding-window layers (Gemma-3, Mistral-style): their reference is the window itself, so a
    #: plain window gains nothing
    sliding: str = "plain fp16 window (no gain)"

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, model, config):
        self.model = model
        self.config = config
        self.geometry = ModelGeometry.from_model(model)
        self.prepare()

    def prepare(self) -> None:
        """Check the config against the model (raise KVCompressError before any work) and set up what the method
        needs from it (calibration, profiles, hooks)."""

    def build_layers(self, cache: "CompressedCache") -> list[KVLayer]:
        return [self.make_layer(i) for i in range(self.geometry.num_layers)]

    def make_layer(self, layer_idx: int) -> KVLayer:
        raise NotImplementedError

    def sliding_layer(self, layer_idx: int) -> KVLayer:
        """Default for sliding-window layers: the plain window, stored at 2 bytes per value."""
        return SlidingWindowLayer(self.geometry, layer_idx, self.geometry.storage_dtype)

    def install_hooks(self, cache: "CompressedCache"):
        """Return an :class:`kvcompress.observe.Observer` (or None) whose hooks the cache removes on close."""
        return None

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"{self.name}({opts})"

"""Profiles: look inside a model (attention spikes, adjacent-layer similarity, head policies)."""

from dataclasses import dataclass

from ..cache import FullLayer, Method


class KeepAll(Method):
    """Every layer (sliding ones too) keeps all tokens in the model's dtype: the post-RoPE K/V a prefill computed."""

    name = "profile-keep-all"

    @dataclass(frozen=True)
    class Config:
        pass

    def make_layer(self, layer_idx: int):
        return FullLayer(self.geometry, layer_idx, None)


def add_common_arguments(p, *, tokens: int, samples: int, out: str) -> None:
    """The options every ``kvcompress profile`` command takes: model, data, window length, windows, seed, out."""
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, local directory or HF id")
    p.add_argument("--data", default="pydoc", help="'pydoc', 'stdlib-code', a text file, a directory of .txt, or hf:NAME")
    p.add_argument("--tokens", type=int, default=tokens, help=f"prompt tokens per window (default {tokens})")
    p.add_argument("--samples", type=int, default=samples, help=f"windows averaged (default {samples})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help=f"output directory (default {out})")

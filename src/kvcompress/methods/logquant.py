"""``logquant``: LogQuant (Chen et al., 2025, arXiv 2503.19950) — a log-spaced subset of tokens stays in full
precision, every other token is quantized to 2 or 4 bits; nothing is evicted.

Selection (the authors' loop, one rule for prefill and decoding): the full-precision tokens form one run
``[log-sparse list | local window]``. Whenever the local window holds more than ``2W`` tokens, the first ``2W``
tokens of that run (the log-sparse list + the oldest local tokens; the oldest ``2W`` local tokens when the
log-sparse list is still empty) are halved: every other one stays full precision (``W`` tokens, the new
log-sparse list), the other ``W`` are quantized. So at most ``3W`` tokens are full precision and their density
halves every window going back. Position 0 is always kept (the first token of every halved run).

Position-agnostic layout: keys are stored post-RoPE as ``[quantized block | full-precision block]``. A flush
quantizes only the ``W`` tokens leaving full precision and appends their codes to the quantized block; nothing
already quantized is touched again and nothing is scattered back into positional order on read. Attention
gets ``[dequantized block | full-precision block | new tokens]``: one query's softmax attention over a set of
keys does not depend on their order, and for multi-token queries (prefill, chunked input) the new tokens come
last in their true order, so the causal mask transformers builds stays right. The prefill itself attends to
the prompt's own full-precision K/V (as in KIVI); the compressed cache serves the tokens after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..cache import KVLayer, Method, ModelGeometry
from ..config import check_bits, check_positive_int
from ..quant import UniformQuantized, quantize_uniform
from ..registry import KVCompressError, register
from ..storage import TokenRuns

KEY_AXES = ("token", "channel")


@dataclass(frozen=True)
class LogQuantConfig:
    window: int = 42  # W: local window up to 2W + a log-sparse list of W -> at most 3W full-precision tokens (paper: 128/3)
    bits: int = 2  # code width of the quantized tokens: 2 or 4 (the paper's settings)
    key_axis: str = "channel"  # keys: "channel" = per channel over each W-token flush (KIVI-like; measured far better at 2 bits), "token" = per-token groups along head_dim (authors' code)
    group_size: int = 64  # group length along head_dim for per-token quantization (keys with key_axis="token", values); clipped to head_dim

    def __post_init__(self):
        check_positive_int(self.window, "window", "logquant")
        check_bits(self.bits, (2, 4), "logquant")
        if self.key_axis not in KEY_AXES:
            raise KVCompressError(f"logquant: key_axis={self.key_axis!r} is not one of {list(KEY_AXES)}")
        check_positive_int(self.group_size, "group_size", "logquant")


# --------------------------------------------------------------------------------------------------------------------
# Selection: the log-sparse merge loop, on plain lists (positions, or row indices of the full-precision block)
# --------------------------------------------------------------------------------------------------------------------


def log_flush(fp: list, n_sparse: int, window: int) -> tuple[list, list, int]:
    """Apply the merge loop to the full-precision run ``fp = [log-sparse (n_sparse) | local]``.

    Returns ``(kept, quantized, n_sparse)``: the new full-precision run, the items leaving full precision in the
    order they are quantized (``W`` per flush, flush after flush), and the new log-sparse length."""
    quantized: list = []
    while len(fp) - n_sparse > 2 * window:
        run = fp[: 2 * window]
        fp = run[0::2] + fp[2 * window :]
        quantized += run[1::2]
        n_sparse = window
    return fp, quantized, n_sparse


def log_schedule(call_lengths: Sequence[int], window: int) -> tuple[list[int], list[int]]:
    """Positions after feeding ``call_lengths`` tokens per forward (e.g. ``[prompt, 1, 1, ...]``).

    Returns ``(full_precision, quantized)``: the full-precision positions in storage order (log-sparse list, then
    the local window) and the quantized positions in storage order. Same for every layer, head and batch row."""
    fp: list[int] = []
    quantized: list[int] = []
    n_sparse, pos = 0, 0
    for n in call_lengths:
        fp += range(pos, pos + n)
        pos += n
        fp, dropped, n_sparse = log_flush(fp, n_sparse, window)
        quantized += dropped
    return fp, quantized


# --------------------------------------------------------------------------------------------------------------------
# Storage layer
# --------------------------------------------------------------------------------------------------------------------


class _QuantBlock:
    """Append-only quantized tokens ``(batch, kv_heads, n, head_dim)``: packed codes + fp16 stats in
    :class:`kvcompress.storage.TokenRuns` (a flush never copies the whole quantized past). ``axis=-1``: per-token
    groups of ``group`` along head_dim; ``axis=-2``: per channel over each block of ``group`` consecutive tokens
    (one flush), so runs and reads fall on block edges."""

    def __init__(self, bits: int, axis: int, group: int):
        self.bits, self.axis, self.group = bits, axis, group
        self.runs = TokenRuns()  # (packed (b, h, n, d*bits/8) uint8, scale, zero (b, h, n, d/group) | (b, h, n/group, d))
        self.length = 0
        self.bhd: tuple[int, int, int] = (0, 0, 0)

    def append(self, x: torch.Tensor) -> None:
        """Quantize ``x (b, h, m, head_dim)`` (for per-channel: ``m`` a multiple of the block) and append it."""
        q = quantize_uniform(x, self.bits, axis=self.axis, group_size=self.group)
        self.runs.append(q.packed, q.scale, q.zero)
        self.length += x.shape[-2]
        self.bhd = (x.shape[0], x.shape[1], x.shape[-1])

    def _read_run(self, run, a: int, z: int, dtype: torch.dtype) -> torch.Tensor:
        """Tokens ``[a, z)`` of one run (per channel: ``a`` on a block edge), dequantized ``(b, h, z - a, d)``."""
        packed, scale, zero = run
        b, h, d = self.bhd
        if self.axis == -2:
            g0, g1 = a // self.group, -(-z // self.group)
            scale, zero = scale[:, :, g0:g1], zero[:, :, g0:g1]
        else:
            scale, zero = scale[:, :, a:z], zero[:, :, a:z]
        q = UniformQuantized(packed[:, :, a:z], scale, zero, self.bits, (b, h, z - a, d), 4 + self.axis, self.group)
        return q.dequantize(dtype)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized copy ``(b, h, n, head_dim)`` of every token (transient)."""
        pieces = [self._read_run(run, 0, self.runs.run_length(run), dtype) for run in self.runs.runs]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)

    def run_readers(self) -> list[tuple[int, object]]:
        """``(length, read(start, stop, dtype))`` per run, oldest first (the tensors as of now)."""
        return [(self.runs.run_length(run), lambda a, z, dt, run=run: self._read_run(run, a, z, dt))
                for run in self.runs.runs]

    def tensors(self) -> list[torch.Tensor | None]:
        return self.runs.tensors()


class LogQuantLayer(KVLayer):
    """One attention layer: ``[quantized block | full-precision block]`` for keys (post-RoPE) and values.

    The full-precision block ``(batch, kv_heads, n_fp <= 3W, head_dim)`` in the 2-byte storage dtype is
    ``[log-sparse list (n_sparse) | local window]``; the quantized blocks only ever grow, W tokens per flush.
    Attention (:meth:`attend_step`) reads the quantized runs a chunk at a time, then the full-precision block, then
    the new tokens; :meth:`store` is the same computation as one dense ``[past | new]`` copy (a reference)."""

    attends = True
    split_rows_on_padding = True  # quantization blocks and the log schedule are per row: a padded row runs alone

    def __init__(self, geometry: ModelGeometry, layer_idx: int, config: LogQuantConfig):
        super().__init__(geometry, layer_idx)
        self.config = config
        self.window = config.window
        group = min(config.group_size, geometry.head_dim)
        key_axis, key_group = (-2, config.window) if config.key_axis == "channel" else (-1, group)
        self.kq = _QuantBlock(config.bits, key_axis, key_group)
        self.vq = _QuantBlock(config.bits, -1, group)
        self.fp_k: torch.Tensor | None = None
        self.fp_v: torch.Tensor | None = None
        self.n_sparse = 0

    def attend_step(self, query, keys, values, new_valid, scaling):
        from ..attention import CHUNK, KVPart, attend_parts

        sd = self.geometry.storage_dtype
        parts = []
        chunk = max(self.window, CHUNK - CHUNK % self.window)  # per-channel key blocks are W tokens
        for (n, read_k), (_, read_v) in zip(self.kq.run_readers(), self.vq.run_readers()):
            parts.append(KVPart(n, lambda a, z, dt, rk=read_k, rv=read_v: (rk(a, z, dt), rv(a, z, dt)),
                                kind="logquant", chunk_tokens=chunk, kv_heads=keys.shape[1]))
        if self.fp_k is not None:
            parts.append(KVPart.dense(self.fp_k, self.fp_v, kind="fp16"))
        nv = None if new_valid is None else new_valid[:, None, :]
        parts.append(KVPart.dense(keys.to(sd), values.to(sd), nv, causal=True))
        result = attend_parts(query, parts, scaling)
        self._append(keys, values)
        return result.output, result.transient_bytes

    def store(self, key_states, value_states):
        """The dense reference: ``[dequantized | full precision | new tokens (2-byte)]``, then the state update."""
        dt, sd = key_states.dtype, self.geometry.storage_dtype
        ks, vs = [key_states.to(sd).to(dt)], [value_states.to(sd).to(dt)]  # the new tokens as stored, last
        if self.fp_k is not None:
            ks.insert(0, self.fp_k.to(dt))
            vs.insert(0, self.fp_v.to(dt))
            if self.kq.length:
                ks.insert(0, self.kq.read(dt))
                vs.insert(0, self.vq.read(dt))
        self._append(key_states, value_states)
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def _append(self, key_states, value_states) -> None:
        """Take the step's ``(b, h, q, d)`` K/V into the full-precision block (the prompt: as it is), then flush."""
        sd = self.geometry.storage_dtype
        k, v = key_states.to(sd), value_states.to(sd)
        if self.fp_k is not None:  # bounded: the full-precision block holds at most 3W + q tokens
            self.fp_k, self.fp_v = torch.cat([self.fp_k, k], dim=-2), torch.cat([self.fp_v, v], dim=-2)
        else:
            self.fp_k, self.fp_v = k, v
        self._flush()

    def _flush(self) -> None:
        """Run the merge loop on the full-precision block; quantize (once) exactly the rows that leave it."""
        kept, dropped, self.n_sparse = log_flush(list(range(self.fp_k.shape[-2])), self.n_sparse, self.window)
        if not dropped:
            return
        dev = self.fp_k.device
        drop_idx, keep_idx = torch.tensor(dropped, device=dev), torch.tensor(kept, device=dev)
        self.kq.append(self.fp_k.index_select(-2, drop_idx))
        self.vq.append(self.fp_v.index_select(-2, drop_idx))
        self.fp_k = self.fp_k.index_select(-2, keep_idx)
        self.fp_v = self.fp_v.index_select(-2, keep_idx)

    def held_tensors(self):
        return [self.fp_k, self.fp_v, *self.kq.tensors(), *self.vq.tensors()]

    def attention_path(self) -> str:
        """``"chunked"`` once tokens were quantized (read a chunk at a time), else ``"dense"`` (:mod:`kvcompress.memory`)."""
        return "chunked" if self.kq.length else "dense"

    def new_row_layer(self):
        return LogQuantLayer(self.geometry, self.layer_idx, self.config)

    @property
    def quantized_length(self) -> int:
        return self.kq.length


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@register("logquant")
class LogQuant(Method):
    summary = "LogQuant: log-spaced full-precision tokens (<= 3W), the rest 2/4-bit, position-agnostic layout"
    attention = "kvcompress: quantized runs a chunk at a time, then the full-precision block"
    Config = LogQuantConfig
    test_options = {"window": 8}
    noop_options = None  # no setting keeps every token at 2 bytes: a window past the context is an error

    def validate(self) -> None:
        g = self.geometry
        group = min(self.config.group_size, g.head_dim)
        if g.head_dim % group:
            raise KVCompressError(f"logquant: group_size={self.config.group_size} does not divide head_dim={g.head_dim}")
        if g.max_positions is not None and 2 * self.config.window >= g.max_positions:
            raise KVCompressError(
                f"logquant: window={self.config.window} is larger than the context it must serve: the model's "
                f"context is {g.max_positions} tokens and nothing is quantized before 2*window+1 tokens"
            )

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx):  # Gemma-3 local layers keep their short window at 2 bytes
            return self.sliding_layer(layer_idx)
        return LogQuantLayer(self.geometry, layer_idx, self.config)

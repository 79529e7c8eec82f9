"""``kvquant``: KVQuant (Hooper et al., NeurIPS 2024, arXiv 2401.18079).

Keys are quantized per channel (optionally before RoPE), values per token, both with a per-layer codebook
(``nuq``: Fisher-weighted k-means levels from ``kvcompress calibrate kvquant``; or uniform levels), a
dense-and-sparse split (``outliers`` share of values kept exactly) and an fp16 attention sink.

Per-channel key ranges: each key channel has a fixed ``[lower, upper]`` range -- its outlier thresholds
(or min/max when ``outliers=0``) -- from the calibration file (``key_stats="calibration"``, the paper's way)
or from the first >= 16 non-sink tokens this cache stores (``key_stats="prompt"``, per batch row; those
tokens wait in fp16 until there are 16). Every later token, decoding included, is normalized with that
fixed range: values beyond it go to the sparse part, or are clamped when ``outliers=0``.

Recent window (``recent=R``, default 0 = the paper's recipe, which has none): the last ``R`` tokens stay at 2 bytes
per value (post-RoPE keys, like the sink) and are quantized one by one as they leave the window -- a KIVI-style fp16
residual, not part of KVQuant's recipe; its bytes (and the positions of its tokens, when not derivable) are counted.
Full-attention layers only; sliding-window layers keep no recent window.

Pre-RoPE: the cache receives post-RoPE keys with the cos/sin the model used (seen by an observer hook);
they are un-rotated exactly and stored pre-RoPE, and re-rotated on read with cos/sin recomputed by the
model's own rotary module for the stored positions. Positions are derivable (not stored) while they are
``0, 1, 2, ...``; otherwise (left padding) they are stored as int32 ``(batch, tokens)`` and counted.

Held per layer: packed codes ``(b, h, n, ceil(d*bits/8))`` uint8 for K and V (``key_bits`` for K when set;
3 bits: a 2-bit and a 1-bit plane, the same bytes when 8 divides head_dim); value scale/offset
``(b, 1, n, 1)`` fp16 (one range per token over all KV heads, as in the paper; ``token_range="head"``: ``(b, h, n, 1)``)
(also for keys when ``per_channel_keys=False``); the per-channel key range
``(h*d,)`` fp16 x2 (calibration) or ``(b, h*d)`` (prompt); codebooks; outliers as CSR rows
(row = (token, batch row), width = h*d): per-row counts (uint8 / int16), column (uint8 / int16) and fp16
value per outlier (each of these in a buffer that grows geometrically: spare capacity at most 1/32 of the tokens +
16, held and counted); the fp16 sink ``(b, h, sink, d)``; with ``recent=R`` the recent window ``(b, h, <=R, d)`` fp16
for K and V (plus int32 positions ``(b, <=R)`` only when positions are not ``0, 1, 2, ...``).
Sliding-window layers (Gemma-3) are quantized the same way, attend over exactly
their window and evict from the front once ``SLIDE_BLOCK`` tokens have left it (``quantize_sliding=False`` keeps
them as a plain fp16 window).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import KVLayer, Method
from ..config import check_bits
from .. import kernels
from ..kernels import _NO_UNROTATE, _np32
from ..quant._common import check_fp16_finite
from ..registry import KVCompressError, register
from ..rope import apply_rope, unapply_rope
from .kvquant_store import Positions, QuantStream, RopeTable, PositionObserver

#: sliding-window layers drop the tokens that left the window once this many have (one copy of the window per block;
#: at most window // 16, so a short window does not hold much beyond itself)
SLIDE_BLOCK = 32
MIN_PROMPT_TOKENS = 16  # key_stats="prompt": tokens needed before the per-channel ranges are fixed
KEY_STATS = ("auto", "calibration", "prompt")
TOKEN_RANGES = ("token", "head")


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVQuantConfig:
    bits: int = 3  # code width of the dense part: 2, 3 or 4
    key_bits: int | None = None  # code width of the keys if not ``bits`` (2, 3 or 4; values keep ``bits``)
    outliers: float = 0.01  # share of values kept exactly (sparse), in [0, 0.2); half above, half below
    sink: int = 1  # first tokens kept at 2-byte precision (attention sink)
    per_channel_keys: bool = True  # keys: one fixed range per channel (False: per token, like values)
    pre_rope: bool = True  # quantize keys before RoPE, re-rotate on read
    nuq: bool = True  # calibrated non-uniform codebook (needs calibration); False: uniform levels
    qnorm: bool = False  # Q-Norm: centroids corrected to keep the mean/std of the data (needs calibration)
    calibration: str | None = None  # file of `kvcompress calibrate kvquant`, or "auto": calibrate once per model, cached
    key_stats: str = "auto"  # per-channel key ranges from: calibration | prompt | auto (calibration if a file)
    quantize_sliding: bool = True  # quantize sliding-window layers too (False: plain fp16 window)
    token_range: str = "token"  # per-token streams (values): one range per token over all KV heads | head: per head
    recent: int = 0  # last tokens kept at 2 bytes (KIVI-style residual; not the paper's recipe), full-attention layers

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4), "kvquant")
        if self.key_bits is not None:
            check_bits(self.key_bits, (2, 3, 4), "kvquant", "key_bits")
        o = self.outliers
        if isinstance(o, bool) or not isinstance(o, (int, float)) or not (0.0 <= float(o) < 0.2):
            raise KVCompressError(f"kvquant: outliers={o!r} must be a fraction in [0, 0.2) (0.01 = 1 %)")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise KVCompressError(f"kvquant: sink must be an integer >= 0, got {self.sink!r}")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise KVCompressError(f"kvquant: recent must be an integer >= 0 (tokens kept at 2 bytes), "
                                  f"got {self.recent!r}")
        for name in ("per_channel_keys", "pre_rope", "nuq", "qnorm", "quantize_sliding"):
            if not isinstance(getattr(self, name), bool):
                raise KVCompressError(f"kvquant: {name} must be True or False, got {getattr(self, name)!r}")
        if self.token_range not in TOKEN_RANGES:
            raise KVCompressError(f"kvquant: token_range={self.token_range!r} is not one of {list(TOKEN_RANGES)}")
        if self.key_stats not in KEY_STATS:
            raise KVCompressError(f"kvquant: key_stats={self.key_stats!r} is not one of {list(KEY_STATS)}")
        if self.calibration is not None and not isinstance(self.calibration, (str, Path)):
            raise KVCompressError(f"kvquant: calibration must be a file path, got {self.calibration!r}")
        need = [n for n in ("nuq", "qnorm") if getattr(self, n)]
        if self.key_stats == "calibration" and self.per_channel_keys:
            need.append("key_stats='calibration'")
        if need and self.calibration is None:
            raise KVCompressError(
                f"kvquant: {', '.join(need)} needs calibration=PATH (write one with `kvcompress calibrate kvquant "
                "--model M --data TEXT --bits B`), or use nuq=False (uniform levels) and key_stats='prompt'"
            )
        if self.qnorm and not self.nuq:
            raise KVCompressError("kvquant: qnorm corrects the calibrated codebook; it needs nuq=True")
        if (self.nuq or self.qnorm) and not self.per_channel_keys:
            raise KVCompressError("kvquant: calibrated codebooks are fitted for per-channel keys; "
                                  "per_channel_keys=False needs nuq=False and qnorm=False")

    @property
    def k_bits(self) -> int:
        return self.bits if self.key_bits is None else self.key_bits

    @property
    def channel_stats_from(self) -> str:
        if self.key_stats == "auto":
            return "calibration" if self.calibration is not None else "prompt"
        return self.key_stats


# --------------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------------


def _own_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` as a new contiguous tensor of its own: a slice of the step's K/V kept as it is would keep all
    of that tensor alive (and for a 2-byte model ``.to(dtype)`` is no copy)."""
    return t.to(dtype, memory_format=torch.contiguous_format, copy=True)



class KVQuantLayer(KVLayer):
    """Stores ``[sink (fp16, post-RoPE) | body (quantized, keys pre-RoPE) | recent (fp16, post-RoPE; recent=R)]``
    and attends by itself: over the sink, the body (the fused kernel straight on the codes, keys rotated inside it:
    :func:`kvcompress.kernels.kvquant_attention`; where no kernel applies, dequantized a chunk at a time with keys
    re-rotated for the chunk's positions), the recent window and the step's new tokens as given; a padded batch keeps
    one single-row layer per row, so per-channel ranges, outlier thresholds, the sink, the recent window and positions
    are each row's own.
    Sliding-window layers (no sink, no recent window) hold the last ``window - 1`` tokens plus fewer than
    ``slide_block`` that already left the window, and mask exactly the window. :meth:`dense_step` is the same state
    update with a dense ``[past | new]`` copy for transformers' attention (a reference)."""

    split_rows_on_padding = True

    def __init__(self, method: "KVQuant", layer_idx: int):
        g, cfg = method.geometry, method.config
        super().__init__(g, layer_idx)
        self.method = method
        self.layer_type = g.layer_types[layer_idx]
        self.window = g.sliding_window if g.is_sliding(layer_idx) else None
        self.is_sliding = self.window is not None
        self.slide_block = max(1, min(SLIDE_BLOCK, self.window // 16)) if self.is_sliding else 0
        self.attends = True
        self.sink = 0 if self.is_sliding else cfg.sink
        self.recent = 0 if self.is_sliding else cfg.recent
        self.pre_rope = cfg.pre_rope
        kb, vb = method.books(layer_idx)
        h, d = g.num_kv_heads, g.head_dim
        self.k = QuantStream(cfg.k_bits, cfg.outliers, kb["codebook"], kb["decode"], h, d, cfg.per_channel_keys,
                             kb.get("lower"), kb.get("upper"), token_range=cfg.token_range)
        self.v = QuantStream(cfg.bits, cfg.outliers, vb["codebook"], vb["decode"], h, d, per_channel=False,
                             token_range=cfg.token_range)
        if self.is_sliding:  # never more than the window and one block held: no spare capacity beyond that
            for stream in (self.k, self.v):
                stream.limit_capacity(self.window - 1 + self.slide_block)
        self.head_k = self.head_v = None  # sink: (b, h, s, d) 2-byte floats, post-RoPE
        self.pend_k = None  # key_stats="prompt": keys waiting for the per-channel range, (b, h, p, d) 2-byte
        self.pos = Positions()
        self.rec_k = self.rec_v = None  # recent window: (b, h, r, d) 2-byte floats, post-RoPE, r <= recent
        self.rec_pos = Positions()  # positions of the recent tokens (pre_rope: to un-rotate them when they leave)
        self._held_bits = None  # (sink keys, their bits for the one-call step): views of the held sink, nothing new
        self._rope = None  # (start, the RotaryPositions the kernel was given for it): the same object step after step
        # (key codes, value codes, backend, kvquant_decode's memo, whether the kernel serves them): asked by every
        # decode step; dropped as soon as a stream's buffers are replaced (_forget_stale_codes)
        self._codes_memo = None
        # what _attend_one_fused reuses while the codes stay: (key codes, value codes, rotation, held sink keys, values,
        # their bits, kvquant_decode's memo) -- views of held tensors, nothing of its own
        self._decode_memo = None

    def new_row_layer(self):
        return KVQuantLayer(self.method, self.layer_idx)

    # -- positions and RoPE ------------------------------------------------------------------------------------------
    def _step_rope(self, q: int):
        """``(positions (b|1, q), cos, sin (b, q, d))`` of the current step, checked against the model's rotary
        module (a single-row layer of a padded batch takes its row's real tokens: ``row_view``)."""
        obs = self.method.observer
        if obs is None:
            raise KVCompressError("kvquant: pre_rope needs the cache's hooks; pass the cache to the model (cache=...) "
                                  "and do not close it")
        cos, sin = obs.rope(self.layer_idx)
        pos = obs.position_ids(self.layer_idx)
        # the model computes cos/sin once per forward for all layers: check that tensor once per layer type and row
        key = (self.layer_type, None if self.row_view is None else self.row_view[0])
        checked = self.method.rope_checked.get(key)
        fresh = checked is None or checked[0]() is not cos
        given = cos
        if self.row_view is not None:
            r, idx = self.row_view
            cos, sin = (t[min(r, t.shape[0] - 1)][None][:, idx.to(t.device)] for t in (cos, sin))
            if pos is not None:
                pos = pos[min(r, pos.shape[0] - 1)][None][:, idx.to(pos.device)]
        if pos is None:
            pos = torch.arange(self.tokens_seen, self.tokens_seen + q).unsqueeze(0)
        if pos.device != cos.device:
            pos = pos.to(cos.device)
        if not fresh:
            return (pos, cos, sin) if cos.dtype == torch.float32 else (pos, cos.float(), sin.float())
        tc, ts = self.method.rope.cos_sin(pos, self.layer_type)
        if not (torch.allclose(tc, cos.float(), rtol=1e-4, atol=1e-5)
                and torch.allclose(ts, sin.float(), rtol=1e-4, atol=1e-5)):
            raise KVCompressError(
                f"kvquant: layer {self.layer_idx}: the model's rotary module does not reproduce the cos/sin this "
                "step used (dynamic or non-standard RoPE?); use pre_rope=False"
            )
        shared = None  # a one-token step's position when every row has the same one (:meth:`_decode_rope`)
        if q == 1:
            flat = pos.reshape(-1).tolist()
            shared = flat[0] if all(p == flat[0] for p in flat) else None
        # a weak reference and an int: nothing is held between steps
        self.method.rope_checked[key] = (weakref.ref(given), shared)
        return pos, cos.float(), sin.float()

    def _decode_rope(self):
        """``(position, cos, sin)`` of a one-token step whose rows share one position (an int; cos/sin ``(b, 1, d)``
        as the model gave them), or None (a single-row layer of a padded batch, rows at different positions): what
        :meth:`_step_rope` gives, checked by the first layer of the forward and of its type, then read from its
        memo by the others (each Python operation between the model's matmuls costs ~1 us)."""
        obs = self.method.observer
        if obs is None or self.row_view is not None:
            return None
        cos, sin = obs.rope(self.layer_idx)
        checked = self.method.rope_checked.get((self.layer_type, None))
        if checked is None or checked[0]() is not cos:
            self._step_rope(1)
            checked = self.method.rope_checked[(self.layer_type, None)]
        return None if checked[1] is None else (checked[1], cos, sin)

    # -- attending over the stored parts (full-attention layers) -----------------------------------------------------
    def attend_step(self, query, keys, values, new_valid, scaling):
        if keys.shape[2] == 1 and new_valid is None and not self.is_sliding:
            done = self._attend_one_fused(query, keys, values, scaling)
            if done is not None:
                return done
        from ..attention import KVPart, attend_parts, sliding_view, with_validity  # (not on the one-token path: a
        # from-import of a package runs Python code, microseconds inside a forward)

        past, window = self._past_parts(), None
        if self.is_sliding:  # mask exactly the window: the held tokens end at position seen - 1
            visible, window = sliding_view(self.attended_length(), self.tokens_seen, self.window, keys.shape[2], keys.shape[0],
                                           keys.device)
            past = with_validity(past, visible)
        nv = None if new_valid is None else new_valid[:, None, :]
        result = attend_parts(query, [*past, KVPart.dense(keys, values, nv, causal=True)], scaling, window=window)
        self._append(keys, values)
        return result.output, result.transient_bytes

    def _past_parts(self) -> list:
        """The sink (fp16), the body (read chunk by chunk by :meth:`_read_body`) and the recent window (fp16) as
        attention parts."""
        from ..attention import CHUNK, KVPart

        parts = []
        if self.head_k is not None:
            parts.append(KVPart.dense(self.head_k, self.head_v, kind="fp16"))
        if len(self.v):
            fused = self._fused_body()
            parts.append(KVPart(len(self.v), self._read_body, kind="kvquant-fused" if fused else "kvquant",
                                chunk_tokens=CHUNK, kv_heads=self.geometry.num_kv_heads, fused=fused))
        if self.rec_k is not None and self.rec_k.shape[2]:
            parts.append(KVPart.dense(self.rec_k, self.rec_v, kind="fp16"))
        return parts

    def _rotary(self):
        """How the kernel rotates the body's pre-RoPE keys (:class:`kvcompress.kernels.RotaryPositions`), None when
        the model's rotary module is not plain ``cos/sin(position * inv_freq)``."""
        from ..kernels import RotaryPositions

        freqs = self.method.rope.frequencies(self.layer_type)
        if freqs is None:
            return None
        if self.pos.explicit is None:
            if self._rope is None or self._rope[0] != self.pos.start or self._rope[1].inv_freq is not freqs[0]:
                self._rope = (self.pos.start, RotaryPositions(freqs[0], freqs[1], start=self.pos.start))
            return self._rope[1]
        return RotaryPositions(freqs[0], freqs[1], start=None, positions=self.pos.explicit)

    def _attend_one_fused(self, query, keys, values, scaling):
        """A one-token step without padding by one kernel call (:func:`kvcompress.kernels.kvquant_decode`): the body
        from its codes, and the sink, the recent window and the new token folded into the same partials -- the
        general path's dense softmax and log-sum-exp merge in torch cost more than the kernel at 1k tokens, and each
        torch call between the model's matmuls costs ~0.1 ms. Same keys and values as the general path (within float
        rounding); None where the kernel does not serve the body (the general path runs)."""
        step = self._decode_memo
        if step is None or self.recent or self.pos.explicit is not None:
            body = self._body_codes()
            if body is None or kernels.backend(query.device) != "numba":
                return None
            step = (*body, *self._held_tail(), self._codes_memo[3])
            if not self.recent and self.pos.explicit is None:  # the same until the codes change (_forget_stale_codes)
                self._decode_memo = step
        elif not kernels.numba_serves_cpu():  # switched off since (kernels.fused)
            return None
        codes_k, codes_v, rope, hk, hv, held_bits, memo = step
        append = self._one_token_append(keys)  # (may grow the buffers: the step's codes still read the same tokens)
        output = kernels.kvquant_decode(query, scaling, len(self.v), codes_k, codes_v, rope, held_bits, keys, values,
                                        memo=memo, append=None if append is None else append[1:])
        if output is not None and append is not None:  # the step's tokens were quantized in the same call
            output, k_result, v_result = output
            if not (k_result[1] and v_result[1]):  # a range not finite in fp16: the torch path's error, nothing held
                check_fp16_finite(torch.tensor([float("inf")]))
            self.k.commit_kernel_append(1, k_result)
            self.v.commit_kernel_append(1, v_result)
            if append[0] is not None:
                self.pos.append_next(append[0])
            self._forget_stale_codes()
        else:
            if output is None:  # the threaded kernel: its tail merged after the ranges
                b, heads, _, d = query.shape
                kv = keys.shape[1]
                qg = query.float().reshape(b, kv, heads // kv, d) * scaling
                tk = keys.float() if hk is None else torch.cat([hk.float(), keys.float()], dim=2)
                tv = values.float() if hv is None else torch.cat([hv.float(), values.float()], dim=2)
                acc, _, l = kernels.kvquant_attention(qg, len(self.v), codes_k, codes_v, rope, None, tail=(tk, tv))
                output = (acc / l.unsqueeze(-1)).reshape(b, heads, 1, d).transpose(1, 2).to(query.dtype).contiguous()
            self._append_one(keys, values)
        n_tail = keys.shape[2] + (0 if hk is None else hk.shape[2])
        return output, 2 * keys.shape[0] * keys.shape[1] * n_tail * keys.shape[3] * 4  # the fp32 tail, K and V

    def _held_tail(self):
        """The held 2-byte tokens a one-token step attends after the body: ``(keys, values, bits)`` -- the sink then the
        recent window ``(b, h, r, d)`` and their bits for :func:`kvcompress.kernels.kvquant_decode` (made once while the
        sink alone is held) -- or ``(None, None, None)``."""
        held = [(k, v) for k, v in ((self.head_k, self.head_v), (self.rec_k, self.rec_v)) if k is not None and k.shape[2]]
        if not held:
            return None, None, None
        if len(held) == 2:
            hk, hv = (torch.cat(pair, dim=2) for pair in zip(*held))
            return hk, hv, kernels.two_byte_bits(hk, hv)
        hk, hv = held[0]
        if self._held_bits is None or self._held_bits[0] is not hk:
            self._held_bits = (hk, kernels.two_byte_bits(hk, hv))
        return hk, hv, self._held_bits[1]

    def _body_codes(self):
        """``(key codes, value codes, rotation)`` the kernel reads the body from (the rotation None for keys stored
        post-RoPE), or None where it does not apply: an empty body, no kernel for the device, keys still waiting
        for their range, a rotary module the kernel cannot reproduce."""
        if not len(self.v) or self.pend_k is not None or len(self.k) != len(self.v):
            return None
        keys, values = self.k.codes(), self.v.codes()
        rope = None
        if self.pre_rope:
            rope = self._rotary()
            if rope is None:
                return None
        which = kernels.backend(keys.planes[0].device)
        memo = self._codes_memo
        if memo is None or memo[0] is not keys or memo[1] is not values or memo[2] != which:
            ok = kernels.kvquant_fused_applies(keys.planes[0].device, keys, values, self.geometry.head_dim)
            memo = self._codes_memo = (keys, values, which, {}, ok)
        return (keys, values, rope) if memo[4] else None

    def _forget_stale_codes(self):
        """Drop what :meth:`_body_codes` kept for the streams' previous codes once a stream's buffers were replaced
        (made or grown): its numpy views would keep the old buffers alive between steps, memory nothing counts."""
        memo = self._codes_memo
        if memo is not None and (memo[0] is not self.k._codes or memo[1] is not self.v._codes):
            self._codes_memo = self._decode_memo = None

    def _fused_body(self):
        """``KVPart.fused`` of the body: the kernel straight on the codes (:func:`kvcompress.kernels.kvquant_attention`),
        or None where it does not apply (:meth:`_body_codes`): the body is then read a chunk at a time."""
        from ..attention import CHUNK

        body = self._body_codes()
        if body is None:
            return None
        keys, values, rope = body
        n = len(self.v)

        def fused(qg, valid):
            if qg.shape[2] > kernels.MAX_FUSED_ROWS:  # a long prefill chunk: dequantize + matmul (BLAS) is faster
                return kernels.chunked_partials(qg, self._read_body, n, CHUNK, valid)
            return kernels.kvquant_attention(qg, n, keys, values, rope, valid)

        return fused

    def _read_body(self, start: int, stop: int, dtype=torch.float32):
        """Body tokens ``[start, stop)`` dequantized, keys rotated to their positions: ``(b, h, stop - start, d)``
        each. Keys still waiting for their per-channel range (``pend_k``) follow the quantized ones."""
        nk = len(self.k)
        ks = []
        if start < nk:
            ks.append(self.k.read(start, min(stop, nk)))
        if stop > nk:
            ks.append(self.pend_k[:, :, max(start - nk, 0) : stop - nk].float())
        k = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        if self.pre_rope:
            if self.pos.explicit is None:
                cos, sin = self.method.rope.cos_sin_range(self.pos.start + start, stop - start, self.layer_type)
            else:
                cos, sin = self.method.rope.cos_sin(self.pos.explicit[:, start:stop], self.layer_type)
            k = apply_rope(k, cos, sin)
        return k.to(dtype), self.v.read(start, stop).to(dtype)

    # -- store / read (sliding layers: transformers attends over the dense past) --------------------------------------
    def dense_step(self, key_states, value_states):
        past = self._read() if self.attended_length() else None
        self._append(key_states, value_states)
        if past is None:
            return key_states, value_states
        pk, pv = past
        return (torch.cat([pk.to(key_states.dtype), key_states], dim=2),
                torch.cat([pv.to(value_states.dtype), value_states], dim=2))

    def _append(self, key_states, value_states):
        """Take the step's ``(b, h, q, d)`` post-RoPE keys and values into the sink, the recent window and the
        quantized body (tokens enter the body when they leave the recent window; at once when ``recent=0``)."""
        q, sd = key_states.shape[2], self.geometry.storage_dtype
        n_sink = min(q, max(0, self.sink - self.tokens_seen))
        if n_sink:
            hk, hv = _own_copy(key_states[:, :, :n_sink], sd), _own_copy(value_states[:, :, :n_sink], sd)
            self.head_k = hk if self.head_k is None else torch.cat([self.head_k, hk], dim=2)
            self.head_v = hv if self.head_v is None else torch.cat([self.head_v, hv], dim=2)
        if q > n_sink and self.recent:
            self._append_recent(key_states[:, :, n_sink:], value_states[:, :, n_sink:],
                                self._step_rope(q)[0][:, n_sink:] if self.pre_rope else None)
        elif q > n_sink:  # (a decode step past the sink slices nothing: each torch call costs inside a forward)
            k, v = key_states, value_states
            if n_sink:
                k, v = key_states[:, :, n_sink:], value_states[:, :, n_sink:]
            unrotate = None
            if self.pre_rope:
                pos, cos, sin = self._step_rope(q)
                unrotate = (cos, sin) if not n_sink else (cos[:, n_sink:], sin[:, n_sink:])
                self.pos.append(pos if not n_sink else pos[:, n_sink:])
            self._append_body(k, v, unrotate)
        if self.is_sliding and self.attended_length() >= self.window - 1 + self.slide_block:  # leave by whole blocks
            self._drop_front(self.attended_length() - (self.window - 1))
        self._forget_stale_codes()

    def _straight_to_body(self):
        """Whether a one-token step's token goes straight into the body (past the sink, no recent window, key ranges
        fixed, pre_rope: rows at one position, the next one): ``(position, cos, sin)`` as :meth:`_decode_rope`
        (``(None, None, None)`` without pre_rope), or None."""
        if self.recent or self.tokens_seen < self.sink or self.pend_k is not None or not self.k.ready:
            return None
        if not self.pre_rope:
            return None, None, None
        step = self._decode_rope()
        return step if step is not None and self.pos.is_next(step[0]) else None

    def _one_token_append(self, keys):
        """What :func:`kvcompress.kernels.kvquant_decode` needs to quantize a one-token step's ``keys`` and values into
        the body in its own call: ``(position or None, key arguments, value arguments, (cos, sin) float32 numpy)``
        (room made in the buffers), or None where the token does not go straight into the body that way (then
        :meth:`_append_one`)."""
        step = self._straight_to_body()
        if step is None:
            return None
        unrotate = _NO_UNROTATE if step[1] is None else (_np32(step[1]), _np32(step[2]))
        k_args = self.k.kernel_append_args(keys.shape)
        v_args = None if k_args is None else self.v.kernel_append_args(keys.shape)
        return None if v_args is None else (step[0], k_args, v_args, unrotate)

    def _append_one(self, key_states, value_states):
        """:meth:`_append` of a one-token step ``(b, h, 1, d)`` without its general bookkeeping where the token goes
        straight into the body (:meth:`_straight_to_body`)."""
        step = self._straight_to_body()
        if step is None:
            return self._append(key_states, value_states)
        if step[0] is not None:
            self.pos.append_next(step[0])
        self.v.append(value_states)
        self.k.append(key_states, None if step[1] is None else step[1:])
        self._forget_stale_codes()

    def _append_recent(self, k, v, pos):
        """Recent window: append post-RoPE ``k, v (b, h, q, d)`` (positions ``pos (b|1, q)`` when pre_rope) at
        2 bytes; the tokens beyond the last ``recent`` leave for the body, keys un-rotated with the model's rotary
        module at their positions (the cos/sin the step used were checked against it by :meth:`_step_rope`)."""
        sd = self.geometry.storage_dtype
        self.rec_k = _own_copy(k, sd) if self.rec_k is None else torch.cat([self.rec_k, k.to(sd)], dim=2)
        self.rec_v = _own_copy(v, sd) if self.rec_v is None else torch.cat([self.rec_v, v.to(sd)], dim=2)
        if pos is not None:
            self.rec_pos.append(pos)
        n = self.rec_k.shape[2] - self.recent
        if n <= 0:
            return
        lk, lv = self.rec_k[:, :, :n].float(), self.rec_v[:, :, :n].float()
        self.rec_k, self.rec_v = self.rec_k[:, :, n:].clone(), self.rec_v[:, :, n:].clone()
        if self.pre_rope:
            lpos = self.rec_pos.get()[:, :n]
            self.rec_pos.drop_front(n)
            cos, sin = self.method.rope.cos_sin(lpos.to(lk.device), self.layer_type)
            lk = unapply_rope(lk, cos, sin)
            self.pos.append(lpos)
        self._append_body(lk, lv)

    def _append_body(self, k, v, unrotate=None):
        """Quantize ``k``/``v (b, h, q, d)`` (any float dtype) into the body; ``unrotate``: ``(cos, sin)`` the post-RoPE
        keys are un-rotated with first (pre_rope), None: ``k`` as stored."""
        self.v.append(v)
        if self.k.ready:
            self.k.append(k, unrotate)
            return
        k = k.float()
        if unrotate is not None:
            k = unapply_rope(k, *unrotate)
        pend = k.to(self.geometry.storage_dtype)
        self.pend_k = pend if self.pend_k is None else torch.cat([self.pend_k, pend], dim=2)
        if self.pend_k.shape[2] >= MIN_PROMPT_TOKENS:
            self.k.fix_range(self.pend_k.float())
            self.k.append(self.pend_k.float())
            self.pend_k = None

    def _read(self):
        """Past tokens dequantized: ``(b, h, kept, d)`` fp32 each."""
        ks, vs = [], []
        if self.head_k is not None:
            ks.append(self.head_k.float())
            vs.append(self.head_v.float())
        if len(self.v):
            k, v = self._read_body(0, len(self.v))
            ks.append(k)
            vs.append(v)
        if self.rec_k is not None and self.rec_k.shape[2]:
            ks.append(self.rec_k.float())
            vs.append(self.rec_v.float())
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def _drop_front(self, n: int):
        """Sliding window: evict the ``n`` oldest body tokens (sliding layers keep no sink)."""
        self.v.drop_front(n)
        if len(self.k):
            self.k.drop_front(n)
        else:
            self.pend_k = self.pend_k[:, :, n:].clone()
        if self.pre_rope:
            self.pos.drop_front(n)

    # -- accounting --------------------------------------------------------------------------------------------------
    def attention_path(self) -> str:
        """Once the body holds codes: ``"fused-numba"``/``"fused-triton"`` (the kernel on the codes) or ``"chunked"``
        (read a chunk at a time); ``"dense"`` before (:mod:`kvcompress.memory`)."""
        if not len(self.v):
            return "dense"
        return f"fused-{kernels.backend(self.v.planes[0].device)}" if self._fused_body() is not None else "chunked"

    def attended_length(self) -> int:
        if self._rows is not None:  # a padded batch: each row holds its own real tokens
            return max(row.attended_length() for row in self._rows)
        n_rec = 0 if self.rec_k is None else self.rec_k.shape[2]
        return (0 if self.head_k is None else self.head_k.shape[2]) + len(self.v) + n_rec

    def reference_tokens(self) -> int:
        return min(self.tokens_seen, self.window - 1) if self.is_sliding else self.tokens_seen

    def get_max_length(self) -> int:
        return self.window if self.is_sliding else -1

    def held_tensors(self):
        return [self.head_k, self.head_v, self.pend_k, *self.k.tensors(), *self.v.tensors(), *self.pos.tensors(),
                self.rec_k, self.rec_v, *self.rec_pos.tensors()]


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@register("kvquant")
class KVQuant(Method):
    summary = ("KVQuant: per-channel pre-RoPE keys, per-token values, nuq codebooks (calibrated), "
               "dense-and-sparse outliers, fp16 sink")
    attention = ("kvcompress: sink + body through a fused kernel on the codes (keys rotated inside it; numba on CPU, "
                 "Triton on CUDA), chunked dequantize where it does not apply")
    sliding = "quantized too (no sink), window masked, leave in blocks (quantize_sliding=False: plain fp16 window)"
    Config = KVQuantConfig
    test_options = {"nuq": False, "bits": 4, "sink": 2}
    default_options = {"calibration": "auto"}  # `kvcompress eval` default list: calibrate on first use (cached)
    noop_options = None  # every setting quantizes

    def prepare(self) -> None:
        cfg, g = self.config, self.geometry
        self.observer = None
        # (layer type, row) -> (weak reference to the cos tensor last checked, its one-token step's shared position)
        self.rope_checked: dict = {}
        self.calibration = None
        if cfg.calibration is not None:
            from ..calibration.kvquant import auto_calibration, load_calibration

            path = auto_calibration(self.model) if cfg.calibration == "auto" else cfg.calibration
            self.calibration = load_calibration(path)
            for bits in sorted({cfg.bits, cfg.k_bits}):
                self.calibration.check(g, bits, cfg.outliers)
        if cfg.pre_rope:
            from ..observe import attention_modules

            attention_modules(self.model)  # raises if the layout is not llama-like
            self.rope = RopeTable(self.model, g.dtype)

    def books(self, layer_idx: int) -> tuple[dict, dict]:
        """Per-layer ``{codebook, decode[, lower, upper]}`` for keys and for values (own copies: counted per layer)."""
        cfg, cal = self.config, self.calibration
        out = []
        value = "value_token" if cfg.token_range == "token" else "value"
        for which, bits in (("key_pre" if cfg.pre_rope else "key_post", cfg.k_bits), (value, cfg.bits)):
            cb = dec = torch.linspace(-1.0, 1.0, 1 << bits)
            book = {}
            if cal is not None:
                entry = cal.layer_entry(bits, cfg.outliers, which, layer_idx)
                if cfg.nuq:
                    cb = dec = entry["codebook"]
                if cfg.qnorm:
                    dec = entry["qnorm"]
                if which.startswith("key") and cfg.channel_stats_from == "calibration":
                    book["lower"], book["upper"] = entry["lower"].reshape(-1), entry["upper"].reshape(-1)
            book["codebook"] = cb.clone()
            book["decode"] = book["codebook"] if dec is cb else dec.clone()
            out.append(book)
        return out[0], out[1]

    def make_layer(self, layer_idx: int):
        if self.geometry.is_sliding(layer_idx) and not self.config.quantize_sliding:
            return self.sliding_layer(layer_idx)
        return KVQuantLayer(self, layer_idx)

    def install_hooks(self, cache):
        if not self.config.pre_rope:
            return None
        self.observer = PositionObserver(self.model, cache)
        return self.observer

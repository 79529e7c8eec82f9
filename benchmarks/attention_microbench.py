"""Attention alone, one decode step over 30 layers with SmolLM2-135M's shapes: fp32 sdpa vs KIVI's codes.

Shapes: batch 1, 3 KV heads, 9 query heads (GQA 3), head_dim 64, one query token; every layer holds its own K/V (a
step reads 30 layers' worth, as a model does, not one layer from cache). KIVI keys per channel in groups of G = 32
tokens, values per token in groups of 32 channels, fp16 scale/zero; 4 and 2 bits. Columns (ms per step = 30 layers):

* ``fp32 sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on fp32 K/V (``enable_gqa``), the reference.
* ``dequant + sdpa``: dequantize every layer's codes to fp32, then the same sdpa (materializes the past).
* ``fused``: :func:`kvcompress.kernels.kivi_attention` straight from the codes (all n tokens quantized), plus the
  final division ``acc / l``.
* ``as wired``: what a KIVI layer runs at a one-token decode step on the CPU: ``KiviStore.decode_step`` over a real
  store of the n tokens (R = 128: the last 128 held as fp16) with the step's own token staged after them -- one numba
  call (:func:`kvcompress.kernels.kivi_decode`) that folds the scaling into the query, attends over the codes and the
  fp16 tokens, and divides by the softmax's sum. (Before session 32 this column timed ``attend_parts`` over the
  store's parts, the path layers took before session 13 and still take off the numba backend.) With ``--layout
  kvquant``: :func:`kvcompress.kernels.kvquant_decode`, the one numba call a KVQuant layer makes at such a step, over
  the n tokens' codes and the step's own dense token (position n), with the per-layer memo a layer keeps; no sink
  or recent window held, no quantization of the step's token into the streams (session 34).

Bytes per step: fp32 sdpa reads K and V (``30 * 3 * n * 64 * 4 * 2``); the fused kernel reads the codes and the fp16
statistics of the n tokens; dequant + sdpa reads the codes, writes fp32 K/V and reads them back. GB/s = bytes /
time. The machine's bandwidth is measured next to it: one large numpy copy (1 thread) and a torch copy at the
benchmark's thread count, counting read + write.

    python benchmarks/attention_microbench.py --threads 1 2 > benchmarks/results/attention-microbench/results.md

Methods run interleaved, round by round, so they share the load; the table gives the median of ``--rounds``; the
output says when the machine was busy (load average above the core count) or rounds spread widely.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from kvcompress import ModelGeometry, kernels
from kvcompress.quant import quantize_uniform
from kvcompress.rope import apply_rope
from kvcompress.storage import make_storage

LAYERS, KV_HEADS, HEADS, D, G = 30, 3, 9, 64, 32


def bandwidth_gbs(threads: int, mib: int = 512) -> tuple[float, float]:
    """(numpy 1-thread copy, torch copy with ``threads``) in GB/s, read + write counted, best of 5."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best_np = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(5))
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    torch.set_num_threads(threads)
    best_t = min(_seconds(lambda: tdst.copy_(tsrc)) for _ in range(5))
    return 2 * src.nbytes / best_np / 1e9, 2 * src.nbytes / best_t / 1e9


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def geometry() -> ModelGeometry:
    return ModelGeometry(num_layers=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D,
                         layer_types=("full_attention",), sliding_window=None, max_positions=None,
                         model_id="smollm2-shapes", dtype=torch.float32)


class Layers:
    """Per layer: fp32 K/V, KIVI codes of all n tokens, and a KiviStore (R = 128) of the same n tokens."""

    wired_note = ("KIVI's real decode step on the CPU (`KiviStore.decode_step`: one numba call over the codes, the "
                  "128-token fp16 residual and the step's own token, scaling and the final division included; n + 129 "
                  "tokens)")

    def __init__(self, n: int, bits: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.bits = n, bits
        self.k, self.v, self.codes, self.stores = [], [], [], []
        for _ in range(LAYERS):
            k = (torch.randn(1, KV_HEADS, n, D, generator=gen) * 2).half()
            v = torch.randn(1, KV_HEADS, n, D, generator=gen).half()
            kq = quantize_uniform(k.float(), bits, axis=2, group_size=G)
            vq = quantize_uniform(v.float(), bits, axis=3, group_size=G)
            store = make_storage("kivi", geometry(), bits=bits, group_size=G, residual=128)
            store.append(k, v)
            step_k, step_v = torch.randn(2, 1, KV_HEADS, 1, D, generator=gen).half()
            store.stage(step_k, step_v)  # the decode step's own token, after the n held ones
            self.k.append(k.float())
            self.v.append(v.float())
            self.codes.append((kq, vq))
            self.stores.append(store)
        self.q = [torch.randn(1, HEADS, 1, D, generator=gen) for _ in range(LAYERS)]

    def code_bytes(self) -> int:
        kq, vq = self.codes[0]
        per_layer = sum(t.numel() * t.element_size() for t in (*kq.tensors(), *vq.tensors()))
        return LAYERS * per_layer

    def fp32_bytes(self) -> int:
        return LAYERS * 2 * KV_HEADS * self.n * D * 4

    # -- one decode step of attention over every layer ----------------------------------------------------------------
    def sdpa(self):
        for q, k, v in zip(self.q, self.k, self.v):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def dequant_sdpa(self):
        for q, (kq, vq) in zip(self.q, self.codes):
            torch.nn.functional.scaled_dot_product_attention(q, kq.dequantize(), vq.dequantize(), enable_gqa=True)

    def fused(self):
        for q, (kq, vq) in zip(self.q, self.codes):
            qg = q.reshape(1, KV_HEADS, HEADS // KV_HEADS, D) * D**-0.5
            acc, m, l = kernels.kivi_attention(qg, self.n, kq.packed, kq.scale, kq.zero, self.bits, G, vq.packed,
                                               vq.scale, vq.zero, self.bits, 32)
            acc / l.unsqueeze(-1)

    def wired(self):
        for q, store in zip(self.q, self.stores):
            store.decode_step(q, D**-0.5)

    def check(self) -> float:
        """Largest |fused - sdpa over the dequantized codes| of layer 0, and of |as wired - sdpa over the store's
        dequantized tokens| (sanity: both compute attention)."""
        q, (kq, vq), store = self.q[0], self.codes[0], self.stores[0]
        want = torch.nn.functional.scaled_dot_product_attention(q, kq.dequantize(), vq.dequantize(), enable_gqa=True)
        acc, m, l = kernels.kivi_attention(q.reshape(1, KV_HEADS, HEADS // KV_HEADS, D) * D**-0.5, self.n, kq.packed,
                                           kq.scale, kq.zero, self.bits, G, vq.packed, vq.scale, vq.zero, self.bits, 32)
        err = (acc / l.unsqueeze(-1)).reshape(1, HEADS, 1, D).sub(want).abs().max().item()
        k, v = store.read()
        want = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=True)
        got = store.decode_step(q, D**-0.5).reshape(1, 1, HEADS, D).transpose(1, 2)
        return max(err, got.sub(want).abs().max().item())


class KVQuantLayers(Layers):
    """Per layer: fp32 K/V and KVQuant's storage of the same n tokens (``QuantStream``: keys per channel, pre-RoPE,
    values per token, a random sorted codebook like a calibrated one, 1 % outliers as CSR rows); positions 0..n-1."""

    wired_note = ("KVQuant's one-call decode step on the CPU (`kernels.kvquant_decode`: one numba call over the codes "
                  "and the step's own token, the query's folding and scaling and the final division included; n + 1 "
                  "tokens)")

    def __init__(self, n: int, bits: int, seed: int = 0):
        from kvcompress.methods.kvquant_store import QuantStream

        gen = torch.Generator().manual_seed(seed)
        self.n, self.bits = n, bits
        self.k, self.v, self.streams = [], [], []
        self.inv_freq = 1.0 / (100000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        ang = torch.arange(n + 1, dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos = torch.cat([ang.cos(), ang.cos()], -1)[None]  # (1, n + 1, D), what the model's rotary module gives
        sin = torch.cat([ang.sin(), ang.sin()], -1)[None]
        self.cos, self.sin = cos[:, :n], sin[:, :n]
        for _ in range(LAYERS):
            k = (torch.randn(1, KV_HEADS, n, D, generator=gen) * 2).half().float()
            v = torch.randn(1, KV_HEADS, n, D, generator=gen).half().float()
            book = torch.sort(torch.rand(1 << bits, generator=gen) * 2 - 1).values
            ks = QuantStream(bits, 0.01, book, book, KV_HEADS, D, per_channel=True)
            vs = QuantStream(bits, 0.01, book.clone(), book.clone(), KV_HEADS, D, per_channel=False)
            ks.fix_range(k)
            ks.append(k)
            vs.append(v)
            self.k.append(apply_rope(k, self.cos, self.sin))
            self.v.append(v)
            self.streams.append((ks, vs))
        self.q = [torch.randn(1, HEADS, 1, D, generator=gen) for _ in range(LAYERS)]
        self.rope = kernels.RotaryPositions(self.inv_freq, 1.0, start=0)
        # the decode step's own token at position n (post-RoPE, as the model hands it), and per layer the codes and
        # the memo a KVQuant layer keeps from step to step
        self.new_k, self.new_v = [], []
        for _ in range(LAYERS):
            k1, v1 = torch.randn(2, 1, KV_HEADS, 1, D, generator=gen).half().float()
            self.new_k.append(apply_rope(k1 * 2, cos[:, n:], sin[:, n:]))
            self.new_v.append(v1)
        self.step_codes = [(ks.codes(), vs.codes(), {}) for ks, vs in self.streams]

    def code_bytes(self) -> int:
        ks, vs = self.streams[0]
        return LAYERS * sum(t.numel() * t.element_size() for t in (*ks.tensors(), *vs.tensors()) if t is not None)

    def dequant_sdpa(self):  # what the chunked path does: dequantize, re-rotate with the model's cos/sin, attend
        for q, (ks, vs) in zip(self.q, self.streams):
            k = apply_rope(ks.read(), self.cos, self.sin)
            torch.nn.functional.scaled_dot_product_attention(q, k, vs.read(), enable_gqa=True)

    def _fused_one(self, q, ks, vs):
        qg = q.reshape(1, KV_HEADS, HEADS // KV_HEADS, D) * D**-0.5
        acc, m, l = kernels.kvquant_attention(qg, self.n, ks.codes(), vs.codes(), self.rope)
        return acc / l.unsqueeze(-1)

    def fused(self):
        for q, (ks, vs) in zip(self.q, self.streams):
            self._fused_one(q, ks, vs)

    def _wired_one(self, i: int):
        """Layer ``i``'s one-call decode step: the output ``(1, 1, heads, D)``."""
        kc, vc, memo = self.step_codes[i]
        return kernels.kvquant_decode(self.q[i], D**-0.5, self.n, kc, vc, self.rope, None, self.new_k[i],
                                      self.new_v[i], memo=memo)

    def wired(self):
        for i in range(LAYERS):
            self._wired_one(i)

    def check(self) -> float:
        """Largest |fused - sdpa over the dequantized, rotated keys and the values| of layer 0, and of |as wired -
        sdpa over those and the step's own token|."""
        q, (ks, vs) = self.q[0], self.streams[0]
        k, v = apply_rope(ks.read(), self.cos, self.sin), vs.read()
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        err = self._fused_one(q, ks, vs).reshape(1, HEADS, 1, D).sub(want).abs().max().item()
        want = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, self.new_k[0]], 2),
                                                                torch.cat([v, self.new_v[0]], 2), enable_gqa=True)
        return max(err, self._wired_one(0).transpose(1, 2).sub(want).abs().max().item())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--layout", choices=["kivi", "kvquant"], default="kivi",
                   help="KIVI's codes (G = 32), or KVQuant's (per-channel pre-RoPE keys, per-token values, codebook, "
                        "1 %% outliers; 'as wired': kvquant_decode)")
    args = p.parse_args(argv)
    if not kernels.AVAILABLE:
        print(f"no fused kernel: {kernels.UNAVAILABLE_REASON}")
        return 1
    cores = os.cpu_count() or 1
    layout = KVQuantLayers if args.layout == "kvquant" else Layers
    print(f"```\npython benchmarks/attention_microbench.py {' '.join(sys.argv[1:])}\n```\n")
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{cpu_name}, {cores} cores; torch {torch.__version__}, numba {kernels._cpu.numba.__version__}; "
          f"{LAYERS} layers x {KV_HEADS} KV heads x head_dim {D}, {HEADS} query heads, 1 query; layout {args.layout}"
          f"{' (G = 32)' if args.layout == 'kivi' else ' (keys per channel pre-RoPE, values per token, 1 % outliers)'}; "
          f"median of {args.rounds} interleaved rounds (ms per decode step, all layers)\n")
    loads = [os.getloadavg()[0]]
    bw = {t: bandwidth_gbs(t) for t in args.threads}
    for t, (bw_np, bw_t) in bw.items():
        print(f"- machine bandwidth: numpy copy (1 thread) {bw_np:.1f} GB/s; torch copy ({t} thread(s)) {bw_t:.1f} GB/s "
              "(read + write counted)")
    print()
    print("| threads | context | bits | fp32 sdpa ms | dequant + sdpa ms | fused ms | as wired ms | fused vs sdpa "
          "| as wired vs sdpa | bytes/step sdpa | bytes/step fused | GB/s sdpa | GB/s fused | spread |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    noisy = False
    for n in args.contexts:
        for bits in args.bits:
            layers = layout(n, bits)
            err = layers.check()
            assert err < 1e-3, f"fused kernel differs from sdpa by {err}"
            for threads in args.threads:
                torch.set_num_threads(threads)
                runs = {"sdpa": layers.sdpa, "dequant": layers.dequant_sdpa, "fused": layers.fused, "wired": layers.wired}
                times = {k: [] for k in runs}
                for fn in runs.values():  # warm up (numba's cache, allocator)
                    fn()
                for _ in range(args.rounds):
                    for name, fn in runs.items():
                        times[name].append(_seconds(fn))
                loads.append(os.getloadavg()[0])
                med = {k: statistics.median(v) for k, v in times.items()}
                spread = max((statistics.quantiles(v, n=4)[2] - min(v)) / min(v) if len(v) > 1 else 0.0
                             for v in times.values())
                noisy |= spread > 0.25
                sb, fb = layers.fp32_bytes(), layers.code_bytes()
                print(f"| {threads} | {n} | {bits} | {med['sdpa'] * 1e3:.1f} | {med['dequant'] * 1e3:.1f} | "
                      f"{med['fused'] * 1e3:.1f} | {med['wired'] * 1e3:.1f} | {med['sdpa'] / med['fused']:.2f}x | "
                      f"{med['sdpa'] / med['wired']:.2f}x | "
                      f"{sb / 2**20:.0f} MiB | {fb / 2**20:.1f} MiB | {sb / med['sdpa'] / 1e9:.1f} | "
                      f"{fb / med['fused'] / 1e9:.1f} | {spread * 100:.0f} % |", flush=True)
            del layers
    print()
    print(f"load average (1 min) during the run: {min(loads):.1f} .. {max(loads):.1f} on {cores} cores")
    if max(loads) > cores or noisy:
        print("**Noisy:** other jobs shared the machine (load above the core count and/or rounds spread > 25 % "
              "between the fastest and the upper quartile): compare columns within a row (interleaved), not "
              "absolute times across runs.")
    print("\n`spread`: (upper quartile - fastest) / fastest round, worst column of the row. `fused vs sdpa` > 1: the "
          f"kernel is faster. `as wired`: {layout.wired_note}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runs INSIDE the peers virtual environment (built by ``benchmarks/peers.py``): our methods and the peers
(kvpress presses, transformers' ``QuantizedCache``) through ONE protocol in one process, on the same model,
WikiText-2 windows and needle tasks.

The protocol is kvcompress's own (``kvcompress.evaluate``): every row is a "spec" whose ``make(model)`` gives a
fresh cache (a context manager) with a ``memory_report()``; ``ppl.teacher_force``, ``needle.run_task`` and
``speed.compare`` drive it through ``model(...)`` exactly as ``kvcompress eval`` does.

Peers:
- kvpress presses prefill on a ``DynamicCache`` inside ``with press(model):`` (kvpress's own way); the press
  context is left right after the prefill forward, so decoding runs without it (as kvpress's pipeline does).
  The cache reports the logical token count to the model (positions stay right after pruning), like kvpress's
  pipeline, which passes the original positions explicitly.
- ``QuantizedCache`` (quanto / HQQ backends) as transformers builds it.

Bytes: the tensors each peer cache actually holds (kvpress: the layers' keys/values; QuantizedCache: the
backend's packed codes, scales, zero-points/shifts, found by walking the backend objects, plus the residual).
The model computes in float32, so a peer's floating tensors are fp32; they are counted at 2 bytes per element
(what they hold in a 2-byte model, and what our rows store), integer/packed tensors at their real size. The raw
bytes are kept in the JSON too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcompress.cache import LayerMemory, MemoryReport
from kvcompress.compat import cache_kwargs
from kvcompress.data import encode, load_text, make_needle_tasks, text_sha256, windows_from_ids
from kvcompress.evaluate import NEEDLE_MODES, pool_windows
from kvcompress.evaluate import memory as _memory
from kvcompress.evaluate import needle as _needle
from kvcompress.evaluate import ppl as _ppl
from kvcompress.evaluate import speed as _speed
from kvcompress.evaluate.spec import parse_spec

FP16 = 2

OURS_DEFAULT = [
    "snapkv:budget=0.5",
    "snapkv:budget=0.25",
    "snapkv:budget=0.1",
    "snapkv:budget=0.5,window=64",  # kvpress's SnapKVPress observation window (ours defaults to the paper's 32)
    "streaming:budget=0.5",
    "streaming:budget=0.25",
    "streaming:budget=0.1",
    "h2o:heavy=0.25,recent=0.25",
    "fastkv:budget=0.25",
    "fastgen",
    "kivi:bits=4",
    "kivi:bits=2",
    "logquant",
    "minicache",
]
KVPRESS_PRESSES = {
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
}
# presses that only mask (head-wise budgets): their cache keeps every tensor, so bytes ratio is 1.0
KVPRESS_MASKING = {"AdaKVPress", "CriticalAdaKVPress", "DuoAttentionPress"}


# ---------------------------------------------------------------------------------------------------------------------
# honest byte counting
# ---------------------------------------------------------------------------------------------------------------------


def _leaf_tensors(obj, seen: set, out: list) -> None:
    """Every plain tensor reachable from ``obj`` (tensor subclasses unpacked via ``__tensor_flatten__``, quanto
    objects via their ``_data`` / ``_scale`` / ``_shift`` attributes, dicts/lists/tuples walked)."""
    if obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            for n in names:
                _leaf_tensors(getattr(obj, n), seen, out)
        else:
            out.append(obj)
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _leaf_tensors(v, seen, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _leaf_tensors(v, seen, out)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            if isinstance(v, (torch.Tensor, dict, list, tuple)) or hasattr(v, "__tensor_flatten__"):
                _leaf_tensors(v, seen, out)


def count_bytes(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """``(fp16_equivalent, raw)``: floating tensors at 2 bytes per element / at their element size."""
    eq = raw = 0
    for t in tensors:
        raw += t.numel() * t.element_size()
        eq += t.numel() * (min(t.element_size(), FP16) if t.is_floating_point() else t.element_size())
    return eq, raw


@dataclass
class PeerReport:
    """Duck-types ``MemoryReport`` (``stored_bytes``, ``reference_bytes``, ``ratio``) plus the raw bytes."""

    report: MemoryReport
    raw_bytes: int

    def __getattr__(self, name):
        return getattr(self.report, name)


def _peer_report(label: str, per_layer: list[tuple[int, list[torch.Tensor]]], geom) -> MemoryReport:
    rows, raw_total = [], 0
    for i, (tokens, tensors) in enumerate(per_layer):
        eq, raw = count_bytes(tensors)
        raw_total += raw
        rows.append(LayerMemory(i, tokens, eq, tokens * geom["kv_heads"] * geom["head_dim"] * 2 * FP16))
    return PeerReport(MemoryReport(label, rows, 0), raw_total)


# ---------------------------------------------------------------------------------------------------------------------
# peer specs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PeerSpec:
    """One peer configuration; ``make(model)`` is a context manager yielding a transformers Cache."""

    label: str
    name: str
    options: dict
    family: str
    note: str = ""
    factory: object = field(default=None, repr=False)

    @property
    def kwargs(self) -> dict:
        return self.options

    def make(self, model):
        return self.factory(model)


def _dist_version(dist: str) -> str | None:
    """The installed distribution's version, or None (kvpress has no ``__version__`` attribute)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _geometry(model) -> dict:
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "layers": cfg.num_hidden_layers,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
    }


def _kvpress_specs(ratios, presses) -> tuple[list[PeerSpec], list[dict]]:
    try:
        import kvpress
        from transformers import DynamicCache
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return [], [{"peer": "kvpress", "reason": f"import failed: {type(exc).__name__}: {exc}"}]

    class LogicalDynamicCache(DynamicCache):
        """A DynamicCache that tells the model how many tokens it has *seen* (positions of the next tokens
        stay right after a press pruned it); the layers keep their real lengths (attention masks)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.seen_tokens = 0

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx == 0:
                self.seen_tokens += key_states.shape[-2]
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.seen_tokens

    def factory_for(cls_name: str, ratio: float, label: str):
        press_cls = getattr(kvpress, cls_name)

        @contextlib.contextmanager
        def factory(model):
            geom = _geometry(model)
            cache = LogicalDynamicCache(config=model.config)
            press = press_cls(compression_ratio=ratio)
            stack = contextlib.ExitStack()
            stack.enter_context(press(model))
            handle = None

            def leave_press(module, args, kwargs, output):  # after the prefill forward: decode without the press
                stack.close()
                handle.remove()

            handle = model.register_forward_hook(leave_press, with_kwargs=True)

            def memory_report():
                per_layer = [(cache.seen_tokens, [layer.keys, layer.values]) for layer in cache.layers]
                return _peer_report(label, per_layer, geom)

            cache.memory_report = memory_report
            try:
                yield cache
            finally:
                stack.close()
                handle.remove()

        return factory

    specs, skipped = [], []
    for short in presses:
        cls_name = KVPRESS_PRESSES[short]
        if not hasattr(kvpress, cls_name):
            skipped.append({"peer": f"kvpress {cls_name}", "reason": f"kvpress {_dist_version('kvpress')} has no {cls_name}"})
            continue
        for r in ratios:
            label = f"kvpress:{short}@{r:g}"
            note = "masking only: held bytes = full" if cls_name in KVPRESS_MASKING else ""
            specs.append(PeerSpec(label, f"kvpress.{cls_name}", {"compression_ratio": r}, "kvpress", note,
                                  factory_for(cls_name, r, label)))
    return specs, skipped


def _quantized_specs(backends, bits_list, group_size: int, residual: int) -> tuple[list[PeerSpec], list[dict]]:
    from transformers import QuantizedCache

    modules = {"quanto": "optimum.quanto", "hqq": "hqq"}
    specs, skipped = [], []
    for backend in backends:
        try:
            __import__(modules[backend])
        except Exception as exc:  # noqa: BLE001
            skipped.append({"peer": f"QuantizedCache[{backend}]", "reason": f"import failed: {type(exc).__name__}: {exc}"})
            continue
        for bits in bits_list:
            label = f"hf-quant:{backend}@{bits}bit"

            def make_factory(backend=backend, bits=bits, label=label):
                @contextlib.contextmanager
                def factory(model):
                    geom = _geometry(model)
                    cache = QuantizedCache(backend=backend, config=model.config, nbits=bits,
                                           q_group_size=group_size, residual_length=residual)

                    def memory_report():
                        per_layer = []
                        for layer in cache.layers:
                            tensors: list = []
                            _leaf_tensors([getattr(layer, "_quantized_keys", None),
                                           getattr(layer, "_quantized_values", None),
                                           getattr(layer, "keys", None), getattr(layer, "values", None)],
                                          set(), tensors)
                            per_layer.append((int(getattr(layer, "cumulative_length", 0)), tensors))
                        return _peer_report(label, per_layer, geom)

                    cache.memory_report = memory_report
                    yield cache

                return factory

            specs.append(PeerSpec(label, f"transformers.QuantizedCache[{backend}]",
                                  {"nbits": bits, "q_group_size": group_size, "residual_length": residual},
                                  "transformers", "", make_factory()))
    return specs, skipped


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def _check_spec(spec, model, ids) -> str | None:
    """A short prefill + 2 decode steps through the spec; returns an error string or None."""
    try:
        with torch.inference_mode(), spec.make(model) as cache:
            x = ids[:, :96]
            model(input_ids=x, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            for t in range(96, 98):
                model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
            rep = cache.memory_report()
            if not rep.stored_bytes:
                return "holds no bytes after prefill"
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= K < N")
    return k, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True)
    p.add_argument("--needle-dir", default=None)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--cont-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--needle", type=int, nargs="*", default=[1024, 2048])
    p.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--needle-mode", choices=["aware", "agnostic", "both"], default="both")
    p.add_argument("--needle-tokens", type=int, default=12)
    p.add_argument("--speed-context", type=int, default=1024)
    p.add_argument("--speed-steps", type=int, default=32)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--ours", nargs="*", default=OURS_DEFAULT)
    p.add_argument("--kvquant-calibration", default=None, metavar="PATH",
                   help="also run kvquant (bits from --kvquant-bits) with this calibration file")
    p.add_argument("--kvquant-bits", type=int, nargs="+", default=[3, 2])
    p.add_argument("--compression", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--presses", nargs="*", choices=list(KVPRESS_PRESSES), default=list(KVPRESS_PRESSES),
                   help="kvpress presses to run (default: all four)")
    p.add_argument("--quant-backends", nargs="*", default=["quanto", "hqq"])
    p.add_argument("--quant-bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--quant-group-size", type=int, default=64)
    p.add_argument("--quant-residual", type=int, default=128)
    p.add_argument("--no-kvpress", action="store_true")
    p.add_argument("--install-status", default=None, help="JSON of the venv's install steps (from peers.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="measure only rows K, K+N, K+2N, ... (and the reference); peers.py --jobs merges the shards")
    p.add_argument("--out", required=True)
    p.add_argument("--command", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    import transformers

    from kvcompress import load_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    model, tok = load_model(args.model, progress=False)
    model.eval()
    geom = _geometry(model)

    text = load_text(args.data)
    ids = torch.tensor(encode(tok, text), dtype=torch.long)
    install = json.loads(Path(args.install_status).read_text()) if args.install_status else {}

    ref = parse_spec("full")
    rows: list = [ref]
    skipped: list[dict] = [
        {"peer": k, "reason": f"install failed: {v.get('error', '')}"} for k, v in install.items() if not v.get("ok")
    ]
    ours = list(args.ours)
    if args.kvquant_calibration:
        ours += [f"kvquant:bits={b},calibration={args.kvquant_calibration}" for b in args.kvquant_bits]
    for s in ours:
        try:
            rows.append(parse_spec(s))
        except Exception as exc:  # noqa: BLE001
            skipped.append({"peer": f"ours {s}", "reason": str(exc)})
    peer_specs = []
    if not args.no_kvpress:
        sp, sk = _kvpress_specs(args.compression, args.presses)
        peer_specs += sp
        skipped += sk
    if args.quant_backends:
        sp, sk = _quantized_specs(args.quant_backends, args.quant_bits, args.quant_group_size, args.quant_residual)
        peer_specs += sp
        skipped += sk
    candidates = rows[1:] + peer_specs
    order = {s.label: i for i, s in enumerate([ref] + candidates)}
    if args.shard:
        k, n = args.shard
        candidates = candidates[k::n]  # round-robin: this process measures every n-th row (+ the reference)
    probe = windows_from_ids(ids, 128, 1, args.seed)[0].view(1, -1)
    for s in candidates:
        err = _check_spec(s, model, probe)
        if err:
            skipped.append({"peer": s.label, "reason": err})
    bad = {x["peer"] for x in skipped}
    rows = [ref] + [s for s in candidates if s.label not in bad]
    for s in skipped:
        print(f"[peers] skipped {s['peer']}: {s['reason']}", file=sys.stderr, flush=True)

    def family(s):
        return getattr(s, "family", "kvcompress")

    res = {
        s.label: {"spec": s.label, "method": s.name, "options": s.kwargs, "family": family(s),
                  "note": getattr(s, "note", ""), "reference": s is ref, "order": order[s.label]}
        for s in rows
    }

    failed: dict[str, str] = {}
    # perplexity / KL / agreement, reference once per window
    if args.windows:
        P = args.prompt_len
        windows = windows_from_ids(ids, P + args.cont_len, args.windows, args.seed)
        per = {s.label: [] for s in rows}
        mems = {s.label: ([], []) for s in rows}
        raw = {s.label: [] for s in rows}
        for wi, window in enumerate(windows):
            ref_lp = None
            for s in rows:
                torch.manual_seed(args.seed)
                if s.label in failed:
                    continue
                try:
                    with s.make(model) as cache:
                        got = _ppl.teacher_force(model, cache, window, P)
                except Exception as exc:  # noqa: BLE001 - report the peer, carry on with the rest
                    if s is ref:
                        raise
                    failed[s.label] = f"perplexity run failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
                    continue
                if s is ref:
                    ref_lp = got.logprobs
                per[s.label].append(_ppl.compare(ref_lp, got.logprobs, window[P:]))
                mems[s.label][0].append(got.memory_prefill)
                mems[s.label][1].append(got.memory_end)
                raw[s.label].append(getattr(got.memory_prefill, "raw_bytes", None))
                print(f"[peers] ppl window {wi + 1}/{len(windows)} {s.label}", file=sys.stderr, flush=True)
        for label, reason in failed.items():
            skipped.append({"peer": label, "reason": reason})
        rows = [s for s in rows if s.label not in failed]
        for label in failed:
            res.pop(label, None)
        pooled = pool_windows({s.label: per[s.label] for s in rows}, mems, ref.label)
        for s in rows:
            res[s.label].update(pooled[s.label])
            res[s.label]["memory"]["raw_held_bytes_after_prefill"] = raw[s.label]

    # needle
    modes = NEEDLE_MODES[args.needle_mode]
    needle_lens = sorted({n for n in args.needle if n > 0})
    if needle_lens:
        hay = load_text(args.needle_dir) if args.needle_dir else load_text(args.data)
        tasks = [t for n in needle_lens for t in make_needle_tasks(tok, hay, n, tuple(args.needle_depths), 1, args.seed)]
        found = {s.label: [] for s in rows}
        for task in tasks:
            for mode in modes:
                for s in rows:
                    torch.manual_seed(args.seed)
                    found[s.label].append(_needle.run_task(model, tok, s, task, mode, args.needle_tokens))
            print(f"[peers] needle task {task.context_len}@{task.depth} done", file=sys.stderr, flush=True)
        for s in rows:
            res[s.label]["needle"] = {"accuracy": _needle.summarize(found[s.label]), "tasks": found[s.label]}

    # speed, interleaved with the reference
    if not args.no_speed:
        sids = windows_from_ids(ids, args.speed_context, 1, args.seed)[0].view(1, -1)
        for s in rows[1:]:
            torch.manual_seed(args.seed)
            res[s.label]["speed"] = _speed.compare(model, s, ref, sids, args.speed_steps, args.speed_repeats)
            print(f"[peers] speed {s.label}", file=sys.stderr, flush=True)
        res[ref.label]["speed"] = {"ttft_ratio": 1.0, "decode_ratio": 1.0, "reference": True}

    import kvcompress

    result = {
        "command": args.command,
        "seed": args.seed,
        "model": {"name": args.model, **geom, "dtype": str(model.dtype)},
        "data": {"source": args.data, "sha256": text_sha256(text), "tokens": int(ids.numel())},
        "config": {
            "prompt_len": args.prompt_len, "cont_len": args.cont_len, "windows": args.windows,
            "needle": {"context_lens": needle_lens, "depths": args.needle_depths, "modes": list(modes),
                       "haystack": args.needle_dir or args.data} if needle_lens else None,
            "speed": None if args.no_speed else {"context": args.speed_context, "steps": args.speed_steps,
                                                 "repeats": args.speed_repeats},
            "reference": ref.label,
            "shard": list(args.shard) if args.shard else None,
            "compression": args.compression,
            "quant": {"bits": args.quant_bits, "group_size": args.quant_group_size, "residual": args.quant_residual},
        },
        "methods": list(res.values()),
        "skipped": skipped,
        "install": install,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvcompress": kvcompress.__version__,
            "kvpress": _dist_version("kvpress"), "optimum-quanto": _dist_version("optimum-quanto"),
            "hqq": _dist_version("hqq"),
            "threads": torch.get_num_threads(),
        },
        "peak_rss_bytes": _memory.peak_rss_bytes(),
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"[peers] wrote {out / 'peers.json'} ({result['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        raise SystemExit(1)

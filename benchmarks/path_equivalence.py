"""Does the attention path change what a method computes? Logits of every method, old code vs new code.

Run once per code version (``PYTHONPATH`` picks the version), each run writing its logits to a safetensors file,
then compare the two files:

    git worktree add /tmp/wt-before fb8c339        # the last commit before the attention path (#15)
    PYTHONPATH=/tmp/wt-before/src python benchmarks/path_equivalence.py run --out /tmp/before.safetensors
    python benchmarks/path_equivalence.py run --out /tmp/after.safetensors
    python benchmarks/path_equivalence.py compare /tmp/before.safetensors /tmp/after.safetensors

``run``: for the tiny llama / tiny Gemma-3 test models (random weights, seeded) and SmolLM2, each method at fixed
settings prefills a prompt and is teacher-forced ``--steps`` more tokens; the logits of every step are saved.
``compare``: per model and method, the largest |difference| of the logits, the mean KL divergence of the next-token
distributions and the top-1 agreement, old vs new.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

METHODS = {  # settings every version accepts (integer budgets: the same token count under either code)
    "full": {},
    "kivi4": ("kivi", {"bits": 4}),
    "kivi2": ("kivi", {"bits": 2}),
    "logquant": ("logquant", {}),
    "kvquant": ("kvquant", {"nuq": False, "bits": 3}),
    "streaming": ("streaming", {"sink": 4, "budget": 96}),
    "h2o": ("h2o", {"heavy": 48, "recent": 48}),
    "snapkv": ("snapkv", {"budget": 96}),
    "fastkv": ("fastkv", {"tsp_rate": 160, "budget": 96}),
    "fastgen": ("fastgen", {}),
    "minicache": ("minicache", {"start_layer": 15}),
}
TINY = {  # the same methods on the 4-layer test models (smaller windows and budgets for 64-token prompts)
    "kivi4": ("kivi", {"bits": 4, "group_size": 8, "residual": 16}),
    "kivi2": ("kivi", {"bits": 2, "group_size": 8, "residual": 16}),
    "logquant": ("logquant", {"window": 8}),
    "kvquant": ("kvquant", {"nuq": False, "bits": 4, "sink": 2}),
    "streaming": ("streaming", {"sink": 2, "budget": 24}),
    "h2o": ("h2o", {"heavy": 12, "recent": 12}),
    "snapkv": ("snapkv", {"budget": 24, "window": 4}),
    "fastkv": ("fastkv", {"tsp_layer": 1, "tsp_rate": 40, "budget": 24, "window": 4}),
    "fastgen": ("fastgen", {"recovery": 0.6, "special_ids": (0,), "punct_ids": (1, 2, 3)}),
    "minicache": ("minicache", {"start_layer": 1}),
}


def _spec(table: dict, name: str):
    entry = table.get(name, METHODS[name])
    return ("full", {}) if entry == {} else entry


@torch.inference_mode()
def logits_of(model, method: str, options: dict, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ``ids (1, P)`` minus the last ``steps`` tokens, then feed those one at a time: ``(steps + 1, vocab)``."""
    from kvcompress import make_cache

    try:
        from kvcompress.compat import cache_kwargs
    except ImportError:  # pragma: no cover - very old versions
        def cache_kwargs(model, cache):
            return {"past_key_values": cache}

    cache = make_cache(method, model, **options)
    prompt, rest = ids[:, : ids.shape[1] - steps], ids[:, ids.shape[1] - steps :]
    out = [model(prompt, **cache_kwargs(model, cache)).logits[0, -1]]
    for t in range(steps):
        out.append(model(rest[:, t : t + 1], **cache_kwargs(model, cache)).logits[0, -1])
    if hasattr(cache, "close"):
        cache.close()
    return torch.stack(out).float()


def run(args) -> int:
    from safetensors.torch import save_file

    from conftest import make_tiny_gemma3, make_tiny_llama

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = {}
    gen = torch.Generator().manual_seed(3)
    tiny_ids = torch.randint(1, 128, (1, 64 + args.steps), generator=gen)
    for model_name, model in (("tiny-llama", make_tiny_llama()), ("tiny-gemma3", make_tiny_gemma3())):
        for name in METHODS:
            method, options = _spec(TINY, name)
            try:
                results[f"{model_name}/{name}"] = logits_of(model, method, options, tiny_ids, args.steps)
            except Exception as exc:  # noqa: BLE001 - a refusal is recorded, not fatal
                print(f"{model_name}/{name}: refused: {str(exc)[:100]}", file=sys.stderr)
    if args.model:
        from kvcompress import load_model
        from kvcompress.data import encode, load_text

        model, tok = load_model(args.model, progress=False)
        ids = torch.tensor(encode(tok, load_text(args.data))[: args.prompt + args.steps]).view(1, -1)
        for name in METHODS:
            method, options = _spec({}, name)
            try:
                results[f"{args.model}/{name}"] = logits_of(model, method, options, ids, args.steps)
            except Exception as exc:  # noqa: BLE001
                print(f"{args.model}/{name}: refused: {str(exc)[:100]}", file=sys.stderr)
            print(f"{args.model}/{name} done", file=sys.stderr, flush=True)
    save_file({k: v.contiguous() for k, v in results.items()}, args.out)
    return 0


def compare(args) -> int:
    from safetensors.torch import load_file

    old, new = load_file(args.old), load_file(args.new)
    print("| model / method | steps | max abs Δlogit | mean KL(old ‖ new) | top-1 agreement |")
    print("|---|---:|---:|---:|---:|")
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            print(f"| {key} | only in {'old' if key in old else 'new'} | | | |")
            continue
        a, b = old[key], new[key]
        kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
        print(f"| {key} | {a.shape[0]} | {float((a - b).abs().max()):.2e} | {float(kl.sum(-1).mean()):.2e} | "
              f"{100 * float(agree):.0f} % |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--model", default="smollm2-135m", help="also this model ('' to skip)")
    r.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"))
    r.add_argument("--prompt", type=int, default=600)
    r.add_argument("--steps", type=int, default=16)
    r.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())

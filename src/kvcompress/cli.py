"""``kvcompress list | generate | eval | tune | calibrate <method> | profile <what>``."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
import time

from .compat import cache_kwargs
from .registry import KVCompressError

# Sub-commands that live in their own modules: name -> module exposing add_arguments(parser) and run(args).
EVAL_MODULE = "kvcompress.evaluate.cli"
TUNE_MODULE = "kvcompress.tune"
CALIBRATORS = {
    "kvquant": "kvcompress.calibration.kvquant",
    "fastkv": "kvcompress.calibration.fastkv",
}
PROFILES = {
    "spikes": "kvcompress.profiles.spikes",
    "layers": "kvcompress.profiles.layers",
    "heads": "kvcompress.profiles.heads",
}


def parse_options(pairs: list[str] | None) -> dict:
    """``["bits=2", "budget=0.2", "storage=kivi"]`` -> ``{"bits": 2, "budget": 0.2, "storage": "kivi"}``."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise KVCompressError(f"option {pair!r} must look like name=value")
        key, raw = pair.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package does not exist
        return False


def _available(table: dict[str, str]) -> dict[str, str]:
    return {name: mod for name, mod in table.items() if _module_exists(mod)}


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .registry import config_defaults, list_methods

    table = Table(title="kvcompress methods")
    table.add_column("method")
    table.add_column("what it does")
    table.add_column("attention")
    table.add_column("sliding-window layers")
    table.add_column("defaults")
    for name, cls in list_methods().items():
        defaults = ", ".join(f"{k}={v}" for k, v in config_defaults(cls).items())
        table.add_row(name, cls.summary, cls.attention, cls.sliding, defaults)
    console = Console(width=200)
    console.print(table)
    console.print(kernels_line())
    console.print("Per layer, cache.memory_report() says which path each layer takes now (fused-numba, fused-triton, "
                  "chunked: codes dequantized a chunk at a time, dense).")
    return 0


def kernels_line() -> str:
    """Which fused kernels this machine has: numba for CPU tensors, triton for CUDA tensors."""
    import torch

    from . import kernels

    numba = f"numba {kernels._cpu.numba.__version__}" if kernels.AVAILABLE else f"none ({kernels.UNAVAILABLE_REASON})"
    ok, triton = kernels.triton_status()
    cuda = "a CUDA device is present" if torch.cuda.is_available() else "no CUDA device here"
    return (f"Fused kernels: CPU tensors -> {numba}; CUDA tensors -> {f'triton {triton}' if ok else 'none: ' + triton} "
            f"({cuda}); without one a layer takes the chunked path.")


def cmd_generate(args) -> int:
    import torch

    from . import load_model, make_cache

    options = parse_options(args.option)
    model, tok = load_model(args.model)
    cache = make_cache(args.method, model, **options)  # validated before any work
    if args.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tok(text, return_tensors="pt")
    t0 = time.perf_counter()
    with cache, torch.no_grad():
        out = model.generate(
            **inputs, **cache_kwargs(model, cache), max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        dt = time.perf_counter() - t0
        new = out[0, inputs["input_ids"].shape[1] :]
        print(tok.decode(new, skip_special_tokens=True))
        print(f"\n[{len(new)} tokens in {dt:.2f} s] {cache.memory_report()}", file=sys.stderr)
    return 0


def _delegate(table: dict[str, str], what: str, argv_name: str):
    def run(args) -> int:
        mod = importlib.import_module(table[getattr(args, argv_name)])
        return int(mod.run(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered methods, one line each, with their defaults")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("generate", help="prompt in, text out, memory report after")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="full")
    p.add_argument("-o", "--option", action="append", help="method option name=value (repeatable), e.g. -o bits=2")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    if _module_exists(EVAL_MODULE):
        mod = importlib.import_module(EVAL_MODULE)
        p = sub.add_parser("eval", help="perplexity, KL, needle, speed and memory of methods vs the full cache")
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    if _module_exists(TUNE_MODULE):
        mod = importlib.import_module(TUNE_MODULE)
        p = sub.add_parser("tune", help="pick a method and setting for your model and text within a loss you accept")
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    calibrators = _available(CALIBRATORS)
    if calibrators:
        p = sub.add_parser("calibrate", help="calibrate a method on text (writes a calibration file)")
        csub = p.add_subparsers(dest="calibrate_method", required=True)
        for name, modname in calibrators.items():
            mod = importlib.import_module(modname)
            cp = csub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
            mod.add_arguments(cp)
            cp.set_defaults(func=_delegate(calibrators, name, "calibrate_method"))

    profiles = _available(PROFILES)
    if profiles:
        p = sub.add_parser("profile", help="look inside the model: attention spikes, layer similarity, head policies")
        psub = p.add_subparsers(dest="profile_what", required=True)
        for name, modname in profiles.items():
            mod = importlib.import_module(modname)
            pp = psub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
            mod.add_arguments(pp)
            pp.set_defaults(func=_delegate(profiles, name, "profile_what"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KVCompressError as exc:
        print(f"kvcompress: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

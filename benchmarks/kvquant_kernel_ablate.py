"""Where KVQuant's CPU kernel spends its time, and this tree's kernel against a committed one.

Times ``kvquant_layer_serial`` alone over 30 layers x 3 KV heads of random codes (1 % outliers, pre-RoPE per-channel
keys; :class:`attention_microbench.KVQuantLayers`) on one thread, in interleaved rounds, and prints the minimum per
variant (this host's speed drifts by up to ~25 % within minutes; the minimum is the steadiest figure). Variants are
copies of ``kernels/kvquant_cpu.py`` loaded as modules of their own:

* ``--against REV``: the kernel as committed at ``REV`` (``git show``), next to this tree's, with ``REV``'s own
  versions of the sibling modules it imports where they changed since (e.g. :mod:`kvcompress.kernels.lookup`);
* ``--switch-off PIECE ...``: this tree's kernel with one piece switched off by a textual edit (timings only: the
  results are wrong), so the saving is what the piece costs (pieces overlap: the savings do not add up);
* ``--block N ...``: this tree's kernel with ``BLOCK = N``.

    python benchmarks/kvquant_kernel_ablate.py --tokens 8192 --rounds 7 --against HEAD
    python benchmarks/kvquant_kernel_ablate.py --tokens 8192 --rounds 5 --switch-off all
    python benchmarks/kvquant_kernel_ablate.py --block 32 64 128

Earlier sessions ran copies of this script kept in git (``results/kvquant-kernel-session14/ablate.py`` at 49f8f5c,
``results/kvquant-kernel-session17/ablate.py`` at 257b720, ``results/kvquant-kernel-session19/ablate.py`` at 19a12f1).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "src/kvcompress/kernels/kvquant_cpu.py"
HEADS, DIM, ROWS, LAYERS = 3, 64, 3, 30

#: piece -> (text in this tree's kernel, its replacement): the piece's call skipped. Where numba's target has AVX-512
#: the kernel takes the fused pieces (session 38): "keys turned as dequantized" and "fused values" replace key
#: dequantization plus rotation and value dequantization plus accumulation; the unfused pieces below still run on
#: AVX2 targets and, for keys, in blocks whose positions jump ("rotation" switched off also switches the fused keys off)
PIECES = {
    "rotation": [("        if rope:\n            pos0 = ", "        if False:\n            pos0 = ")],
    "outliers": [("            koutliers = kcounts.shape[2] > 0\n", "            koutliers = False\n"),
                 ("            if kcounts.shape[2] > 0:\n                ke = _outliers",
                  "            if False:\n                ke = _outliers"),
                 ("            outliers = vcounts.shape[2] > 0\n", "            outliers = False\n"),
                 ("        if vcounts.shape[2] > 0:\n            ve = _outliers", "        if False:\n            ve = _outliers")],
    "key outlier scatter": [("            if koutliers:\n                ke = _outliers",
                             "            if False:\n                ke = _outliers")],
    "key outlier take": [("ta, nt, off_c, off_s, kheld[hh], koutliers, kf[hh])",
                          "ta, nt, off_c, off_s, kheld[hh], False, kf[hh])")],
    "key dequantization": [("                _turned_keys(kbits,", "                if False: _turned_keys(kbits,"),
                           ("                    _dequant_vec(kbits,", "                    if False: _dequant_vec(kbits,")],
    "value dequantization": [("                _dequant_vec(vbits,", "                if False: _dequant_vec(vbits,")],
    "scores": [("                _scores_vec(qb[hh]", "                if False: _scores_vec(qb[hh]")],
    "value accumulation": [("                _values_vec(vf[hh]", "                if False: _values_vec(vf[hh]")],
    "fused value outliers": [("            outliers = vcounts.shape[2] > 0\n", "            outliers = False\n")],
    "fused values": [("                _level_values(vbits,", "                if False: _level_values(vbits,")],
    "keys turned as dequantized": [("        turned = fused_keys and steady", "        turned = False")],
    # session 40: each stream of the turned keys pinned to one row (what its memory traffic costs), the fused values'
    # outlier flag made a literal, the marks never put back (timings only)
    "turn table rows": [("cc, ss = load16(tc, i, c), load16(ts, i, c)",
                         "cc, ss = load16(tc, 0, c), load16(ts, 0, c)")],
    "held rows": [("a, b = take_marked16(held, i, c, a, True), take_marked16(held, i, e, b, True)",
                   "a, b = take_marked16(held, 0, c, a, True), take_marked16(held, 0, e, b, True)")],
    "turned key rows": [("            store16(sub16(mul16(a, cc), mul16(b, ss)), kf, i, c)\n"
                         "            store16(fma16(a, ss, mul16(b, cc)), kf, i, e)",
                         "            store16(sub16(mul16(a, cc), mul16(b, ss)), kf, 0, c)\n"
                         "            store16(fma16(a, ss, mul16(b, cc)), kf, 0, e)")],
    "value outlier flag": [("        if outliers:  # the block's outliers in place",
                            "        if True:  # the block's outliers in place")],
    "mark reset": [("a, b = take_marked16(held, i, c, a, True), take_marked16(held, i, e, b, True)",
                    "a, b = take_marked16(held, i, c, a, False), take_marked16(held, i, e, b, False)"),
                   ("        last = r0 + _4 >= rows  #", "        last = False  #")],
}


def absolute_imports(text: str) -> str:
    """The kernel's source with its relative imports made absolute (it is loaded from a temporary file)."""
    return re.sub(r"from \.(\w+) import", r"from kvcompress.kernels.\1 import", text)


def load(text: str, name: str, where: Path):
    """``text`` as a module of its own (its numba functions compiled apart from the package's)."""
    path = where / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed(rev: str, path: str) -> str:
    """The text of ``path`` (relative to the repository root) as committed at ``rev``."""
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def with_committed_siblings(text: str, rev: str, where: Path) -> str:
    """The kernel ``text`` of ``rev`` importing ``rev``'s own versions of the sibling modules it imports (``from .lookup
    import ...``) where they differ from this tree's, or import (directly or not) a sibling that does: each loaded as a
    module of its own, itself importing ``rev``'s versions of its own siblings the same way (:mod:`.lookup` takes
    :mod:`.simd`'s vector type: one type for both, even when only :mod:`.simd` changed), and this tree's package for
    the rest. So an intrinsic or type changed since ``rev`` does not leak into its kernel."""
    aliases: dict[str, str | None] = {}

    def resolve(source: str) -> str:
        for name in sorted(set(re.findall(r"from \.(\w+) import", source))):
            if name not in aliases:
                path = f"{Path(KERNEL).parent}/{name}.py"
                theirs = committed(rev, path)
                aliases[name] = None  # (while its own siblings are resolved)
                resolved = resolve(theirs)
                if resolved != theirs or theirs != (ROOT / path).read_text():
                    alias = f"{name}_at_{re.sub(r'[^0-9A-Za-z]', '_', rev)}"
                    sys.modules[alias] = load(absolute_imports(resolved), alias, where)
                    aliases[name] = alias
            if aliases[name]:
                source = source.replace(f"from .{name} import", f"from {aliases[name]} import")
        return source

    return resolve(text)


def variants(args, where: Path) -> dict[str, str]:
    """Variant name -> kernel source."""
    here = absolute_imports((ROOT / KERNEL).read_text())
    out = {"this tree": here}
    if args.against:
        theirs = with_committed_siblings(committed(args.against, KERNEL), args.against, where)
        out[args.against] = absolute_imports(theirs)
    pieces = list(PIECES) if args.switch_off == ["all"] else args.switch_off
    for piece in pieces:
        text = here
        for a, b in PIECES[piece]:
            if a not in text:
                raise SystemExit(f"the kernel no longer has the edit point of {piece!r}: {a!r}")
            text = text.replace(a, b)
        out[f"no {piece}"] = text
    for block in args.block:
        text, n = re.subn(r"\nBLOCK = \d+\n", f"\nBLOCK = {block}\n", here)
        if n != 1:
            raise SystemExit("the kernel no longer defines BLOCK on a line of its own")
        out[f"BLOCK = {block}"] = text
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bits", type=int, default=3, choices=[2, 3, 4])
    ap.add_argument("--against", default=None, help="a git revision whose kernel runs next to this tree's")
    ap.add_argument("--switch-off", nargs="*", default=[], choices=[*PIECES, "all"], metavar="PIECE",
                    help=f"pieces to switch off one at a time ({', '.join(PIECES)}; or all)")
    ap.add_argument("--block", nargs="*", type=int, default=[], help="BLOCK sizes to try")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from attention_microbench import KVQuantLayers

    from kvcompress import kernels

    torch.set_num_threads(1)
    where = Path(tempfile.mkdtemp())
    modules = {name: load(text, f"kvq_{i}", where) for i, (name, text) in enumerate(variants(args, where).items())}
    n = args.tokens
    layers = KVQuantLayers(n, args.bits)
    calls = []
    for q, (ks, vs) in zip(layers.q, layers.streams):
        streams, rotation = kernels._kvquant_code_args(n, ks.codes(), vs.codes(), layers.rope, 1, HEADS, DIM)
        qg = (q.reshape(1, HEADS, ROWS, DIM) * DIM**-0.5).numpy()
        out = (np.empty((1, HEADS, ROWS, DIM), np.float32), np.empty((1, HEADS, ROWS), np.float32),
               np.empty((1, HEADS, ROWS), np.float32))
        calls.append((qg, *streams, kernels._column_map(DIM, HEADS), *rotation, kernels._ALL_VALID, n, n,
                      *kernels._NO_TAIL, *out))
    first = {}
    for name, module in modules.items():  # compile, and keep each variant's output of the first layer
        module.kvquant_layer_serial(*calls[0])
        first[name] = [a.copy() for a in calls[0][-3:]]
    times = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name, module in modules.items():
            t0 = time.perf_counter()
            for call in calls:
                module.kvquant_layer_serial(*call)
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = min(times["this tree"])
    per = LAYERS * n * HEADS
    print(f"{n} tokens, {args.bits}-bit, {LAYERS} layers x {HEADS} KV heads, min of {args.rounds} interleaved rounds; "
          f"ns per (token, KV head) = ms * 1e6 / {per}")
    print("| variant | ms | ns per (token, KV head) | vs this tree |\n|---|---:|---:|---:|")
    for name, t in times.items():
        best = min(t)
        print(f"| {name} | {best:.1f} | {best * 1e6 / per:.1f} | {best / base:.2f}x |")
    ref = first["this tree"]
    for name, out in first.items():
        if name != "this tree":  # switched-off pieces differ by design; a revision should not
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(out, ref))
            print(f"- {name}: first layer's (acc, m, l) max |diff| against this tree {diff:.3g}")


if __name__ == "__main__":
    main()

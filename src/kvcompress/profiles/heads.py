"""FastGen's policy per (layer, KV head) after profiling real prompts: picture + share of each policy

``kvcompress profile heads --model smollm2-135m --data FILE --tokens 1024 --samples 2 --recovery 0.9 0.95 0.98``

Prefills ``samples`` windows of ``tokens`` tokens through a ``fastgen`` cache and reads, per layer and KV head,
the recovery of each hybrid policy (special, +punct, +frequent, +local, full; see
:mod:`kvcompress.methods.fastgen_policies`). The recoveries do not depend on T, so every T of ``--recovery`` is
answered from the same prefill: the chosen policy is the cheapest hybrid with recovery >= T. Writes
``heads.json`` (policies and recoveries), ``heads.md`` (share of each policy per T) and ``heads.png`` (one panel
per T: layers x KV heads coloured by the policy most windows chose; sliding-window layers, which FastGen leaves
as they are, in grey) under ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..compat import cache_kwargs
from . import add_common_arguments
from ..config import check_positive_int, check_ratio
from ..methods.fastgen_policies import HYBRID_NAMES, HYBRIDS, choose

DEFAULT_OUT = "results/profile-heads"
SLIDING = "sliding window (not profiled)"


@torch.inference_mode()
def prompt_recoveries(model, tokenizer, windows: torch.Tensor, local: float = 0.3, frequent: float = 0.3) -> list:
    """Per window: per layer either None (sliding-window layer) or ``(kv_heads, 5)`` recoveries of the hybrids."""
    from ..cache import make_cache

    out = []
    for row in windows:
        # the smallest admissible T makes every layer profile (T only changes the choice, not the recoveries)
        with make_cache("fastgen", model, tokenizer=tokenizer, recovery=1e-9, local=local, frequent=frequent) as cache:
            model(input_ids=row.view(1, -1), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            out.append([None if getattr(layer, "recoveries", None) is None else layer.recoveries[0].clone() for layer in cache.layers])
    return out


def policy_table(recs: list, thresholds: list[float]) -> dict:
    """``{T: {"heads": [window][layer][head] policy name or None, "share": {policy: fraction}}}``."""
    result = {}
    for t in thresholds:
        heads = [[None if r is None else [HYBRID_NAMES[HYBRIDS.index(p)] for p in choose(r, t)] for r in win] for win in recs]
        flat = [name for win in heads for layer in win if layer is not None for name in layer]
        share = {name: flat.count(name) / max(len(flat), 1) for name in HYBRID_NAMES}
        result[t] = {"heads": heads, "share": share}
    return result


def _majority(table_t: dict) -> list:
    """Per layer and head: the policy most windows chose (None for sliding layers)."""
    wins = table_t["heads"]
    out = []
    for l, layer in enumerate(wins[0]):
        if layer is None:
            out.append(None)
            continue
        names = [[win[l][h] for win in wins] for h in range(len(layer))]
        out.append([max(HYBRID_NAMES, key=lambda n: (col.count(n), -HYBRID_NAMES.index(n))) for col in names])
    return out


def plot(table: dict, path: Path, title: str) -> Path:
    from ..plots import save, subplots
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = ["#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b3", "#bbbbbb"]
    cmap = ListedColormap(colors)
    ts = list(table)
    fig, axes = subplots(1, len(ts), figsize=(2.2 + 2.0 * len(ts), 6.5), dpi=120, squeeze=False)
    for ax, t in zip(axes[0], ts):
        major = _majority(table[t])
        kv = max(len(layer) for layer in major if layer is not None)
        grid = torch.full((len(major), kv), float(len(HYBRID_NAMES)))
        for l, layer in enumerate(major):
            if layer is not None:
                grid[l] = torch.tensor([float(HYBRID_NAMES.index(n)) for n in layer])
        ax.imshow(grid.numpy(), cmap=cmap, vmin=-0.5, vmax=len(colors) - 0.5, aspect="auto", interpolation="nearest")
        ax.set_title(f"T = {t}", fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(kv))
        ax.set_ylabel("layer")
    labels = [*HYBRID_NAMES, SLIDING]
    fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, labels)], loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save(fig, path, rect=(0, 0.08, 1, 0.95))


def markdown(table: dict, title: str) -> str:
    lines = [f"### {title}", "", "| T | " + " | ".join(HYBRID_NAMES) + " |", "|---" * (len(HYBRID_NAMES) + 1) + "|"]
    for t, row in table.items():
        lines.append(f"| {t} | " + " | ".join(f"{100 * row['share'][n]:.1f} %" for n in HYBRID_NAMES) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    add_common_arguments(parser, tokens=1024, samples=2, out=DEFAULT_OUT)
    parser.add_argument("--recovery", type=float, nargs="+", default=[0.9, 0.95, 0.98], help="T values (default 0.9 0.95 0.98)")
    parser.add_argument("--local", type=float, default=0.3, help="r_l (default 0.3)")
    parser.add_argument("--frequent", type=float, default=0.3, help="r_f (default 0.3)")


def run(args) -> int:
    from .. import load_model
    from ..data import load_text, token_windows

    check_positive_int(args.tokens, "--tokens", "profile heads")
    check_positive_int(args.samples, "--samples", "profile heads")
    for t in args.recovery:
        check_ratio(t, "--recovery", "profile heads", high_open=False)
    model, tok = load_model(args.model)
    windows = token_windows(tok, load_text(args.data), args.tokens, args.samples, args.seed)
    recs = prompt_recoveries(model, tok, windows, args.local, args.frequent)
    table = policy_table(recs, list(args.recovery))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.model}: FastGen policy per KV head ({args.samples} x {args.tokens} tokens of {Path(str(args.data)).name})"
    (out / "heads.md").write_text(markdown(table, title))
    dump = {
        "model": args.model,
        "tokens": args.tokens,
        "samples": args.samples,
        "local": args.local,
        "frequent": args.frequent,
        "hybrids": list(HYBRID_NAMES),
        "recoveries": [[None if r is None else r.tolist() for r in win] for win in recs],
        "policies": {str(t): row for t, row in table.items()},
    }
    (out / "heads.json").write_text(json.dumps(dump, indent=1))
    plot(table, out / "heads.png", title)
    print(markdown(table, title))
    print(f"wrote {out / 'heads.md'}, {out / 'heads.json'}, {out / 'heads.png'}")
    return 0

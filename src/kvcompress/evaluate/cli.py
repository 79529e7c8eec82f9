"""``kvcompress eval``: perplexity, KL, needle, speed and memory of methods vs the full cache."""

from __future__ import annotations

import shlex
import sys
import time

TASKS = ("ppl", "needle", "speed", "ruler")


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, local directory or HF id")
    p.add_argument(
        "--methods",
        nargs="*",
        default=None,
        metavar="SPEC",
        help='method specs name[:opt=value,...], e.g. full "kivi:bits=2" "snapkv:budget=0.2" '
        "(default: every registered method at the operating point of evaluate/spec.py EVAL_POINTS; a method that "
        "refuses is listed with its reason)",
    )
    p.add_argument(
        "--data", default="pydoc", help="'pydoc' (built-in prose), 'stdlib-code' (Python's own .py files), a text file, a directory of .txt, or hf:NAME[:CONFIG[:SPLIT]]"
    )
    p.add_argument("--prompt-len", type=int, default=512, help="P: prompt tokens the method compresses (default 512)")
    p.add_argument("--cont-len", type=int, default=128, help="C: tokens teacher-forced one at a time (default 128)")
    p.add_argument("--windows", type=int, default=2, help="non-overlapping P+C windows (default 2; 0 = no ppl)")
    p.add_argument("--needle", type=int, nargs="+", default=[1024], help="needle context lengths (default 1024; 0 = skip)")
    p.add_argument("--needle-dir", default=None, help="haystack: a directory of essays or a text file (default: pydoc)")
    p.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    p.add_argument("--needle-per-depth", type=int, default=1, help="tasks per depth and length (default 1)")
    p.add_argument("--needle-mode", choices=["aware", "agnostic", "both"], default="aware",
                   help="aware: the question is in the prompt the method compresses; agnostic: asked after (default aware)")
    p.add_argument("--needle-tokens", type=int, default=12, help="greedy tokens decoded for the answer (default 12)")
    p.add_argument("--speed-context", type=int, default=2048, help="prompt tokens for the speed runs (default 2048)")
    p.add_argument("--speed-steps", type=int, default=16, help="decode steps timed per speed run (default 16)")
    p.add_argument("--speed-repeats", type=int, default=2, help="interleaved full/method rounds (default 2; median)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=None, metavar="TASK",
        help="parts to run: ppl needle speed ruler (default: ppl needle speed, as the --windows/--needle/--no-speed "
        "options say; naming tasks runs only those)",
    )
    p.add_argument("--ruler-lengths", type=int, nargs="+", default=None,
                   help="RULER context lengths (default 1024 2048 4096 8192, clamped to the model's positions)")
    p.add_argument("--ruler-per-task", type=int, default=15,
                   help="RULER tasks per family and length (default 15: 105 per length, binomial SE <= 4.9 points)")
    p.add_argument("--ruler-mode", choices=["aware", "agnostic", "both"], default="aware",
                   help="aware: the question is in the prompt the method compresses; agnostic: asked after (default aware)")
    p.add_argument("--ruler-families", nargs="+", default=None, metavar="FAMILY",
                   help="RULER task families (default all: niah_single niah_multikey niah_multivalue niah_multiquery vt cwe fwe)")
    p.add_argument("--ruler-dir", default=None, help="RULER haystack: a directory of essays or a text file (default: pydoc)")
    p.add_argument("--reference", default="full", help="the reference cache spec (default full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default results/eval-<timestamp>)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods evaluated at once, in threads, in the perplexity and needle phases (default 1; with "
                        "--threads 1, up to the number of cores); the speed phase runs one at a time")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from rich.console import Console

    from ..config import set_threads
    from ..registry import KVCompressError
    from . import run_eval
    from .report import rich_table, verdict

    set_threads(args.threads)
    if args.jobs < 1:
        raise KVCompressError(f"--jobs must be >= 1, got {args.jobs}")

    out = args.out or f"results/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    tasks = set(args.tasks or ("ppl", "needle", "speed"))
    if "ruler" not in tasks and (args.ruler_lengths or args.ruler_families or args.ruler_dir):
        raise KVCompressError("--ruler-lengths / --ruler-families / --ruler-dir need --tasks ... ruler")
    result = run_eval(
        args.model,
        args.methods or None,
        data=args.data,
        prompt_len=args.prompt_len,
        cont_len=args.cont_len,
        windows=args.windows if "ppl" in tasks else 0,
        needle=args.needle if "needle" in tasks else (),
        needle_dir=args.needle_dir,
        needle_depths=args.needle_depths,
        needle_per_depth=args.needle_per_depth,
        needle_mode=args.needle_mode,
        needle_tokens=args.needle_tokens,
        speed=not args.no_speed and "speed" in tasks,
        speed_context=args.speed_context,
        speed_steps=args.speed_steps,
        speed_repeats=args.speed_repeats,
        ruler=(args.ruler_lengths or True) if "ruler" in tasks else (),
        ruler_dir=args.ruler_dir,
        ruler_per_task=args.ruler_per_task,
        ruler_mode=args.ruler_mode,
        ruler_families=args.ruler_families,
        reference=args.reference,
        seed=args.seed,
        out=out,
        progress=not args.no_progress,
        command=shlex.join(["kvcompress"] + sys.argv[1:]),
        jobs=args.jobs,
    )
    console = Console(width=max(Console().width, 160))
    console.print(rich_table(result))
    for s in result["skipped"]:
        console.print(f"[yellow]not run {s['method']}[/]: {s['reason']}", highlight=False)
    for line in verdict(result):
        console.print(line.replace("`", ""), highlight=False, markup=False)
    console.print(f"wrote {', '.join(result['files'].values())} ({result['timings']['total_s']:.0f} s)")
    return 0

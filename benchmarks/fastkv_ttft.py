"""FastKV prefill speed: TTFT ratio full / fastkv, interleaved in one process, plus the last prompt token's
next-token KL(full || fastkv) and top-1 agreement from the same runs.

    python benchmarks/fastkv_ttft.py --lengths 2048 4096 --repeats 3
    python benchmarks/fastkv_ttft.py --lengths 2048 --tsp-layers 4 8 11 14 18 22 26   # tsp_layer sweep

Each round times one full-cache prefill and one fastkv prefill back to back (order alternating per round) on
the same prompt; the ratio is the median over rounds of full_time / fastkv_time (> 1 = fastkv is faster).
Absolute times are printed for context only: the machine is shared, only the interleaved ratios mean anything.
Besides wall-clock TTFT the process CPU time of each prefill is recorded: on a CPU shared by other jobs it is
the steadier measure of the work done (use ``--threads 1`` so that no time is spent spinning between threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompress.compat import cache_kwargs
from kvcompress import load_model, make_cache
from kvcompress.data import load_text, token_windows


@torch.inference_mode()
def prefill(model, ids, method, **options):
    """Seconds for one prefill through a fresh cache, and the last prompt token's log-probabilities."""
    with make_cache(method, model, **options) as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
        seconds = (time.perf_counter() - t0, time.process_time() - c0)
        fraction = cache.method.prefill_fraction(ids.shape[1]) if method == "fastkv" else 1.0
        layer = getattr(cache.method, "tsp_layer", None)
    return seconds, logits.float().log_softmax(-1), fraction, layer


def measure(model, ids, repeats, options):
    rounds = []
    for r in range(repeats):
        order = ("full", "fastkv") if r % 2 == 0 else ("fastkv", "full")
        got = {m: prefill(model, ids, m, **(options if m == "fastkv" else {})) for m in order}
        rounds.append(got)
    ref, ours = rounds[0]["full"][1], rounds[0]["fastkv"][1]
    wall = [g["full"][0][0] / g["fastkv"][0][0] for g in rounds]
    cpu = [g["full"][0][1] / g["fastkv"][0][1] for g in rounds]
    return {
        "ratio": statistics.median(wall),
        "ratios": wall,
        "cpu_ratio": statistics.median(cpu),
        "cpu_ratios": cpu,
        "full_s": statistics.median(g["full"][0][0] for g in rounds),
        "fastkv_s": statistics.median(g["fastkv"][0][0] for g in rounds),
        "kl": float((ref.exp() * (ref - ours)).sum()),
        "top1": bool(ref.argmax() == ours.argmax()),
        "fraction": rounds[0]["fastkv"][2],
        "tsp_layer": rounds[0]["fastkv"][3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/paul-graham-essays")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tsp-rate", type=float, default=0.2)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--tsp-layers", type=int, nargs="+", default=[None])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, progress=False)
    text = load_text(args.data)
    print(f"model {args.model}, data {args.data}, tsp_rate {args.tsp_rate}, budget {args.budget}, "
          f"{args.repeats} interleaved rounds, torch threads {torch.get_num_threads()}")
    print("| prompt | tsp_layer | prefill work | TTFT full (s) | TTFT fastkv (s) | TTFT ratio wall (median) | rounds | "
          "CPU-time ratio (median) | rounds | last-token KL | top-1 same |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        ids = token_windows(tok, text, n, 1, seed=0)
        prefill(model, ids[:, :256], "full")  # warm-up
        for layer in args.tsp_layers:
            options = {"tsp_rate": args.tsp_rate, "budget": args.budget}
            if layer is not None:
                options["tsp_layer"] = layer
            r = measure(model, ids, args.repeats, options)
            print(f"| {n} | {r['tsp_layer']} | {r['fraction']:.2f} | {r['full_s']:.2f} | {r['fastkv_s']:.2f} | "
                  f"{r['ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['cpu_ratio']:.2f}x | "
                  f"{', '.join(f'{x:.2f}' for x in r['cpu_ratios'])} | {r['kl']:.4f} | "
                  f"{'yes' if r['top1'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()

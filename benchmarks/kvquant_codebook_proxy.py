"""KVQuant codebooks on held-out text: the second-order estimate of the loss increase, sum F * (x - Q(x))^2.

Fits per layer (3 bits, 1 % outliers, per-channel pre-RoPE keys with thresholds from the calibration text; values
per token, over all KV heads or per head) a uniform, a Fisher-weighted (the paper), an unweighted and a capped
(Fisher clipped at its 99th percentile) k-means codebook on the calibration text, then sums the Fisher-weighted
squared error of each on held-out windows (Fisher = squared gradient of the NLL there). Also the share of held-out
key values outside the calibration thresholds (they go to the sparse part at run time).

    python benchmarks/kvquant_codebook_proxy.py --calib ../shared/data/paul-graham-essays \
        --heldout ../shared/data/wikitext-2-raw/wiki.test.raw --heldout-seed 1

Prints Markdown (errors relative to the uniform codebook; lower is better). One thread; ~10 min on a loaded core.
"""

from __future__ import annotations

import argparse

import torch

from kvcompress import load_model
from kvcompress.calibration.kvquant import collect, fit_levels, normalized_inliers, read_text
from kvcompress.data import load_text, token_windows
from kvcompress.quant import outlier_thresholds, quantize_codebook


def _stats(x, frac, per_channel, heads, lo=None, hi=None):
    """(xn, inlier mask, offset, scale) as the cache normalizes; per-channel ranges from (lo, hi) if given."""
    if per_channel:
        if lo is None:
            lo, hi = outlier_thresholds(x, frac, axis=0)
        off, sc = ((hi + lo) / 2), ((hi - lo) / 2)
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        return ((x - off) / sc).clamp(-1, 1), (x >= lo) & (x <= hi), off, sc, lo, hi
    xn, mask, _, _ = normalized_inliers(x, frac, False, heads)
    T, w = x.shape
    lo, hi = outlier_thresholds(x, frac, axis=-1)
    xc = torch.minimum(torch.maximum(x, lo), hi).reshape(T, heads, w // heads)
    mn, mx = xc.amin(-1, keepdim=True), xc.amax(-1, keepdim=True)
    off, sc = ((mx + mn) / 2).expand_as(xc).reshape(T, w), ((mx - mn) / 2).expand_as(xc).reshape(T, w)
    return xn, mask, off, sc, None, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--heldout-seed", type=int, default=1, help="not the evaluation's seed 0")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--outliers", type=float, default=0.01)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(a.model, progress=False)
    ids = torch.tensor(tok(read_text([a.calib]))["input_ids"])
    starts = torch.linspace(0, ids.numel() - 1024, 16).long()
    cal = collect(model, torch.stack([ids[s : s + 1024] for s in starts]), 1)
    held = collect(model, token_windows(tok, load_text(a.heldout), 1024, 4, seed=a.heldout_seed), 1)
    heads, frac, bits = model.config.num_key_value_heads, a.outliers, a.bits
    tot, out_rate = {}, []
    for c, h in zip(cal, held):
        groups = {"K (per channel, pre-RoPE)": ("k", "gk", True, 1), "V per token": ("v", "fv", False, 1),
                  "V per token and head": ("v", "fv", False, heads)}
        for name, (xk, fk, per_channel, hd) in groups.items():
            x, F = c[xk].float(), (c[fk] ** 2 if xk == "k" else c[fk])
            xt, Ft = h[xk].float(), (h[fk] ** 2 if xk == "k" else h[fk])
            xn, mask, _, _, lo, hi = _stats(x, frac, per_channel, hd)
            Fm = F[mask]
            cap = torch.quantile(Fm[torch.randperm(Fm.numel(), generator=torch.Generator().manual_seed(0))[:10**6]], 0.99)
            books = {"uniform": torch.linspace(-1, 1, 1 << bits), "Fisher k-means (paper)": fit_levels(xn[mask], Fm, bits)[0],
                     "unweighted k-means": fit_levels(xn[mask], torch.ones_like(Fm), bits)[0],
                     "Fisher capped at p99": fit_levels(xn[mask], Fm.clamp(max=cap), bits)[0]}
            xnt, mt, off, sc, _, _ = _stats(xt, frac, per_channel, hd, lo, hi)
            if per_channel:
                out_rate.append(float((~mt).float().mean()))
            for bname, cb in books.items():
                q = cb[quantize_codebook(xnt, cb).long()] * sc + off
                tot[(name, bname)] = tot.get((name, bname), 0.0) + float((((xt - q) ** 2) * Ft)[mt].sum())
    print(f"{a.model}: {bits} bits, {100 * frac:g} % outliers; calibration {a.calib} (16 x 1024), held-out "
          f"{a.heldout} (4 x 1024, seed {a.heldout_seed}); held-out key values outside the calibration thresholds: "
          f"{100 * sum(out_rate) / len(out_rate):.2f} % (max layer {100 * max(out_rate):.2f} %)\n")
    names = list(dict.fromkeys(b for _, b in tot))
    print("| stream | uniform sum F·err² | " + " | ".join(f"{n} (rel.)" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for g in dict.fromkeys(g for g, _ in tot):
        u = tot[(g, "uniform")]
        print(f"| {g} | {u:.3g} | " + " | ".join(f"{tot[(g, n)] / u:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()

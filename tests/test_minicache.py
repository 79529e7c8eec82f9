"""MiniCache: SLERP math, magnitude restore, retention, bytes from held tensors, real storage reduction, generation
on tiny llama / tiny gemma / batch 2, storage composition, the layer-similarity profile, bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import kvcompress
from kvcompress import KVCompressError, make_cache
from kvcompress.methods.minicache import (
    ExactLayer,
    MergedLayer,
    MiniCacheConfig,
    Segment,
    StorageLayer,
    layer_pairs,
    merge_states,
    retained,
    retained_fractions,
    similar_pairs,
    slerp,
    unit,
)
from kvcompress.storage import make_storage
from kvcompress.compat import cache_kwargs


def _ids(batch, n, seed=0):
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, ids, **opts):
    cache = make_cache("minicache", model, **opts)
    with torch.no_grad():
        model(ids, **cache_kwargs(None, cache))
    return cache


# ---------------------------------------------------------------------------------------------------------- math


def test_slerp_endpoints_unit_norm_and_midpoint():
    gen = torch.Generator().manual_seed(0)
    a, b = unit(torch.randn(5, 16, generator=gen))[1], unit(torch.randn(5, 16, generator=gen))[1]
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    for t in (0.3, 0.5, 0.6):
        e = slerp(a, b, t)
        assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-6)
        # the angle to a is t * omega, the angle to b is (1 - t) * omega
        omega = torch.acos((a * b).sum(-1))
        assert torch.allclose(torch.acos((e * a).sum(-1).clamp(-1, 1)), t * omega, atol=1e-4)
        assert torch.allclose(torch.acos((e * b).sum(-1).clamp(-1, 1)), (1 - t) * omega, atol=1e-4)
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp(x, y, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2), atol=1e-6)


def test_identical_and_parallel_states_merge_exactly():
    x = torch.randn(1, 2, 7, 16, generator=torch.Generator().manual_seed(1))
    for scale in (1.0, 3.5):  # same direction, other magnitude
        e, mags, dist = merge_states(x, scale * x, 0.6)
        assert torch.allclose(dist, torch.zeros_like(dist), atol=2e-3)
        assert torch.allclose(mags[0].unsqueeze(-1) * e, x, atol=1e-5)
        assert torch.allclose(mags[1].unsqueeze(-1) * e, scale * x, atol=1e-5)


def test_restore_is_magnitude_times_shared_direction():
    """gamma = 0 (nothing retained): layer j reads back |x_j| * e, e the SLERP of the two directions."""
    gen = torch.Generator().manual_seed(2)
    ka, va, kb, vb = (torch.randn(2, 3, 9, 16, generator=gen) for _ in range(4))
    g = kvcompress.ModelGeometry(4, 4, 3, 16, ("full_attention",) * 4, None, None, "x", torch.float32)
    cfg = MiniCacheConfig(t=0.6, gamma=0.0)
    seg = Segment(lambda: make_storage("fp16", g), 0, torch.float16)
    seg.add(ka, va, kb, vb, cfg)
    for side, (k, v) in enumerate(((ka, va), (kb, vb))):
        rk, rv = seg.restore(side, torch.float32)
        for got, x, a, b in ((rk, k, ka, kb), (rv, v, va, vb)):
            e = slerp(unit(a)[1], unit(b)[1], 0.6)
            assert torch.allclose(got, x.norm(dim=-1, keepdim=True) * e, rtol=2e-3, atol=2e-3)
            assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), rtol=2e-3)  # magnitudes are kept
    assert seg.retained_entries() == 0


def test_average_merge_reads_back_the_weighted_average():
    gen = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(1, 1, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    e, mags, _ = merge_states(xa, xb, 0.5, "average")
    for side in (0, 1):
        assert torch.allclose(mags[side].unsqueeze(-1) * e, (xa + xb) / 2, atol=1e-6)


def test_retention_picks_the_largest_angular_distances():
    # token i of layer l is layer l-1's direction rotated by angle[i] in a 2-d plane
    angles = torch.tensor([0.1, 0.2, 1.5, 0.15, 0.12, 1.4, 0.3, 0.11])
    a = torch.zeros(1, 1, 8, 4)
    a[..., 0] = 1.0
    b = torch.zeros(1, 1, 8, 4)
    b[0, 0, :, 0], b[0, 0, :, 1] = torch.cos(angles), torch.sin(angles)
    _, _, dist = merge_states(a, b, 0.5)
    assert torch.allclose(dist[0, 0], angles / math.pi, atol=1e-5)
    # normalized: (d - min) / (max - min); keep >= 1 - gamma
    assert retained(dist, 0.05)[0, 0].nonzero().flatten().tolist() == [2]
    assert retained(dist, 0.15)[0, 0].nonzero().flatten().tolist() == [2, 5]
    assert not retained(dist, 0.0).any() and retained(dist, 1.0).all()
    # the retained entries come back exactly (both layers), the others merged
    g = kvcompress.ModelGeometry(2, 1, 1, 4, ("full_attention",) * 2, None, None, "x", torch.float32)
    seg = Segment(lambda: make_storage("fp16", g), 0, torch.float16)
    seg.add(a, a, b, b, MiniCacheConfig(gamma=0.15))
    assert seg.kept_idx.joined()[0].tolist() == [2, 5]
    rb = seg.restore(1, torch.float32)[0]
    assert torch.allclose(rb[0, 0, [2, 5]], b[0, 0, [2, 5]], atol=1e-3)
    assert not torch.allclose(rb[0, 0, 6], b[0, 0, 6], atol=1e-3)


def test_layer_pairs_by_type():
    full, slide = "full_attention", "sliding_attention"
    assert layer_pairs((full,) * 30, 15) == [(14, 15), (16, 17), (18, 19), (20, 21), (22, 23), (24, 25), (26, 27),
                                              (28, 29)]
    assert layer_pairs((full,) * 4, 1) == [(0, 1), (2, 3)]
    gemma = tuple(full if (i + 1) % 6 == 0 else slide for i in range(18))  # 5 sliding : 1 full
    assert layer_pairs(gemma, 9) == [(8, 9), (12, 13), (14, 15)]


# ---------------------------------------------------------------------------------------------------------- bytes


def test_bytes_are_held_tensors_and_hand_formula(tiny_model):
    """Prefill (batch 2, 40 tokens, all 4 layers merged in 2 pairs): bytes = one direction tensor (K, V) + 2
    magnitude vectors per pair + the retained entries (exact K/V of both layers + an int32 index), with the
    retained count recomputed independently from a full fp16 cache of the same prompt."""
    b, n, h, d = 2, 40, 2, 16
    ids = _ids(b, n)
    cache = _prefill(tiny_model, ids, start_layer=1, gamma=0.1)
    held = [t for layer in cache.layers for t in layer.held_tensors() if t is not None]
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in held)
    full = make_cache("full", tiny_model, dtype="float16")
    with torch.no_grad():
        tiny_model(ids, **cache_kwargs(None, full))
    expect = 0
    for a, c in ((0, 1), (2, 3)):
        ka, va, kb, vb = full.layers[a].k, full.layers[a].v, full.layers[c].k, full.layers[c].v
        r = int((retained(merge_states(ka, kb, 0.6)[2], 0.1) | retained(merge_states(va, vb, 0.6)[2], 0.1)).sum())
        assert r > 0
        direction = b * h * n * d * 2 * 2  # K and V directions, fp16
        magnitudes = 2 * (2 * b * h * n * 2)  # two layers x (K, V) x tokens, fp16
        kept = 2 * (r * d * 2 * 2) + r * 4  # both layers' exact K/V + int32 index
        span = 2 * 2 * b * h * 4  # running distance range: (min, max) x (K, V) per row, fp32
        assert cache.layers[a].nbytes() + cache.layers[c].nbytes() == direction + magnitudes + kept + span
        expect += direction + magnitudes + kept + span
    assert cache.nbytes() == expect
    assert cache.reference_nbytes() == 4 * b * n * h * d * 2 * 2


def test_merged_layers_really_hold_less(tiny_model):
    ids = _ids(1, 64)
    cache = _prefill(tiny_model, ids, select="depth")  # S = L/2 = 2: pair (1, 2), layers 0 and 3 unmerged
    kinds = [type(l) for l in cache.layers]
    assert kinds == [ExactLayer, MergedLayer, MergedLayer, ExactLayer]
    pair = cache.layers[1].nbytes() + cache.layers[2].nbytes()
    ref = cache.layers[1].reference_nbytes() + cache.layers[2].reference_nbytes()
    assert pair < 0.7 * ref  # head_dim 16: magnitudes + retained entries are a larger share than at d = 64
    # one (b, h, n, d) K and one V tensor for the whole pair (the directions), none per layer
    big = [t for i in (1, 2) for t in cache.layers[i].held_tensors() if t is not None and t.shape[-2:] == (64, 16)]
    assert len(big) == 2
    assert cache.layers[0].nbytes() == cache.layers[0].reference_nbytes()


# ---------------------------------------------------------------------------------------------------------- generation


def test_noop_gamma_one_reproduces_full_fp16(tiny_model):
    ids = _ids(2, 30, seed=4)
    outs = []
    for method, opts in (("full", {"dtype": "float16"}), ("minicache", {"gamma": 1.0, "start_layer": 1, "block": 4})):
        cache = make_cache(method, tiny_model, **opts)
        with torch.no_grad():
            logits = [tiny_model(ids, **cache_kwargs(None, cache)).logits[:, -1]]
            for s in range(10):
                logits.append(tiny_model(torch.full((2, 1), 5 + s), **cache_kwargs(None, cache)).logits[:, -1])
        outs.append(torch.stack(logits))
    # the merged layers attend through kvcompress's attention (fp32, another summation order than sdpa's)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_decoded_tokens_merge_in_blocks(tiny_model):
    ids = _ids(1, 20)
    cache = make_cache("minicache", tiny_model, start_layer=1, block=4)
    with torch.no_grad():
        tiny_model(ids, **cache_kwargs(None, cache))
        pair = cache.layers[1].pair
        assert pair.pending == [None, None] and pair.segments[0].length == 20  # prefill merged at once
        for s in range(6):
            tiny_model(torch.tensor([[3 + s]]), **cache_kwargs(None, cache))
    assert pair.segments[0].length == 24 and pair.pending[0][0].shape[2] == 2 and pair.pending[1][0].shape[2] == 2
    assert cache.get_seq_length() == 26 and all(l.attended_length() == 26 for l in cache.layers)


@pytest.mark.parametrize("which", ["tiny_model", "tiny_gemma"])
def test_generate_batch2(request, which):
    model = request.getfixturevalue(which)
    ids = _ids(2, 50, seed=5)
    with make_cache("minicache", model, start_layer=1, block=2) as cache:  # tiny gemma: a 16-token window
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(None, cache), max_new_tokens=24,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (2, 74)
        pairs = [l for l in cache.layers if isinstance(l, MergedLayer)]
        assert len(pairs) == 4 and sum(l.nbytes() for l in pairs) < sum(l.reference_nbytes() for l in pairs)
        fractions = retained_fractions(cache)
        assert fractions and all(0 < f < 0.5 for f in fractions.values())


def test_gemma_sliding_pairs_keep_the_window(tiny_gemma):
    """Tiny Gemma-3 (window 16, layers 0-4 sliding, 5 full): default S = 3 merges the sliding pair (2, 3)."""
    ids = _ids(1, 40)
    cache = make_cache("minicache", tiny_gemma, block=4, select="depth")
    assert [type(l).__name__ for l in cache.layers][2:4] == ["MergedLayer", "MergedLayer"]
    with torch.no_grad():
        tiny_gemma(ids, **cache_kwargs(None, cache))
        for s in range(9):
            tiny_gemma(torch.tensor([[7 + s]]), **cache_kwargs(None, cache))
    pair = cache.layers[3].pair
    held = sum(s.length for s in pair.segments) + pair.pending[0][0].shape[2]
    # last merge at 48 tokens, token 48 still buffered: the window (15) + at most one segment (16 // 8) + buffer
    assert pair.pending[0][0].shape[2] == 1 and 15 <= held <= 15 + 2 + 1
    assert all(s.length <= 2 for s in pair.segments) and min(s.start for s in pair.segments) >= 48 - 15 - 2
    for i in (2, 3):
        assert cache.layers[i].attended_length() == 15 and cache.layers[i].reference_tokens() == 15
    pair_bytes = cache.layers[2].nbytes() + cache.layers[3].nbytes()
    assert pair_bytes < 2 * cache.layers[0].nbytes()  # a plain sliding layer holds the fp16 window


def test_kivi_storage_composes(tiny_model):
    ids = _ids(1, 96)
    fp16 = _prefill(tiny_model, ids, select="depth")
    kivi = _prefill(tiny_model, ids, select="depth", storage="kivi", bits=4, group_size=16, residual=16)
    assert kivi.nbytes() < 0.6 * fp16.nbytes()
    assert type(kivi.layers[0].kv).__name__ == "KiviStore"  # unmerged layers use the same storage
    assert type(kivi.layers[1].pair.segments[0].dirs).__name__ == "KiviStore"
    with torch.no_grad():
        out = tiny_model(torch.tensor([[3]]), **cache_kwargs(None, kivi)).logits
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------- profile


def test_profile_layers_on_tiny_model(tiny_model, tmp_path):
    from kvcompress.profiles.layers import heatmap, markdown, profile_layers

    result = profile_layers(tiny_model, _ids(2, 24), gamma=0.05)
    cos_k = torch.tensor(result["cos_k"])
    assert cos_k.shape == (4, 4) and torch.allclose(cos_k.diagonal(), torch.ones(4, dtype=cos_k.dtype), atol=1e-5)
    assert torch.allclose(cos_k, cos_k.T, atol=1e-6)
    assert [p["pair"] for p in result["pairs"]] == [[0, 1], [1, 2], [2, 3]]
    assert all(0 <= p["retained"] < 0.5 for p in result["pairs"])
    assert "| 0-1 |" in markdown(result)
    assert heatmap(result, tmp_path / "layers.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "opts",
    [
        {"start_layer": 0},
        {"start_layer": 4},
        {"start_layer": 2.5},
        {"t": -0.1},
        {"t": 1.5},
        {"gamma": 1.01},
        {"gamma": -0.2},
        {"merge": "maxnorm"},
        {"block": 0},
        {"storage": "nope"},
        {"storage": "fp16", "bits": 4},
        {"storage": "kivi", "bits": 3},
        {"storage": "kivi", "bits": 4, "group_size": 32, "residual": 48},
        {"storage": 4},
        {"window": 4},
        {"select": "all"},
        {"min_similarity": 1.5},
        {"min_similarity": True},
        {"profile": 3},
        {"select": "depth", "profile": "layers.json"},
    ],
)
def test_bad_input_one_clear_error(tiny_model, opts):
    with pytest.raises(KVCompressError, match="minicache|storage|unknown option"):
        make_cache("minicache", tiny_model, **opts)


def test_no_pair_of_same_type_is_an_error(tiny_gemma):
    with pytest.raises(KVCompressError, match="no two adjacent layers"):
        make_cache("minicache", tiny_gemma, start_layer=5)  # layer 4 sliding, layer 5 full


# ---------------------------------------------------------------------------------------------------------- real model


@pytest.mark.model
def test_smollm2_minicache_generates_and_compresses(smollm2, prose):
    model, tok = smollm2
    ids = tok(prose[:1500], return_tensors="pt").input_ids[:, :256]
    with make_cache("minicache", model, select="depth") as cache:
        out = model.generate(ids, **cache_kwargs(None, cache), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        report = cache.memory_report()
    assert out.shape[1] == ids.shape[1] + 8
    # 8 merged pairs (layers 14..29) of 30 layers: a bit under 30 / 22 = 1.36x
    assert 1.25 < report.ratio < 1.37
    fractions = retained_fractions(cache)
    assert sorted(fractions) == [(l - 1, l) for l in range(15, 30, 2)]
    assert all(0 < f < 0.1 for f in fractions.values())


@pytest.mark.model
def test_smollm2_default_refuses_with_the_best_pair(smollm2):
    """SmolLM2's adjacent layers are not similar (mean cosine < 0.25): the default refuses, naming the best pair and
    both ways to force a merge; the paper's rule stays available explicitly."""
    model, _ = smollm2
    with pytest.raises(KVCompressError) as err:
        make_cache("minicache", model)
    msg = str(err.value)
    assert "most similar pair" in msg and "select='depth'" in msg and "min_similarity=" in msg
    best = re.search(r"cosine K (-?[0-9.]+), V (-?[0-9.]+)", msg)
    assert best and max(float(best.group(1)), float(best.group(2))) < 0.5
    with make_cache("minicache", model, start_layer=15) as cache:  # explicit start_layer: the paper's pairs
        assert cache.method.pairs == [(l - 1, l) for l in range(15, 30, 2)]


# ---------------------------------------------------------------------------------------------------------- safe default


def _twin_layers(model, a: int):
    """A copy of ``model`` whose layer ``a + 1`` computes exactly layer ``a``'s K and V: layer ``a`` adds nothing to
    the residual stream (o_proj and the MLP's down_proj zeroed) and layer ``a + 1`` gets its norm and k/v weights."""
    import copy

    twin = copy.deepcopy(model)
    layers = twin.model.layers
    with torch.no_grad():
        layers[a].self_attn.o_proj.weight.zero_()
        layers[a].mlp.down_proj.weight.zero_()
        layers[a + 1].input_layernorm.weight.copy_(layers[a].input_layernorm.weight)
        for name in ("k_proj", "v_proj"):
            getattr(layers[a + 1].self_attn, name).weight.copy_(getattr(layers[a].self_attn, name).weight)
    return twin


def test_default_merges_only_measured_similar_pairs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(KVCompressError, match=r"most similar pair from layer 1 on, \(\d, \d\), has mean per-token"):
        make_cache("minicache", tiny_model)  # random weights: no similar layers
    twin = _twin_layers(tiny_model, 2)
    cache = make_cache("minicache", twin)
    assert cache.method.pairs == [(2, 3)]
    sim = {tuple(p["pair"]): p for p in cache.method.similarity["pairs"]}
    assert sim[(2, 3)]["cos_k"] > 0.999 and sim[(2, 3)]["cos_v"] > 0.999 and sim[(1, 2)]["cos_k"] < 0.9
    assert [type(l).__name__ for l in cache.layers] == ["ExactLayer", "ExactLayer", "MergedLayer", "MergedLayer"]
    # identical K/V: the merged pair reads back what the full cache holds
    ids = _ids(1, 40)
    ref = make_cache("full", twin, dtype="float16")
    with torch.no_grad():
        twin(ids, **cache_kwargs(None, cache))
        twin(ids, **cache_kwargs(None, ref))
        got = twin(torch.tensor([[5]]), **cache_kwargs(None, cache)).logits
        want = twin(torch.tensor([[5]]), **cache_kwargs(None, ref)).logits
    assert torch.allclose(got, want, atol=1e-2)
    assert cache.nbytes() < ref.nbytes()
    # the similarity is cached per model as JSON and reused
    files = list((tmp_path / "layer-similarity").glob("*.json"))
    assert len(files) == 2 and all(json.loads(f.read_text())["format"].startswith("kvcompress-layer") for f in files)
    import kvcompress.profiles.layers as layers_mod

    monkeypatch.setattr(layers_mod, "profile_layers", lambda *a, **k: pytest.fail("similarity recomputed"))
    assert make_cache("minicache", twin).method.pairs == [(2, 3)]


def test_similar_pairs_threshold_overlap_and_types():
    sim = [{"pair": [i, i + 1], "cos_k": k, "cos_v": v}
           for i, (k, v) in enumerate([(0.99, 0.99), (0.95, 0.97), (0.96, 0.80), (0.93, 0.92), (0.91, 0.95)])]
    full = ("full_attention",) * 6
    # from layer 0 on: (0,1) best; (1,2) overlaps it; (2,3) fails on V; (3,4) and (4,5) overlap -> the better (3,4)
    assert similar_pairs(sim, full, 1, 0.9)[0] == [(0, 1), (3, 4)]
    pairs, best = similar_pairs(sim, full, 3, 0.9)  # from layer 2 on
    assert pairs == [(3, 4)] and best["pair"] == [3, 4]
    assert similar_pairs(sim, full, 1, 0.995) == ([], sim[0])
    mixed = ("full_attention", "full_attention", "sliding_attention", "full_attention", "full_attention", "full_attention")
    assert similar_pairs(sim, mixed, 1, 0.9)[0] == [(0, 1), (3, 4)]
    assert similar_pairs(sim, mixed, 2, 0.9)[0] == [(3, 4)]


def test_profile_file_chooses_pairs(tiny_model, tmp_path):
    path = tmp_path / "layers.json"
    pairs = [{"pair": [i, i + 1], "cos_k": c, "cos_v": c} for i, c in enumerate([0.1, 0.2, 0.95])]
    path.write_text(json.dumps({"num_layers": 4, "pairs": pairs}))
    cache = make_cache("minicache", tiny_model, profile=str(path))
    assert cache.method.pairs == [(2, 3)] and "pairs [(2, 3)]" in cache.method.describe()
    # most similar first: (2,3), then (1,2) overlaps it, then (0,1)
    assert make_cache("minicache", tiny_model, profile=str(path), min_similarity=0.05, start_layer=1,
                      select="similarity").method.pairs == [(0, 1), (2, 3)]
    with pytest.raises(KVCompressError, match=r"\(2, 3\), has mean per-token cosine K 0.950.*min_similarity=0.95 merges"):
        make_cache("minicache", tiny_model, profile=str(path), min_similarity=0.99, start_layer=1,
                   select="similarity")
    path.write_text(json.dumps({"num_layers": 6, "pairs": pairs}))
    with pytest.raises(KVCompressError, match="6-layer model"):
        make_cache("minicache", tiny_model, profile=str(path))
    path.write_text("{}")
    with pytest.raises(KVCompressError, match="not a layers.json"):
        make_cache("minicache", tiny_model, profile=str(path))
    with pytest.raises(KVCompressError, match="cannot read"):
        make_cache("minicache", tiny_model, profile=str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------------------- growth


def test_decode_steps_do_not_copy_the_merged_past(tiny_model):
    """Growth without copying the past (block=1: every decode step merges its token): after a 512-token prompt (batch
    2, one row left-padded), the tensors that hold the prompt's merged state (directions, magnitudes) are still held
    after 40 steps, and what the steps put in new held tensors is O(log n) tokens' worth per step (TokenRuns: the
    new token, and runs merged like a binary counter), not the past. (Before, every step concatenated the
    magnitudes, the retained indices and the padding flags onto their whole past.)"""
    ids = _ids(2, 512, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = make_cache("minicache", tiny_model, start_layer=1)
    merged = [layer for layer in cache.layers if isinstance(layer, MergedLayer)]
    b, h, d = 2, 2, 16
    per_token = len(merged) // 2 * (2 * b * h * d + 2 * 2 * b * h + b)  # per pair: directions, magnitudes, padding flag
    with torch.no_grad():
        tiny_model(ids, attention_mask=mask, **cache_kwargs(None, cache))

        def held():
            return {t.data_ptr(): t for layer in merged for t in layer.held_tensors() if t is not None and t.numel()}

        before = held()
        prompt_state = {p for p, t in before.items() if t.numel() >= 512 * b * h}  # directions and magnitudes
        new_elements = 0
        for s in range(40):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            tiny_model(torch.full((2, 1), 3 + s), attention_mask=mask, **cache_kwargs(None, cache))
            now = held()
            new_elements += sum(t.numel() for p, t in now.items() if p not in before)
            before = now  # the previous tensors stay alive here, so a new tensor cannot reuse their addresses
    assert len(prompt_state) >= 3 * len(merged) // 2 and prompt_state <= set(before)
    assert new_elements <= 40 * 8 * per_token, new_elements / (40 * per_token)  # tokens' worth per step


@pytest.mark.parametrize("storage", ["fp16", "kivi"])
def test_any_range_of_a_segment_reads_back_what_the_whole_read_back_holds(storage):
    """A segment grown by appends of 30, 1, 1, 5, 1, ... (50) tokens (several runs, retained entries in many of them):
    reading any range of positions (as attention's chunks do) gives exactly that range of the whole read-back, which
    is ``|x_j| * e`` with the retained entries exact (fp16 storage)."""
    gen = torch.Generator().manual_seed(5)
    g = kvcompress.ModelGeometry(4, 4, 3, 16, ("full_attention",) * 4, None, None, "x", torch.float32)
    opts = {"bits": 4, "group_size": 8, "residual": 8} if storage == "kivi" else {}
    seg = Segment(lambda: make_storage(storage, g, **opts), 0, torch.float16)
    cfg = MiniCacheConfig(gamma=0.3)
    states = []
    for n in (30, 1, 1, 5, 1, 1, 1, 9, 1):
        x = [torch.randn(2, 3, n, 16, generator=gen) for _ in range(4)]
        seg.add(*x, cfg)
        states.append(x)
    ka, va, kb, vb = (torch.cat([s[i] for s in states], dim=2) for i in range(4))
    assert seg.length == 50 and len(seg.mags[0].runs) > 1 and len(seg.kept_idx.runs) > 1
    keep = torch.zeros(2 * 3 * 50, dtype=torch.bool)
    keep[seg.kept_idx.joined()[0].long()] = True
    keep = keep.view(50, 2, 3).permute(1, 2, 0)  # (b, h, n)
    for side, (k, v) in enumerate(((ka, va), (kb, vb))):
        whole = seg.restore(side, torch.float32)
        for got, x in zip(whole, (k, v)):  # retained entries exact (2-byte; kivi quantizes them), the others merged
            if storage == "fp16":
                torch.testing.assert_close(got[keep], x[keep].half().float())
                torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=2e-3, atol=2e-3)
        read = seg.reader(side)
        for start, stop in ((0, 50), (0, 30), (3, 17), (29, 33), (30, 31), (33, 50), (49, 50)):
            for got, want in zip(read(start, stop, torch.float32), whole):
                assert torch.equal(got, want[:, :, start:stop])


@pytest.mark.parametrize("storage", ["fp16", "kivi"])
@pytest.mark.parametrize("kernel", [True, False])
def test_merged_segment_attends_from_its_directions_like_its_read_back(storage, kernel):
    """The attention partials a merged segment gives without rebuilding ``|x_j| * e`` (:meth:`Segment.fused`: the
    direction store's parts with the magnitudes as per-token multipliers -- the KIVI kernel's codes or fp16 chunks --,
    the retained entries masked out there and attended exactly apart) equal softmax attention over the segment's
    read-back (:meth:`Segment.reader`), for both layers of the pair, batch 2 with padding, GQA rows and a long query
    chunk; with the kernels on and off. Tolerance: fp32 rounding (1e-5 relative to the largest value / score)."""
    from kvcompress import kernels

    gen = torch.Generator().manual_seed(11)
    g = kvcompress.ModelGeometry(4, 4, 3, 16, ("full_attention",) * 4, None, None, "x", torch.float32)
    opts = {"bits": 2, "group_size": 8, "residual": 8} if storage == "kivi" else {}
    seg = Segment(lambda: make_storage(storage, g, **opts), 0, torch.float16)
    cfg = MiniCacheConfig(gamma=0.3)
    for n in (40, 1, 1, 7, 1, 13, 1):
        seg.add(*(torch.randn(2, 3, n, 16, generator=gen) for _ in range(4)), cfg)
    n = seg.length
    assert seg.retained_entries() > 0 and len(seg.kept_idx.runs) > 1
    valid = torch.rand(2, 1, n, generator=gen) > 0.2
    for side in (0, 1):
        for rows in (4, 160):  # one decode step of 4 query heads per KV head; a prefill chunk (chunked fallback)
            qg = torch.randn(2, 3, rows, 16, generator=gen) * 0.5
            with kernels.fused(kernel):
                acc, m, l = seg.fused(side)(qg, valid)
            k, v = seg.reader(side)(0, n, torch.float32)
            want = torch.softmax(torch.einsum("bhrd,bhnd->bhrn", qg.double(), k.double())
                                 .masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1) @ v.double()
            got = acc.double() / l.double()[..., None]
            assert (got - want).abs().max().item() <= 1e-5 * (1 + v.abs().max().item())
            lse = torch.logsumexp(torch.einsum("bhrd,bhnd->bhrn", qg.double(), k.double())
                                  .masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)
            assert (m.double() + l.double().log() - lse).abs().max().item() <= 1e-5 * (1 + lse.abs().max().item())


def test_merged_pairs_say_which_path_they_take(tiny_model):
    """memory_report(): merged pairs over KIVI codes take the kernel ("fused-numba"; "chunked" with it switched
    off: every merged pair rebuilds ``|x| * e`` a chunk at a time then), over fp16 directions the dense torch path."""
    from kvcompress import kernels

    ids = _ids(1, 80, seed=4)
    for storage, opts, want in (("fp16", {}, "dense"),
                                ("kivi", {"bits": 4, "group_size": 8, "residual": 16}, "fused-numba")):
        cache = _prefill(tiny_model, ids, start_layer=1, storage=storage, **opts)
        assert cache.memory_report().attention == {want if kernels.AVAILABLE else "chunked": 4}
        with kernels.fused(False):
            assert cache.memory_report().attention == {"chunked": 4}


def test_long_context_merged_past_is_read_a_chunk_at_a_time(tiny_model, monkeypatch):
    """Past the attention chunk (2048 tokens), the merged layers rebuild their past a chunk at a time: the logits
    equal those of a cache whose pairs read their whole past back densely (the old path), and the peak transient of
    a merged layer while decoding is a chunk, not the past."""
    from kvcompress.attention import CHUNK, KVPart
    from kvcompress.methods.minicache import LayerPair

    ids, n = _ids(1, 2300, seed=7), 2300

    def run():
        cache = make_cache("minicache", tiny_model, start_layer=1)
        with torch.no_grad():
            out = [tiny_model(ids, **cache_kwargs(None, cache)).logits[:, -1]]
            for layer in cache.layers:  # the prefill attends its own tokens in one sdpa call (a prompt-sized copy)
                layer.peak_transient_bytes = 0
            out += [tiny_model(torch.tensor([[3 + s]]), **cache_kwargs(None, cache)).logits[:, -1] for s in range(3)]
        return torch.stack(out), cache

    got, cache = run()
    b, h, d = 1, 2, 16
    chunk_bytes = 2 * b * h * CHUNK * d * 4  # K and V of one fp32 chunk
    assert all(layer.peak_transient_bytes <= chunk_bytes < 2 * b * h * n * d * 4 for layer in cache.layers
               if isinstance(layer, MergedLayer))
    assert cache.memory_report().attention.get("dense") == 4  # fp16 directions: torch over them, chunk by chunk
    monkeypatch.setattr(LayerPair, "parts", lambda self, side: [KVPart.dense(*self.past(side, torch.float32))]
                        if self.segments or self.pending[side] is not None else [])
    want, _ = run()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_one_call_merged_step_equals_the_parts_path(tiny_model, monkeypatch, batch):
    """A merged layer's one-token step over KIVI storage (``MergedLayer._attend_one_fused``: one kernel call with the
    step's token in the tail, one for the retained entries) gives the logits the general parts path gives, step after
    step, and it is the path taken (retained entries present, values already quantized)."""
    ids = _ids(batch, 96, seed=4)
    opts = dict(start_layer=1, gamma=0.3, storage="kivi", bits=4, group_size=8, residual=16)
    taken = []
    one_call = MergedLayer._attend_one_fused

    def counting(self, query, keys, *a):
        out = one_call(self, query, keys, *a)
        if keys.shape[2] == 1:  # a decode step (the prompt takes the parts path)
            taken.append(out is not None)
        return out

    logits = {}
    for mode in ("one-call", "parts"):
        monkeypatch.setattr(MergedLayer, "_attend_one_fused",
                            counting if mode == "one-call" else (lambda self, *a: None))
        cache = _prefill(tiny_model, ids, **opts)
        steps = []
        with torch.no_grad():
            for s in range(12):
                steps.append(tiny_model(torch.full((batch, 1), 5 + s), **cache_kwargs(None, cache)).logits[:, -1])
        logits[mode] = torch.stack(steps)
        if mode == "one-call":
            assert any(layer.pair.segments[0].retained_entries() for layer in cache.layers
                       if isinstance(layer, MergedLayer))
    assert taken and all(taken)
    assert (logits["one-call"] - logits["parts"]).abs().max().item() < 1e-4

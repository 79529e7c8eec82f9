"""KVQuant: bad input, calibration file round-trip, pre-RoPE exactness, honest bytes, generation (llama / gemma /
batch 2), Fisher-weighted levels."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_llama
from kvcompress import KVCompressError, make_cache
from kvcompress.calibration.kvquant import calibrate, fit_levels, load_calibration
from kvcompress.methods.kvquant import SLIDE_BLOCK
from kvcompress.rope import apply_rope, unapply_rope
from kvcompress.compat import cache_kwargs



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib_file(tiny_model, tmp_path_factory):
    """A calibration of the tiny llama on 2 x 40 synthetic tokens (bits 3, outliers 0 and 1 %)."""
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    cal = calibrate(tiny_model, ids, bits=(3,), outliers=(0.0, 0.01))
    path = tmp_path_factory.mktemp("kvq") / "tiny.safetensors"
    cal.save(path)
    return path, cal


def _prompt(n=60, batch=1, seed=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, ids, method="kvquant", forward=None, **opts):
    cache = make_cache(method, model, **opts)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(None, cache), **(forward or {}))
    return cache


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        {"bits": 1}, {"bits": 5}, {"bits": 8}, {"bits": 3.0}, {"bits": True},
        {"outliers": -0.01}, {"outliers": 0.2}, {"outliers": 0.5}, {"outliers": float("nan")}, {"outliers": "1%"},
        {"sink": -1}, {"key_stats": "magic"}, {"pre_rope": "yes"},
        {},  # nuq=True (default) without a calibration file
        {"nuq": False, "qnorm": True},
        {"nuq": False, "key_stats": "calibration"},
        {"nuq": False, "calibration": "/nonexistent/kvquant.safetensors"},
    ],
)
def test_bad_options_raise_one_clear_error(tiny_model, opts):
    with pytest.raises(KVCompressError, match="kvquant"):
        make_cache("kvquant", tiny_model, **opts)


def test_calibration_for_another_model_or_shapes_is_refused(calib_file):
    path, _ = calib_file
    other = make_tiny_llama(seed=1)  # model id tiny-llama-1
    with pytest.raises(KVCompressError, match="is for model"):
        make_cache("kvquant", other, calibration=str(path))
    fewer_layers = make_tiny_llama(seed=0, layers=2)  # same id, other shapes
    with pytest.raises(KVCompressError, match="other shapes"):
        make_cache("kvquant", fewer_layers, calibration=str(path))


def test_calibration_must_cover_bits_and_outliers(tiny_model, calib_file):
    path, _ = calib_file
    with pytest.raises(KVCompressError, match="covers bits"):
        make_cache("kvquant", tiny_model, calibration=str(path), bits=2)
    with pytest.raises(KVCompressError, match="outlier fractions"):
        make_cache("kvquant", tiny_model, calibration=str(path), outliers=0.05)


def test_pickles_and_foreign_files_are_refused(tiny_model, tmp_path):
    pkl = tmp_path / "calib.safetensors"
    torch.save({"codebook": torch.zeros(8)}, pkl)  # a pickle under the right name
    with pytest.raises(KVCompressError, match="not a safetensors"):
        make_cache("kvquant", tiny_model, calibration=str(pkl))
    from safetensors.torch import save_file

    foreign = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(KVCompressError, match="not a kvquant calibration"):
        load_calibration(foreign)


def test_cli_rejects_bad_bits_and_outliers_before_loading(capsys):
    from kvcompress.cli import main

    assert main(["calibrate", "kvquant", "--model", "no-such-model", "--data", "pydoc", "--bits", "5"]) == 2
    assert main(["calibrate", "kvquant", "--model", "no-such-model", "--data", "pydoc", "--outliers", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--bits 5" in err and "--outliers 0.3" in err


# -- calibration -----------------------------------------------------------------------------------------------------


def test_calibration_file_round_trip(tiny_model, calib_file):
    path, cal = calib_file
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length + JSON header
    header = json.loads(raw[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["kvquant"])
    assert meta["model_id"] == "tiny-llama-0" and meta["num_layers"] == 4
    assert meta["num_kv_heads"] == 2 and meta["head_dim"] == 16 and meta["bits"] == [3]
    assert meta["outliers"] == [0.0, 0.01] and len(meta["token_ids_sha256"]) == 64
    assert json.loads(path.with_suffix(".safetensors.json").read_text()) == meta
    back = load_calibration(path)
    assert back.meta == cal.meta and set(back.tensors) == set(cal.tensors)
    for name, t in cal.tensors.items():
        assert torch.equal(back.tensors[name], t), name
    cb = back.tensors["b3/o0.01/key_pre/codebook"]
    assert cb.shape == (4, 8) and bool((cb[:, 1:] >= cb[:, :-1]).all()) and float(cb.abs().max()) <= 1.0
    lo, hi = back.tensors["b3/o0.01/key_pre/lower"], back.tensors["b3/o0.01/key_pre/upper"]
    assert lo.shape == (4, 2, 16) and bool((lo < hi).all())
    ids = _prompt(70, batch=2)
    ref, _ = _teacher_forced_logits(tiny_model, ids, 60, "full")
    for qnorm in (False, True):
        logits, report = _teacher_forced_logits(tiny_model, ids, 60, "kvquant", calibration=str(path), qnorm=qnorm)
        assert float((logits - ref).abs().mean() / ref.std()) < 0.2 and report.ratio > 2
    with _prefill(tiny_model, ids, calibration=str(path), qnorm=True) as cache:
        layer = cache.layers[0]
        assert torch.equal(layer.k.codebook, cb[0]) and not torch.equal(layer.k.decode_book, cb[0])
        assert torch.equal(layer.k.offset.float(), ((lo[0] + hi[0]) / 2).reshape(1, -1).half().float())


def test_calibration_on_gemma_uses_k_norm_outputs(tiny_gemma):
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    cal = calibrate(tiny_gemma, ids, bits=(2,), outliers=(0.0,))
    assert cal.tensors["b2/o0/key_pre/codebook"].shape == (6, 4)
    assert cal.tensors["b2/o0/key_post/lower"].shape == (6, 1, 16)


def test_fisher_weights_pull_the_levels():
    """Weighted k-means: the heavily weighted half of the data gets more of the levels."""
    x = torch.linspace(-1, 1, 4001)
    flat = fit_levels(x, torch.ones_like(x), bits=2)[0]
    right = fit_levels(x, torch.where(x > 0, 100.0, 1.0), bits=2)[0]
    assert int((flat > 0).sum()) == 2 and int((right > 0).sum()) >= 3
    cb, qn = fit_levels(x, torch.ones_like(x), bits=3)
    q = cb[torch.bucketize(x, (cb[1:] + cb[:-1]) / 2)]
    assert math.isclose(float((qn[torch.bucketize(x, (cb[1:] + cb[:-1]) / 2)]).std()), float(x.std()), rel_tol=1e-4)
    assert float(q.std()) != pytest.approx(float(x.std()), rel=1e-6)


# -- pre-RoPE --------------------------------------------------------------------------------------------------------


def _check_rerotation(layer, true_post, cos, sin):
    """``layer`` stores ``true_post (1|b, h, n, d)`` (post-RoPE keys the model made, sink 1): its stored keys are
    pre-RoPE within the quantization step, and read back rotated with the model's own cos/sin."""
    b, h, _, d = true_post.shape
    true_pre = unapply_rope(true_post, cos, sin)[:, :, 1:]
    stored_pre = layer.k.read()
    step = layer.k.scale.float().reshape(-1, h, 1, d) / 15  # half the distance between 16 uniform levels
    assert bool(((stored_pre - true_pre).abs() <= step * 1.01 + 1e-4).all())
    keys, _ = layer._read()
    assert torch.equal(keys[:, :, :1], true_post[:, :, :1].half().float())  # the sink, as given
    assert torch.allclose(keys[:, :, 1:], apply_rope(stored_pre, cos[:, 1:], sin[:, 1:]), atol=1e-5)


def test_pre_rope_unrotate_rerotate_is_exact(tiny_model):
    """Stored keys are pre-RoPE (within the quantization step of the true pre-RoPE keys); on read they are rotated
    with the model's own cos/sin at the stored positions: per-row positions that do not follow 0, 1, 2, ... are
    stored as int32; a left-padded batch keeps one layer per row, whose real tokens sit at 0, 1, 2, ..."""
    ids = _prompt(40, batch=2)
    pos = torch.arange(40).unsqueeze(0) + torch.tensor([[0], [3]])  # row 1 starts at position 3
    fwd = {"attention_mask": torch.ones_like(ids), "position_ids": pos}
    full = _prefill(tiny_model, ids, "full", fwd, dtype="float32")
    cache = _prefill(tiny_model, ids, forward=fwd, nuq=False, bits=4, outliers=0.0, sink=1)
    layer, true_post = cache.layers[1], full.layers[1].k  # (2, 2, 40, 16)
    cos, sin = tiny_model.model.rotary_emb(true_post, pos)
    tc, ts = layer.method.rope.cos_sin(pos, "full_attention")
    assert torch.equal(tc, cos.float()) and torch.equal(ts, sin.float())
    assert torch.allclose(apply_rope(unapply_rope(true_post, cos, sin), cos, sin), true_post, atol=1e-6)
    assert layer.pos.explicit is not None and layer.pos.explicit.dtype == torch.int32
    assert torch.equal(layer.pos.explicit.long(), pos[:, 1:])
    _check_rerotation(layer, true_post, cos, sin)
    cache.close()

    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate() passes
    fwd = {"attention_mask": mask, "position_ids": pos}
    full = _prefill(tiny_model, ids, "full", fwd, dtype="float32")
    cache = _prefill(tiny_model, ids, forward=fwd, nuq=False, bits=4, outliers=0.0, sink=1)
    true_post = full.layers[1].k
    cos, sin = tiny_model.model.rotary_emb(true_post, pos)
    for r, row in enumerate(cache.layers[1]._rows):
        real = mask[r].nonzero().squeeze(-1)
        assert row.pos.explicit is None and row.tokens_seen == len(real)
        _check_rerotation(row, true_post[r : r + 1, :, real], cos[r : r + 1, real], sin[r : r + 1, real])
    cache.close()


def test_positions_are_not_stored_when_derivable(tiny_model):
    with _prefill(tiny_model, _prompt(30), nuq=False) as cache:
        assert all(layer.pos.explicit is None for layer in cache.layers)


# -- bytes -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,token_range", [(2, "token"), (3, "token"), (4, "token"), (3, "head")])
def test_bytes_equal_held_tensors_and_hand_formula(tiny_model, bits, token_range):
    b, n, h, d, sink = 2, 40, 2, 16, 1
    with _prefill(tiny_model, _prompt(n, batch=b), nuq=False, bits=bits, outliers=0.0, sink=sink,
                  token_range=token_range) as cache:
        body = n - sink
        codes = 2 * b * h * body * math.ceil(d * bits / 8)  # packed K and V codes, uint8
        groups = 1 if token_range == "token" else h  # value ranges per token (paper) or per token and head
        v_stats = 2 * b * groups * body * 2  # value scale + offset, fp16
        k_stats = 2 * b * h * d * 2  # key offset + scale per channel (from the prompt, per batch row), fp16
        books = 2 * (2 * (1 << bits) - 1) * 4  # K and V codebooks and their midpoints (nearest-level search), fp32
        sink_bytes = 2 * b * h * sink * d * 2
        per_layer = codes + v_stats + k_stats + books + sink_bytes
        assert cache.nbytes() == 4 * per_layer
        assert cache.reference_nbytes() == 4 * b * n * h * d * 2 * 2
        for layer in cache.layers:
            assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.held_tensors() if t is not None)
            assert all(p.dtype == torch.uint8 for p in layer.k.planes)


def test_outliers_are_sparse_rows_with_exact_values(tiny_model):
    n, b = 50, 2
    ids = _prompt(n, batch=b)
    full = _prefill(tiny_model, ids, "full", dtype="float32")
    with _prefill(tiny_model, ids, nuq=False, bits=2, outliers=0.1, sink=0, pre_rope=False,
                  per_channel_keys=False) as cache:
        layer = cache.layers[2]
        sp = layer.v.sparse
        w = 2 * 16
        m = round(w * 0.1 / 2)  # per token: m above and m below the thresholds
        assert sp.counts.shape == (n, b) and int(sp.counts.max()) <= 2 * m
        assert sp.cols.dtype == torch.uint8 and sp.vals.dtype == torch.float16
        # views of held buffers (their spare capacity is held and counted too)
        held = {t.untyped_storage().data_ptr() for t in layer.held_tensors() if t is not None}
        assert all(t.untyped_storage().data_ptr() in held for t in sp.tensors())
        assert sp.counts.element_size() == 1 and sp.cols.element_size() == 1 and sp.vals.element_size() == 2
        # the outlier positions read back exactly (fp16) and are the extreme values of their row
        _, values = layer._read()
        true = full.layers[2].v
        rows_true = true.permute(2, 0, 1, 3).reshape(n * b, w)
        rows_read = values.permute(2, 0, 1, 3).reshape(n * b, w)
        r = torch.repeat_interleave(torch.arange(n * b), sp.counts.reshape(-1).long())
        c = sp.cols.long()
        assert torch.equal(rows_read[r, c], rows_true[r, c].half().float())
        assert float((rows_read - rows_true).abs().max()) > 0  # the dense part is quantized


# -- generation ------------------------------------------------------------------------------------------------------


def _teacher_forced_logits(model, ids, P, method, attention_mask=None, **opts):
    with make_cache(method, model, **opts) as cache, torch.no_grad():
        model(input_ids=ids[:, :P], attention_mask=None if attention_mask is None else attention_mask[:, :P],
              **cache_kwargs(None, cache))
        out = []
        for t in range(P, ids.shape[1]):
            am = None if attention_mask is None else attention_mask[:, : t + 1]
            out.append(model(input_ids=ids[:, t : t + 1], attention_mask=am, **cache_kwargs(None, cache)).logits[:, -1])
        return torch.stack(out, 1), cache.memory_report()


@pytest.mark.parametrize("which", ["tiny_model", "tiny_gemma"])
def test_error_shrinks_with_bits_llama_and_gemma_batch2(request, which):
    model = request.getfixturevalue(which)
    ids = _prompt(80, batch=2)
    ref, _ = _teacher_forced_logits(model, ids, 64, "full")
    err = {}
    for bits in (2, 4):
        logits, report = _teacher_forced_logits(model, ids, 64, "kvquant", nuq=False, bits=bits)
        err[bits] = float((logits - ref).abs().mean() / ref.std())
        assert report.ratio > 1.5
    assert err[4] < err[2] / 2
    if which == "tiny_model":
        assert err[4] < 0.05


def test_generate_batch2_left_padded_llama_and_gemma(tiny_model, tiny_gemma):
    ids = _prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    for model in (tiny_model, tiny_gemma):
        with make_cache("kvquant", model, nuq=False, bits=3) as cache, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(None, cache), max_new_tokens=12,
                                 do_sample=False, pad_token_id=0)
            assert out.shape == (2, 52)
            assert cache.nbytes() < cache.reference_nbytes()
            for layer in cache.layers:
                assert layer.attended_length() == (15 if layer.is_sliding else 51)
                # one layer per row, each holding its real tokens at positions 0, 1, 2, ... (sliding: the last 15)
                assert [row.tokens_seen for row in layer._rows] == [51, 44]
                assert all(row.pos.explicit is None for row in layer._rows)


def test_sliding_layers_evict_and_full_layers_keep_the_sink(tiny_gemma):
    with _prefill(tiny_gemma, _prompt(50), nuq=False, bits=4, sink=2) as cache:
        for layer in cache.layers:
            if layer.is_sliding:
                assert layer.attended_length() == 15 and layer.head_k is None and len(layer.k) == 15
                assert layer.pos.get()[0, 0] == 50 - 15
            else:
                assert layer.head_k.shape[2] == 2 and layer.attended_length() == 50
    with _prefill(tiny_gemma, _prompt(50), nuq=False, quantize_sliding=False) as cache:
        assert type(cache.layers[0]).__name__ == "SlidingWindowLayer"


def test_short_prompt_waits_for_prompt_key_ranges(tiny_model):
    """key_stats='prompt': keys wait in fp16 until 16 non-sink tokens fix the per-channel ranges."""
    ids = _prompt(30)
    with _prefill(tiny_model, ids[:, :3], nuq=False, sink=1) as cache, torch.no_grad():
        layer = cache.layers[0]
        for t in range(3, 30):
            tiny_model(input_ids=ids[:, t : t + 1], **cache_kwargs(None, cache))
            if t == 12:
                assert layer.pend_k.shape[2] == 12 and len(layer.k) == 0 and len(layer.v) == 12
        assert layer.pend_k is None and len(layer.k) == len(layer.v) == 29 == layer.attended_length() - 1


@pytest.mark.model
def test_smollm2_generate_4bit(smollm2, prose):
    model, tok = smollm2
    ids = tok(prose[:4000], return_tensors="pt")["input_ids"][:, :200]
    outs = {}
    for method, opts in (("full", {}), ("kvquant", {"nuq": False, "bits": 4, "outliers": 0.01})):
        with make_cache(method, model, **opts) as cache, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(None, cache),
                                 max_new_tokens=8, do_sample=False)
            outs[method] = out[0, ids.shape[1] :]
            if method == "kvquant":
                assert cache.memory_report().ratio > 3.0
    assert torch.equal(outs["kvquant"][:4], outs["full"][:4])


# -- the published recipe: per-token value ranges, outliers left out of the fit, calibration="auto" ---------------


def test_value_ranges_are_per_token_over_all_heads(tiny_model):
    """token_range="token" (default): one fp16 offset/scale per token over all KV heads, from its own values
    (no outliers: min/max); "head" keeps one per token and head."""
    n, b, h = 30, 2, 2
    ids = _prompt(n, batch=b)
    full = _prefill(tiny_model, ids, "full", dtype="float32")
    with _prefill(tiny_model, ids, nuq=False, bits=4, outliers=0.0, sink=1) as cache:
        layer = cache.layers[1]
        assert layer.v.scale.shape == (b, 1, n - 1, 1) and layer.v.scale.dtype == torch.float16
        v = full.layers[1].v[:, :, 1:].float()  # (b, h, n-1, d), as the layer received them
        mx, mn = v.amax(dim=(1, 3), keepdim=True), v.amin(dim=(1, 3), keepdim=True)
        assert torch.equal(layer.v.offset, ((mx + mn) / 2).half())
        assert torch.equal(layer.v.scale, ((mx - mn) / 2).half())
        err_token = (layer._read()[1][:, :, 1:] - v).abs().max()
        step = float(layer.v.scale.float().max()) / 7.5  # 16 uniform levels over [-1, 1]
        assert float(err_token) <= step / 2 * 1.01 + 1e-3
    with _prefill(tiny_model, ids, nuq=False, bits=4, outliers=0.0, sink=1, token_range="head") as cache:
        assert cache.layers[1].v.scale.shape == (b, h, n - 1, 1)


def test_outliers_are_removed_before_normalizing_per_token_row():
    from kvcompress.calibration.kvquant import normalized_inliers

    x = torch.randn(12, 200, generator=torch.Generator().manual_seed(0))
    xn, mask, lo, hi = normalized_inliers(x, 0.01, per_channel=False, heads=1)
    assert lo is None and hi is None
    assert torch.equal((~mask).sum(1), torch.full((12,), 2))  # round(200 * 0.005) = 1 above and 1 below per row
    inl = xn.masked_fill(~mask, float("nan"))
    assert torch.allclose(inl.nan_to_num(-9).amax(1), torch.ones(12), atol=2e-3)  # the thresholds map to +-1
    assert torch.allclose(inl.nan_to_num(9).amin(1), -torch.ones(12), atol=2e-3)
    xk, mk, lok, hik = normalized_inliers(x, 0.01, per_channel=True, heads=1)  # keys: per channel over tokens
    assert lok.shape == (200,) and bool((mk.sum(0) >= 10).all())


def test_outliers_do_not_enter_the_codebook_fit():
    """The values stored sparse are left out of the Fisher-weighted k-means: giving them a huge Fisher weight changes
    nothing (it would pull levels to +-1 if they were fitted)."""
    from kvcompress.calibration.kvquant import _fit_all, normalized_inliers
    from kvcompress.cache import ModelGeometry

    gen = torch.Generator().manual_seed(0)
    T, h, d = 400, 2, 64  # rows of 128 values: one outlier above and one below per token row at 1 %
    g = ModelGeometry(1, 2, h, d, ("full_attention",), None, None, "x", torch.float32)
    k, v = torch.randn(T, h * d, generator=gen), torch.randn(T, h * d, generator=gen) * 3
    gk, fv = torch.rand(T, h * d, generator=gen), torch.rand(T, h * d, generator=gen)
    layer = {"k": k.half(), "gk": gk, "v": v.half(), "fv": fv, "cos": None, "sin": None}
    base = _fit_all([layer], g, [2], [0.01], 256, False)
    heavy = dict(layer)
    _, kmask, _, _ = normalized_inliers(k.half().float(), 0.01, True, h)
    _, vmask, _, _ = normalized_inliers(v.half().float(), 0.01, False, 1)
    assert (~kmask).any() and (~vmask).any()
    heavy["gk"] = torch.where(kmask, gk, torch.full_like(gk, 1e4))
    heavy["fv"] = torch.where(vmask, fv, torch.full_like(fv, 1e8))
    again = _fit_all([heavy], g, [2], [0.01], 256, False)
    for name in ("b2/o0.01/key_pre/codebook", "b2/o0.01/value_token/codebook"):
        assert torch.equal(base[name][0], again[name][0]), name
    # the perturbation has power: with no sparse part every value is fitted, and the heavy weights move the levels
    light0, heavy0 = (_fit_all([x], g, [2], [0.0], 256, False) for x in (layer, heavy))
    for name in ("b2/o0/key_pre/codebook", "b2/o0/value_token/codebook"):
        assert float((light0[name][0] - heavy0[name][0]).abs().max()) > 0.05, name


def test_auto_calibration_needs_a_tokenizer(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(KVCompressError, match="calibration='auto' needs the model's tokenizer"):
        make_cache("kvquant", tiny_model, calibration="auto")


@pytest.mark.model
def test_auto_calibration_is_written_once_and_used_by_the_default_list(smollm2, tmp_path, monkeypatch):
    import kvcompress.calibration.kvquant as kq
    from kvcompress.evaluate.spec import default_specs

    model, _ = smollm2
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(kq, "AUTO_SEQS", 2)
    monkeypatch.setattr(kq, "AUTO_SEQ_LEN", 48)
    with torch.inference_mode(), make_cache("kvquant", model, calibration="auto") as cache:  # as users call it
        assert cache.method.calibration.meta["data"] == ["pydoc"] and cache.method.calibration.meta["auto"]
    files = list((tmp_path / "kvquant").glob("*.safetensors"))
    assert len(files) == 1 and files[0].with_suffix(".safetensors.json").is_file()
    monkeypatch.setattr(kq, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    specs, skipped = default_specs(model)
    assert "kvquant:calibration=auto" in [s.label for s in specs]
    assert "kvquant" not in [s["method"] for s in skipped]


def test_sliding_layers_attend_their_window_like_the_dense_path(tiny_gemma):
    """Gemma-3's sliding layers (16-token windows) through kvcompress's attention (window masked by the layer, a
    40-token prompt then 24 decode steps) give the logits of the dense path (``dense_step`` + transformers' windowed
    mask) within 1e-4: the same codes, another summation order."""
    ids = _prompt(64)

    def run(dense: bool):
        cache = make_cache("kvquant", tiny_gemma, nuq=False, bits=4, sink=2)
        for layer in cache.layers:
            layer.attends = not dense
        out = []
        with torch.no_grad():
            out.append(tiny_gemma(ids[:, :40], **cache_kwargs(None, cache)).logits[0, -1])
            for t in range(40, 64):
                out.append(tiny_gemma(ids[:, t : t + 1], **cache_kwargs(None, cache)).logits[0, -1])
        held = [(layer.attended_length(), layer.slide_block) for layer in cache.layers if layer.is_sliding]
        cache.close()
        return torch.stack(out), held

    got, held = run(dense=False)
    want, _ = run(dense=True)
    w = tiny_gemma.config.sliding_window
    assert all(w - 1 <= n < w - 1 + block and block == max(1, min(SLIDE_BLOCK, w // 16)) for n, block in held)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# -- recent window (recent=R: the last R tokens at 2 bytes; an option, not the paper's recipe) -------------------------


@pytest.mark.parametrize("recent", [-1, 1.5, True, "8"])
def test_bad_recent_raises_one_clear_error(tiny_model, recent):
    with pytest.raises(KVCompressError, match="recent"):
        make_cache("kvquant", tiny_model, nuq=False, recent=recent)


def test_recent_window_holds_the_last_tokens_exactly_and_counts_them(tiny_model):
    """recent=8: after a 40-token prefill the layer holds sink (1) + body (31 quantized) + recent (8 at fp16, the
    model's post-RoPE keys as given); decoding moves one token per step from the window into the body, whose keys
    are un-rotated at their own positions (same codes as recent=0 up to the fp16 rounding of the window); the
    window's bytes are in the cache's bytes."""
    ids = _prompt(46)
    full = _prefill(tiny_model, ids, "full", dtype="float32")
    true_post = full.layers[0].k  # (1, h, 46, d); layer 0's keys do not depend on the cache (decoded tokens too)
    with _prefill(tiny_model, ids[:, :40], nuq=False, bits=3, recent=8) as cache, \
            _prefill(tiny_model, ids[:, :40], nuq=False, bits=3) as plain, torch.no_grad():
        layer = cache.layers[0]
        assert layer.head_k.shape[2] == 1 and len(layer.k) == len(layer.v) == 31 and layer.rec_k.shape[2] == 8
        assert torch.equal(layer.rec_k, true_post[:, :, 32:40].half())
        assert layer.rec_pos.explicit is None  # positions 32..39 are derivable
        assert layer.attended_length() == 40
        for t in range(40, 46):
            tiny_model(input_ids=ids[:, t : t + 1], **cache_kwargs(None, cache))
            tiny_model(input_ids=ids[:, t : t + 1], **cache_kwargs(None, plain))
        assert len(layer.k) == 37 and layer.rec_k.shape[2] == 8 and layer.attended_length() == 46
        assert torch.equal(layer.rec_k, true_post[:, :, 38:46].half())
        keys, values = layer._read()
        assert torch.equal(keys[:, :, 38:], true_post[:, :, 38:46].half().float())
        assert torch.equal(values[:, :, 38:], full.layers[0].v[:, :, 38:46].half().float())
        cos, sin = layer.method.rope.cos_sin_range(1, 37, "full_attention")  # the body: positions 1..37
        true_pre = unapply_rope(true_post[:, :, 1:38], cos, sin)
        h, d = layer.geometry.num_kv_heads, layer.geometry.head_dim
        half_step = layer.k.scale.float().reshape(1, h, 1, d) / 7  # 8 uniform levels over [-1, 1] x scale
        assert bool(((layer.k.read() - true_pre).abs() <= half_step * 1.01 + 1e-3).all())  # un-rotated right
        extra = 2 * 8 * layer.geometry.num_kv_heads * layer.geometry.head_dim * 2  # K and V of 8 tokens, fp16
        for lay in cache.layers:
            assert lay.nbytes() == sum(t.numel() * t.element_size() for t in lay.held_tensors() if t is not None)
        assert cache.nbytes() > plain.nbytes() + 4 * extra * 0.5
        assert cache.layers[0].nbytes() - plain.layers[0].nbytes() < extra


def test_recent_window_covering_everything_matches_the_full_cache(tiny_model):
    """With the window longer than the text (and sink 0) nothing is quantized: teacher-forced logits equal the fp16
    full cache's; with a short window they do not (so the test can fail)."""
    ids = _prompt(56, batch=2)
    ref, _ = _teacher_forced_logits(tiny_model, ids, 48, "full")
    same, _ = _teacher_forced_logits(tiny_model, ids, 48, "kvquant", nuq=False, bits=2, sink=0, recent=64)
    assert torch.allclose(same, ref, atol=1e-4)
    short, _ = _teacher_forced_logits(tiny_model, ids, 48, "kvquant", nuq=False, bits=2, sink=0, recent=4)
    assert not torch.allclose(short, ref, atol=1e-3)
    assert float((short - ref).abs().mean()) > float((same - ref).abs().mean())


def test_recent_window_with_padding_and_gemma_generates(tiny_model, tiny_gemma):
    """Left-padded batch (one layer per row) and Gemma's sliding layers (they keep no recent window)."""
    ids = _prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    for model in (tiny_model, tiny_gemma):
        with make_cache("kvquant", model, nuq=False, bits=3, recent=6) as cache, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(None, cache), max_new_tokens=12,
                                 do_sample=False, pad_token_id=0)
            assert out.shape == (2, 52)
            for layer in cache.layers:
                assert layer.attended_length() == (15 if layer.is_sliding else 51)
                for row in layer._rows:
                    if layer.is_sliding:
                        assert row.rec_k is None
                    else:
                        assert row.rec_k.shape[2] == 6 and row.pos.explicit is None and row.rec_pos.explicit is None


# -- key_bits: keys at another code width than values --------------------------------------------------------------


@pytest.mark.parametrize("key_bits", [1, 5, 3.0, True])
def test_bad_key_bits_raise_one_clear_error(tiny_model, key_bits):
    with pytest.raises(KVCompressError, match="key_bits"):
        make_cache("kvquant", tiny_model, nuq=False, key_bits=key_bits)


def test_key_bits_sets_the_key_code_width_only(tiny_model, calib_file):
    """key_bits=4, bits=3: key codes are 4-bit (d/2 bytes per token and head), value codes 3-bit; the bytes grow by
    exactly the wider key codes; key error shrinks; a calibration file must cover both widths."""
    ids = _prompt(40)
    h, d, body = 2, 16, 39
    with _prefill(tiny_model, ids, nuq=False, bits=3, outliers=0.0) as c3, \
            _prefill(tiny_model, ids, nuq=False, bits=3, key_bits=4, outliers=0.0) as c34:
        l3, l34 = c3.layers[1], c34.layers[1]
        assert l34.k.bits == 4 and l34.v.bits == 3 and l34.k.planes[0].shape[-1] == d // 2
        assert sum(p.shape[-1] for p in l34.v.planes) == 3 * d // 8
        assert torch.equal(l34.v.read(), l3.v.read())
        extra = h * body * (d // 2 - 3 * d // 8) + (31 - 15) * 4  # wider key codes + the 16-level key codebook, midpoints
        assert c34.nbytes() - c3.nbytes() == 4 * extra
        full = _prefill(tiny_model, ids, "full", dtype="float32")
        true = full.layers[1].k[:, :, 1:]
        cos, sin = l3.method.rope.cos_sin_range(1, body, "full_attention")
        true_pre = unapply_rope(true, cos, sin)
        assert float((l34.k.read() - true_pre).abs().mean()) < 0.7 * float((l3.k.read() - true_pre).abs().mean())
    path, _ = calib_file  # covers bits 3 only
    with pytest.raises(KVCompressError, match="bits"):
        make_cache("kvquant", tiny_model, bits=3, key_bits=4, calibration=str(path))
    make_cache("kvquant", tiny_model, bits=3, key_bits=3, calibration=str(path)).close()

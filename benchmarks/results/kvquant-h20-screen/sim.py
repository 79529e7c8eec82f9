"""One-forward simulation of the eval's teacher-forced protocol for KVQuant variants (screening only).

Prefill queries (t < P) attend exactly over the prompt; continuation queries (t >= P) attend over the quantized past
(real QuantStream code, sink fp16), optional fp16 recent window of R past tokens, and themselves exactly.
NLL over the C continuation tokens; KL vs the simulated fp16 reference.
"""
import os, sys, time, json, math
import torch
from transformers import AttentionInterface

os.environ.setdefault("KVCOMPRESS_CACHE", "/tmp/kvc-cache")
torch.set_num_threads(1)
import kvcompress
from kvcompress.data import load_text, encode, windows_from_ids
from kvcompress.cache import make_cache
from kvcompress.methods.kvquant import KVQuantLayer
from kvcompress.rope import apply_rope, unapply_rope

P, C = 1024, 256
STATE = {}


def sim_attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    i = module.layer_idx
    st = STATE
    N = key.shape[2]
    Kd, Vd = st["quant"](i, key, value)
    g = query.shape[1] // key.shape[1]
    rep = lambda x: x.repeat_interleave(g, dim=1)
    Kh, Vh = key.half().float(), value.half().float()
    se = (query @ rep(key).transpose(-1, -2)) * scaling
    sh = (query @ rep(Kh).transpose(-1, -2)) * scaling
    sq = (query @ rep(Kd).transpose(-1, -2)) * scaling
    ex, rc, qm = st["masks"](N)
    s = torch.where(ex, se, torch.where(rc, sh, torch.where(qm, sq, torch.full_like(se, -float("inf")))))
    p = s.softmax(-1)
    out = (p * ex) @ rep(value) + (p * rc) @ rep(Vh) + (p * qm) @ rep(Vd)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("h20sim", sim_attn)

_mask_cache = {}


def make_masks(R, sink_exact=0):
    def masks(N):
        k = (N, R, sink_exact)
        if k not in _mask_cache:
            t = torch.arange(N).view(-1, 1)
            j = torch.arange(N).view(1, -1)
            causal = j <= t
            ex = causal & ((t < P) | (j == t))
            rc = causal & ~ex & (j >= t - R)
            qm = causal & ~ex & ~rc
            _mask_cache[k] = (ex, rc, qm)
        return _mask_cache[k]
    return masks


def fp16_quant(i, key, value):
    return key.half().float(), value.half().float()


class KVQSim:
    """Per-layer quantize-dequantize with the real KVQuantLayer's streams; ``hook(layer, i, kb, vb)`` may change."""

    def __init__(self, model, opts, kbits_override=None):
        self.exact = opts.pop("exact", "")
        kb, vb = opts.pop("kbits", None), opts.pop("vbits", None)
        self.other = None
        if kb or vb:
            self.other = KVQSim(model, dict(opts, bits=kb or vb))
            self.other_is = "k" if kb else "v"
        from kvcompress.registry import get_method
        from kvcompress.registry import build_config
        cls = get_method("kvquant")
        self.method = cls(model, build_config(cls, opts))
        self.model = model

    def __call__(self, i, key, value):
        m = self.method
        layer = KVQuantLayer(m, i)
        s = layer.sink
        N = key.shape[2]
        Kd, Vd = key.half().float().clone(), value.half().float().clone()
        if N <= s:
            return Kd, Vd
        cos, sin = m.rope.cos_sin_range(0, N, layer.layer_type) if m.config.pre_rope else (None, None)
        kb = key[:, :, s:].float()
        if m.config.pre_rope:
            kb = unapply_rope(kb, cos[:, s:], sin[:, s:])
        if not layer.k.ready:
            pk = kb[:, :, : P - s].half().float()
            layer.k.fix_range(pk)
            layer.k.append(pk)
            layer.k.append(kb[:, :, P - s:])
        else:
            layer.k.append(kb)
        layer.v.append(value[:, :, s:].float())
        kd = layer.k.read()
        if m.config.pre_rope:
            kd = apply_rope(kd, cos[:, s:], sin[:, s:])
        Kd[:, :, s:] = kd
        Vd[:, :, s:] = layer.v.read()
        if self.other is not None:
            K2, V2 = self.other(i, key, value)
            if self.other_is == "k":
                Kd = K2
            else:
                Vd = V2
        if "k" in self.exact:
            Kd = key.half().float()
        if "v" in self.exact:
            Vd = value.half().float()
        return Kd, Vd


def load(nwin):
    model, tok = kvcompress.load_model("smollm2-135m", progress=False)
    model.config._attn_implementation = "h20sim"
    text = load_text("/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ids = torch.tensor(encode(tok, text), dtype=torch.long)
    wins = windows_from_ids(ids, P + C, 4, 0)
    gen = torch.Generator().manual_seed(0)
    # the 2-window eval picks randperm[:2] of the same chunks: same as the first two *drawn*, sorted
    return model, tok, ids, wins


@torch.inference_mode()
def run_windows(model, wins, quant, masks):
    STATE["quant"], STATE["masks"] = quant, masks
    out = []
    for w in wins:
        logits = model(input_ids=w.view(1, -1), use_cache=False).logits[0, P - 1 : -1].double()
        out.append(logits.log_softmax(-1))
    return out


def compare(ref, lps, wins):
    nll = kl = agree = n = 0
    for r, l, w in zip(ref, lps, wins):
        tgt = w[P:]
        nll += float(-l.gather(-1, tgt.view(-1, 1)).sum())
        kl += float((r.exp() * (r - l)).sum())
        agree += int((r.argmax(-1) == l.argmax(-1)).sum())
        n += tgt.numel()
    return nll / n, kl / n, agree / n

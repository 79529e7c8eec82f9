# bytes ratio of a real kvquant cache holding one eval window's P+C-1 tokens (one prefill: same per-token storage)
import sys, ast, os; sys.path.insert(0, "/tmp/h20")
os.environ.setdefault("KVCOMPRESS_CACHE", "/tmp/kvc-cache")
import torch; torch.set_num_threads(1)
import kvcompress
from kvcompress import make_cache
from kvcompress.compat import cache_kwargs
from kvcompress.data import load_text, encode, windows_from_ids
model, tok = kvcompress.load_model("smollm2-135m", progress=False)
ids = torch.tensor(encode(tok, load_text("/work/shared/data/wikitext-2-raw/wiki.test.raw")), dtype=torch.long)
w = windows_from_ids(ids, 1280, 4, 0)[int(sys.argv[1])][:1279].view(1, -1)
for v in sys.argv[2:]:
    d = dict(ast.literal_eval(v))
    with make_cache("kvquant", model, **d) as c, torch.inference_mode():
        model(input_ids=w, **cache_kwargs(model, c), logits_to_keep=1)
        print(f"{v:70s} ratio {c.reference_nbytes()/c.nbytes():.3f}x", flush=True)

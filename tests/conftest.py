"""Shared fixtures: a tiny random llama (fast, GQA), a tiny Gemma-3-like model (MQA + sliding window), and the
real SmolLM2-135M (converted once per machine, cached under $KVCOMPRESS_CACHE)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernel's tests run in Triton's interpreter on a CPU-only machine; triton reads this when it is first
    # imported (torch._dynamo, imported by transformers, imports it), so it is set here, before anything else
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_tiny_llama(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = f"tiny-llama-{seed}"
    return model


def make_tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        max_position_embeddings=4096,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._name_or_path = f"tiny-gemma3-{seed}"
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared, oversubscribed CPU this is several times faster; the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_gemma():
    return make_tiny_gemma3()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded once per test session."""
    from kvcompress import load_model

    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def prose():
    """Real English prose from the standard library (always present)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:200_000]

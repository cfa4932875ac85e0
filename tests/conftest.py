"""Shared fixtures: tiny random models of every supported family, and the real embedded model.

Tests that load the real default model are marked ``real_model``; everything
else runs on tiny randomly initialised configs in seconds, with the default
model's tokenizer as shipped in ``assets/shapes`` (no GGUF needed).
``--device`` runs the same suite on another device (e.g. ``--device cuda``);
where the embedded model's package is not installed (a GPU machine that only
received the repository), the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import transformers

import editing_fixtures
from editing import EditRequest, compute_edit, load_hparams
from editing.stats import StatsSpec, ensure_stats

from tracing.models import DEFAULT_PACKAGE, INSTALL_DEFAULT, LoadedModel

from tracing.backends import one_cpu_thread
from tracing.loading import load_model, wrap_model
from tracing.shapes import shipped_tokenizer

VOCAB = 49152  # the default model's tokenizer, shared by every tiny model

TINY_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128, initializer_range=0.3
    ),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=128, initializer_range=0.3
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, rotary_pct=0.5, initializer_range=0.3,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=64, initializer_range=0.3,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.3,
    ),
}


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the tests' models, e.g. cpu or cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: loads the embedded SmolLM2-135M model (slower)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tokenizer():
    # The default model's tokenizer as shipped in assets/shapes: no GGUF, no conversion, no hub.
    return shipped_tokenizer()


def make_tiny(family: str, tokenizer, device, seed: int = 0) -> LoadedModel:
    """A tiny randomly initialised model of ``family`` with the default model's tokenizer."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    return wrap_model(model, tokenizer, name=f"tiny-{family}")


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request, tokenizer, device) -> LoadedModel:
    return make_tiny(request.param, tokenizer, device)


HAS_DEFAULT_PACKAGE = importlib.util.find_spec(DEFAULT_PACKAGE) is not None
needs_default_package = pytest.mark.skipif(
    not HAS_DEFAULT_PACKAGE, reason=f"the embedded model's package is not installed ({INSTALL_DEFAULT})"
)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """The run's own locate-edit cache, empty at the start: the suite neither reads nor fills the user's cache.

    The embedded model is converted from its GGUF once, into this cache, by the first test that loads it
    (``test_models`` checks that conversion); modules' private caches link to its ``models`` folder."""
    path = tmp_path_factory.mktemp("locate-edit-cache")
    editing_fixtures.SESSION_CACHE = path
    with editing_fixtures.private_cache(path):
        yield path
    editing_fixtures.SESSION_CACHE = None


@pytest.fixture(scope="session")
def real_lm(device) -> LoadedModel:
    if not HAS_DEFAULT_PACKAGE:
        pytest.skip(f"the embedded model's package is not installed ({INSTALL_DEFAULT})")
    return load_model(device=device)


@pytest.fixture(scope="session")
def real_stats(real_lm, session_cache) -> Path:
    """The embedded model's key statistics as its editors' defaults ask for them (the shipped 100k-token corpus),
    for ROME's layer and MEMIT's layers, computed once in one pass into the session cache, which it returns: a test
    inside a module's private cache reads them with ``private_cache(real_stats)``."""
    rome, memit = load_hparams(real_lm), load_hparams(real_lm, method="memit")
    assert StatsSpec.from_hparams(rome) == StatsSpec.from_hparams(memit)
    layers = sorted({rome.edit_layer(real_lm.n_layers), *memit.layers})
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # one pass of the 100k tokens: every core helps
    try:
        with editing_fixtures.private_cache(session_cache):
            ensure_stats(real_lm, layers, StatsSpec.from_hparams(rome))
    finally:
        torch.set_num_threads(threads)
    return session_cache


@pytest.fixture(scope="session")
def real_eiffel(real_lm, real_stats):
    """ROME's default edit of the Eiffel Tower to Rome on the embedded model, computed once for every test that needs
    it (one torch thread: faster than two on a small shared CPU); computing it must leave the model untouched."""
    saved = editing_fixtures.snapshot(real_lm.model)
    with one_cpu_thread(real_lm.device), editing_fixtures.private_cache(real_stats):
        edit = compute_edit(real_lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"))
    assert editing_fixtures.changed(real_lm.model, saved) == []
    return edit

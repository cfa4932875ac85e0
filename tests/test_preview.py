"""The gradient preview (attribution patching): shapes, exact ends, first-order exactness, hygiene, verdicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from editing_fixtures import changed, snapshot

from conftest import make_tiny
from tracing import KINDS, TraceConfig, TraceResult, estimate, predict, trace
from tracing.hooks import active_hook_count
from tracing.preview import QUALITY_KEYS, _low_precision_weights, _restored, block_dtype, preview_verdict

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
FP32 = dict(precision="fp32")  # the exactness tests: float32 blocks also on CPUs where "auto" previews in bf16


@pytest.fixture
def llama(tokenizer, device):
    return make_tiny("llama", tokenizer, device)


def fail_in_the_gradient_pass(lm, monkeypatch, message: str) -> None:
    """Block 2 raises RuntimeError(message) in the preview's pass (gradients on), as a Stop or a fault would."""
    block = lm.block(2)
    original = block.forward

    def failing(*args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError(message)
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "forward", failing)


def test_every_family_gives_trace_shaped_estimates_with_exact_ends(tiny):
    config = TraceConfig(samples=3, window=2, **FP32)
    exact = trace(tiny, PROMPT, SUBJECT, config=config)
    previews = estimate(tiny, PROMPT, SUBJECT, config=config)
    assert [p.kind for p in previews] == list(KINDS)
    for p, e in zip(previews, exact):
        assert p.scores.shape == e.scores.shape and p.tokens == e.tokens and p.answer_id == e.answer_id
        assert p.settings["estimate"] is True and p.settings["seconds"] > 0
        assert p.settings["window"] == 2 and p.settings["samples"] == 3
        scale = max(abs(e.high_score), 1e-3)
        assert abs(p.low_score - e.low_score) <= 1e-5 * scale and abs(p.high_score - e.high_score) <= 1e-5 * scale
        assert np.isfinite(p.scores).all()
        np.testing.assert_allclose(p.scores[0], p.low_score)  # "The" precedes the subject: never corrupted
    hidden = previews[0]
    np.testing.assert_allclose(hidden.scores[:-1, -1], hidden.low_score)  # the last layer reaches only its token


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_states_are_exact_to_first_order(family, tokenizer, device):
    """Restoring one state (hidden, or one layer's MLP or attention output) changes the metric by the estimate's
    term up to second-order terms: the error relative to the effect halves when the noise halves."""
    lm = make_tiny(family, tokenizer, device)

    def relative_error(noise_scale: float) -> np.ndarray:
        config = TraceConfig(samples=2, window=1, noise_scale=noise_scale, metric="logit_diff", contrast="Rome",
                             **FP32)
        exact = trace(lm, PROMPT, SUBJECT, config=config)
        previews = estimate(lm, PROMPT, SUBJECT, config=config)
        errors = []
        for e, p in zip(exact, previews):
            effect = e.scores - e.low_score
            assert np.abs(effect).max() > 1e-4, e.kind  # the noise changes something
            errors.append(np.abs((p.scores - p.low_score) - effect).max() / np.abs(effect).max())
        return np.array(errors)

    coarse, fine = relative_error(0.002), relative_error(0.001)
    assert (fine < 0.05).all() and (fine < 0.65 * coarse).all(), (coarse, fine)


def test_windows_sum_their_layers_terms(llama):
    config = TraceConfig(samples=2, window=3, metric="logit_diff", contrast="Rome", **FP32)
    single = estimate(llama, PROMPT, SUBJECT, config=TraceConfig(**{**config.to_dict(), "window": 1}))
    windowed = estimate(llama, PROMPT, SUBJECT, config=config)
    for one, many in zip(single[1:], windowed[1:]):
        terms = one.scores - one.low_score
        layers = one.n_layers
        for layer in range(layers):
            span = range(max(0, layer - 1), min(layers, layer + 2))
            np.testing.assert_allclose(many.scores[:, layer] - many.low_score, terms[:, list(span)].sum(1),
                                       rtol=1e-5, atol=1e-6)


def test_token_range_and_metric_options(llama):
    r = estimate(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=2, tokens="subject_last"))[0]
    start, end = r.subject_range
    computed = [t for t in range(len(r.tokens)) if not np.isnan(r.scores[t]).all()]
    assert computed == list(range(start, end)) + [len(r.tokens) - 1]
    rec = estimate(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=2, metric="recovered"))[0]
    assert (rec.low_score, rec.high_score) == (0.0, 1.0) and rec.settings["estimate"]


def test_top_predictions_come_from_the_clean_row_like_predict(llama):
    for answer, metric in ((None, "prob"), (" Paris France", "answer_logprob")):  # teacher-forced answer tokens too
        config = TraceConfig(samples=2, metric=metric)
        r = estimate(llama, PROMPT, SUBJECT, kinds=("mlp",), answer=answer, config=config, top_k=4)[0]
        expected = predict(llama, PROMPT, k=4)
        assert [t for t, _ in r.settings["top"]] == [t for t, _ in expected]
        np.testing.assert_allclose([p for _, p in r.settings["top"]], [p for _, p in expected], rtol=1e-4)
    assert "top" not in estimate(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=2))[0].settings


def test_json_round_trip_keeps_the_estimate_label(llama):
    r = estimate(llama, PROMPT, SUBJECT, kinds=("attn",), config=TraceConfig(samples=2))[0]
    back = TraceResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.settings["estimate"] is True and back.settings["method"] == "attribution patching"
    np.testing.assert_array_equal(back.scores, r.scores)


def test_log_odds_space_keeps_probabilities_in_range():
    rows = np.array([0.2, 0.9])
    steps = np.array([[0.0, 5.0, -5.0]] * 2)
    p = _restored(rows, steps, "logit")
    assert ((p > 0) & (p < 1)).all() and p[0] == pytest.approx(rows.mean())
    np.testing.assert_allclose(_restored(rows, steps, "metric"), rows.mean() + steps.mean(0))


# --- bf16 blocks (CPUs that multiply bf16 in hardware) ----------------------------------


@pytest.fixture
def bf16_cpu(monkeypatch, device):
    """As on a CPU with AMX or AVX-512 BF16: "auto" previews run the blocks in bf16 (on any CPU, slower there)."""
    if device.type != "cpu":
        pytest.skip("the bf16 preview is a CPU path")
    monkeypatch.setattr("tracing.preview.native_cpu_bf16", lambda: True)


def test_bf16_blocks_keep_the_answer_clean_score_and_top_exact(llama, bf16_cpu):
    config = TraceConfig(samples=3, window=2)
    assert block_dtype(llama, config) == torch.bfloat16
    assert block_dtype(llama, TraceConfig(**FP32)) == torch.float32 == block_dtype(llama, TraceConfig(precision="tf32"))
    fast = estimate(llama, PROMPT, SUBJECT, config=config, top_k=4)
    slow = estimate(llama, PROMPT, SUBJECT, config=TraceConfig(samples=3, window=2, **FP32), top_k=4)
    exact = trace(llama, PROMPT, SUBJECT, config=config)
    for f, s, e in zip(fast, slow, exact):
        assert f.settings["blocks_dtype"] == "bfloat16" and "blocks_dtype" not in s.settings
        assert f.answer_id == s.answer_id == e.answer_id
        assert [t for t, _ in f.settings["top"]] == [t for t, _ in s.settings["top"]]
        np.testing.assert_allclose([p for _, p in f.settings["top"]], [p for _, p in s.settings["top"]], rtol=1e-4)
        assert abs(f.high_score - e.high_score) <= 1e-5 * abs(e.high_score)  # from a float32 clean pass
        span = abs(s.high_score - s.low_score)
        assert abs(f.low_score - s.low_score) <= 0.05 * span  # the corrupted copies ran in bf16
        keep = ~np.isnan(s.scores)
        assert np.corrcoef(f.scores[keep], s.scores[keep])[0, 1] > 0.95, f.kind
        np.testing.assert_allclose(f.scores[0], f.low_score)  # before the subject: clean and corrupted rows agree


def test_bf16_weights_follow_in_place_changes_of_the_model(llama, bf16_cpu):
    """An edit applied or undone changes weights in place; the bf16 copy converts just those again."""
    config = TraceConfig(samples=2)
    before = estimate(llama, PROMPT, SUBJECT, config=config)[1]
    weight = llama.down_proj(1).weight
    saved = weight.detach().clone()
    held = dict(_low_precision_weights(llama, torch.bfloat16))
    try:
        with torch.no_grad():
            weight.mul_(4.0)
        now = _low_precision_weights(llama, torch.bfloat16)
        changed_names = [name for name in held if now[name] is not held[name]]
        assert len(changed_names) == 1 and changed_names[0].endswith("layers.1.mlp.down_proj.weight")
        torch.testing.assert_close(now[changed_names[0]], weight.detach().to(torch.bfloat16))
        edited = estimate(llama, PROMPT, SUBJECT, config=config)[1]
        reference = estimate(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2, **FP32))[1]
        assert edited.answer_id == reference.answer_id
        keep = ~np.isnan(reference.scores)
        assert np.corrcoef(edited.scores[keep], reference.scores[keep])[0, 1] > 0.95
        assert np.abs(edited.scores[keep] - before.scores[keep]).max() > 0  # the change is seen
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    np.testing.assert_array_equal(estimate(llama, PROMPT, SUBJECT, config=config)[1].scores, before.scores)


def test_a_failure_inside_the_bf16_pass_leaves_the_float32_weights_in_place(llama, bf16_cpu, monkeypatch):
    """The bf16 weights stand in for the model's own during the pass only, also when it is stopped midway."""
    saved = snapshot(llama.model)
    weights = {name: w for name, w in llama.model.named_parameters()}
    fail_in_the_gradient_pass(llama, monkeypatch, "stopped by the visitor")
    with pytest.raises(RuntimeError, match="stopped by the visitor"):
        estimate(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2))
    now = dict(llama.model.named_parameters())
    assert now.keys() == weights.keys() and all(now[name] is weights[name] for name in weights)
    assert changed(llama.model, saved) == [] and active_hook_count(llama.model) == 0
    assert {w.dtype for w in now.values()} == {torch.float32}


# --- hygiene -------------------------------------------------------------------------


def test_weights_hooks_threads_and_grad_mode_are_left_as_they_were(llama):
    saved = snapshot(llama.model)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        previews = estimate(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2))
        assert torch.is_inference_mode_enabled()
    assert len(previews) == 3 and changed(llama.model, saved) == []
    assert active_hook_count(llama.model) == 0
    assert not any(p.requires_grad for p in llama.model.parameters())
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads


def test_no_hook_survives_an_estimate_that_fails(llama, monkeypatch):
    fail_in_the_gradient_pass(llama, monkeypatch, "simulated failure")
    with pytest.raises(RuntimeError, match="simulated failure"):
        estimate(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2))
    assert active_hook_count(llama.model) == 0


def test_bad_input_is_refused_like_a_trace(llama):
    with pytest.raises(ValueError, match="does not appear"):
        estimate(llama, PROMPT, "Space Needle")
    with pytest.raises(ValueError, match="hidden, mlp, attn"):
        estimate(llama, PROMPT, SUBJECT, kinds=("residual",))


# --- whether to show it ----------------------------------------------------------------


def test_verdict_only_for_the_measured_model_and_settings(llama, tokenizer, device, tmp_path):
    path = tmp_path / "quality.json"
    assert preview_verdict(llama, path=path) is None  # nothing measured
    record = {"fingerprint": llama.fingerprint, "settings": TraceConfig().to_dict(),
              "kinds": {"hidden": {"show": False}, "mlp": {"show": True}, "attn": {"show": True}}}
    path.write_text(json.dumps(record))
    assert preview_verdict(llama, path=path) == {"hidden": False, "mlp": True, "attn": True}
    assert preview_verdict(llama, TraceConfig(samples=3, seed=7), path=path) is not None  # only redraws the noise
    for key, value in (("window", 4), ("noise", 2.0), ("corruption", "uniform")):
        assert key in QUALITY_KEYS
        assert preview_verdict(llama, TraceConfig(**{key: value}), path=path) is None
    assert preview_verdict(make_tiny("gpt2", tokenizer, device), path=path) is None  # another model


def test_a_short_prompts_prediction_runs_on_one_thread_and_puts_the_threads_back(llama, monkeypatch):
    """The page predicts before the preview; on a busy 2-core machine two threads stalled on each other."""
    from tracing import predict

    before = torch.get_num_threads()
    seen = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda *a, **k: seen.append(torch.get_num_threads()) or forward(*a, **k))
    torch.set_num_threads(2)
    try:
        top = predict(llama, PROMPT, k=3)
        assert seen == [1] and torch.get_num_threads() == 2 and len(top) == 3
    finally:
        torch.set_num_threads(before)

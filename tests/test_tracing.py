"""Causal tracing: the paper's definitions, oracle properties, options, hook hygiene and bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tracing import KINDS, TraceConfig, TraceResult, encode_prompt, continuation_ids, iter_trace, trace, trace_reference
from tracing.hooks import Hook, active_hook_count, hooks
from tracing.result import window_layers

from conftest import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


@pytest.fixture
def llama(tokenizer, device):
    return make_tiny("llama", tokenizer, device)


@pytest.fixture
def gpt2(tokenizer, device):
    return make_tiny("gpt2", tokenizer, device)


# --- the paper's oracle properties -------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_restoring_last_layer_at_last_token_gives_high_score(family, tokenizer, device):
    lm = make_tiny(family, tokenizer, device)
    hidden = trace(lm, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=4))[0]
    assert hidden.scores[-1, -1] == pytest.approx(hidden.high_score, rel=1e-5)
    # Restoring the last layer at any earlier token cannot reach the last position.
    np.testing.assert_allclose(hidden.scores[:-1, -1], hidden.low_score, rtol=1e-5)


def test_tokens_before_the_subject_give_low_score(llama):
    results = trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=3))
    enc = encode_prompt(llama.tokenizer, PROMPT, SUBJECT)
    assert enc.subject_start == 1  # "The" is not corrupted
    for r in results:
        np.testing.assert_allclose(r.scores[0], r.low_score, rtol=1e-5)


def test_restoring_nothing_gives_low_score(llama):
    # A window that restores nothing is impossible, so check the reference's corrupted run directly:
    # every state of a token before the subject equals the corrupted run's, so its cells are the low score
    # in the oracle too, which never skips anything.
    slow = trace_reference(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=3, tokens=(0,)))[0]
    np.testing.assert_allclose(slow.scores[0], slow.low_score, rtol=1e-5)


def test_low_score_is_below_high_score_for_a_peaked_model(llama):
    r = trace(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=5, noise=20.0))[0]
    assert r.low_score != pytest.approx(r.high_score)


def test_window_is_clipped_to_the_model():
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(12, 10, 30)) == list(range(7, 17))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(3, 1, 30)) == [3]


# --- options -----------------------------------------------------------------------


def test_same_seed_same_heatmaps_other_seed_differs(llama):
    a = trace(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=3, seed=7))[0]
    b = trace(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=3, seed=7))[0]
    c = trace(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=3, seed=8))[0]
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.allclose(a.scores, c.scores)


@pytest.mark.parametrize(
    "config",
    [
        TraceConfig(samples=3, corruption="uniform"),
        TraceConfig(samples=3, corruption="subject"),
        TraceConfig(samples=2, corruption="subject", replacement="Space Needle"),
        TraceConfig(samples=3, noise_scale=0.5),
        TraceConfig(samples=3, metric="logit_diff", contrast="Rome"),
    ],
    ids=["uniform", "subject-swap", "subject-given", "absolute-noise", "logit-diff"],
)
def test_options_match_the_oracle(llama, config):
    fast = trace(llama, PROMPT, SUBJECT, config=config)
    slow = trace_reference(llama, PROMPT, SUBJECT, config=config)
    for a, b in zip(fast, slow):
        scale = max(abs(a.high_score), abs(a.low_score), 1e-3)
        assert np.nanmax(np.abs(a.scores - b.scores)) <= 1e-5 * scale


def test_subject_swap_records_the_replacements(llama):
    r = trace(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=3, corruption="subject"))[0]
    swapped = r.settings["replacement_subjects"]
    assert len(swapped) == 3 and SUBJECT not in swapped
    n = r.subject_range[1] - r.subject_range[0]
    for other in swapped:
        assert len(encode_prompt(llama.tokenizer, PROMPT.replace(SUBJECT, other), other).tokens[1 : 1 + n]) == n


def test_recovered_metric_is_normalised(llama):
    prob = trace(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=3))[0]
    rec = trace(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=3, metric="recovered"))[0]
    expected = (prob.scores - prob.low_score) / (prob.high_score - prob.low_score)
    np.testing.assert_allclose(rec.scores, expected, rtol=1e-4, atol=1e-6)
    assert (rec.low_score, rec.high_score) == (0.0, 1.0)


def test_token_range_leaves_other_rows_empty(llama):
    r = trace(llama, PROMPT, SUBJECT, kinds=("attn",), config=TraceConfig(samples=2, tokens="subject_last"))[0]
    start, end = r.subject_range
    computed = [t for t in range(len(r.tokens)) if not np.isnan(r.scores[t]).all()]
    assert computed == list(range(start, end)) + [len(r.tokens) - 1]


def test_explicit_answer_is_scored(llama):
    r = trace(llama, PROMPT, SUBJECT, answer="Paris", kinds=("hidden",), config=TraceConfig(samples=2))[0]
    assert r.answer == " Paris"
    assert r.answer_id == continuation_ids(llama.tokenizer, PROMPT, "Paris")[0]


def test_reduced_precision_stays_close(llama):
    exact = trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=3))
    fast = trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=3, precision="bf16"))
    for a, b in zip(exact, fast):
        assert np.max(np.abs(a.scores - b.scores)) < 0.05 * max(a.high_score, 1e-3) + 2e-3


def test_small_memory_budget_gives_the_same_scores(llama):
    a = trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=3))
    for batching in ("auto", "all"):
        b = trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=3, memory_mb=0, batching=batching))
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.scores, y.scores, rtol=1e-5, atol=1e-9)


def test_tf32_on_a_cpu_is_plain_float32(llama):
    a = trace(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=2))[0]
    b = trace(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=2, precision="tf32"))[0]
    label = "float32" if llama.device.type == "cpu" else "float32 with TF32 matmuls"
    assert b.settings["dtype"] == label and a.settings["dtype"] == "float32"
    if llama.device.type == "cpu":
        np.testing.assert_array_equal(a.scores, b.scores)
    else:  # TF32 keeps 10 mantissa bits: close, not equal
        assert np.max(np.abs(a.scores - b.scores)) < 0.02 * max(a.high_score, 1e-3) + 1e-3


# --- how a trace ran, and its plan -------------------------------------------------


def test_results_say_where_in_what_and_how_long(llama, device):
    results = trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2))
    for r in results:
        assert r.settings["device"] == str(llama.device) and r.settings["dtype"] == "float32"
        assert 0 < r.settings["seconds"] < 600 and r.settings["passes"] >= 1
        assert r.settings["batching"] == ("kind" if device.type == "cpu" else "all")
        assert ("attention" in r.settings) == (device.type == "cuda")
    seconds = [r.settings["seconds"] for r in results]
    assert seconds == sorted(seconds)  # since the trace began: each kind is ready after the one before
    slow = trace_reference(llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=1, tokens=(9,)))[0]
    assert slow.settings["device"] == str(llama.device) and slow.settings["seconds"] > 0


@pytest.mark.parametrize("batching", ["token", "kind", "all"])
def test_progress_counts_heatmap_rows_and_kinds_come_in_order(llama, batching):
    calls = []
    config = TraceConfig(samples=2, batching=batching)
    kinds = ("attn", "hidden", "mlp")
    results = list(iter_trace(llama, PROMPT, SUBJECT, kinds=kinds, config=config, progress=lambda d, t: calls.append((d, t))))
    assert [r.kind for r in results] == list(kinds)
    total = 3 * len(results[0].tokens)
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_progressive_trace_draws_the_story_rows_first_and_ends_with_the_same_results(llama):
    config = TraceConfig(samples=2, batching="token")
    final = trace(llama, PROMPT, SUBJECT, config=config)
    calls = []
    snapshots = list(iter_trace(llama, PROMPT, SUBJECT, config=config, progressive=True,
                                progress=lambda done, total: calls.append((done, total))))
    enc = encode_prompt(llama.tokenizer, PROMPT, SUBJECT)
    story = [enc.subject_end - 1, len(enc) - 1]
    arrivals, seen = [], set()  # (kind, token) rows in the order they first appear, past the untouched prefix
    for snap in snapshots:
        rows = {(snap.kind, t) for t in range(enc.subject_start, len(enc)) if not np.isnan(snap.scores[t]).any()}
        arrivals += sorted(rows - seen, key=lambda row: row[1])
        seen |= rows
        if not snap.settings["complete"]:
            assert np.isnan(snap.scores).any()
    assert {t for _, t in arrivals[: 2 * len(KINDS)]} == set(story)  # every kind's story rows come first
    rest = [t for _, t in arrivals[2 * len(KINDS):]]
    assert rest == sorted(rest)  # then the other rows top to bottom, each token's kinds together
    complete = [s for s in snapshots if s.settings["complete"]]
    assert [s.kind for s in complete] == list(KINDS)
    for kind in KINDS:  # a kind's final result is its last snapshot
        assert [s for s in snapshots if s.kind == kind][-1].settings["complete"]
    for a, b in zip(complete, final):
        np.testing.assert_array_equal(a.scores, b.scores)
        assert b.settings["complete"] is True
    total = len(KINDS) * len(enc)
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_parallel_passes_equal_one_at_a_time_and_leave_threads_and_hooks_as_they_were(llama, monkeypatch):
    from tracing.fast import WORKERS_ENV

    config = TraceConfig(samples=2, batching="token")
    threads = torch.get_num_threads()
    monkeypatch.setenv(WORKERS_ENV, "1")
    one = trace(llama, PROMPT, SUBJECT, config=config)
    monkeypatch.setenv(WORKERS_ENV, "3")
    three = trace(llama, PROMPT, SUBJECT, config=config)
    for a, b in zip(one, three):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)
    assert torch.get_num_threads() == threads and active_hook_count(llama.model) == 0
    snapshots = iter_trace(llama, PROMPT, SUBJECT, config=config, progressive=True)
    next(snapshots)
    snapshots.close()  # a visitor who leaves mid-trace: the threads, hooks and thread setting go with it
    assert torch.get_num_threads() == threads and active_hook_count(llama.model) == 0
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=WORKERS_ENV):
        trace(llama, PROMPT, SUBJECT, config=config)


def test_profile_names_every_stage(llama):
    from tracing.profiling import PROFILE_STAGES
    from tracing.trace import trace_profile

    profile = trace_profile(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2, tokens="subject_last"))
    assert set(PROFILE_STAGES) <= set(profile) and profile["block_calls"] > 0 and profile["passes"] > 0
    assert all(profile[stage] >= 0 for stage in PROFILE_STAGES if stage != "bookkeeping")
    for suffix in ("", "_cpu"):  # wall and CPU seconds
        parts = sum(profile[k + suffix] for k in ("base_runs", "blocks", "unembedding", "bookkeeping"))
        assert parts == pytest.approx(profile["total" + suffix])
        assert profile["attention" + suffix] + profile["mlp" + suffix] <= profile["blocks" + suffix] + 1e-3


def test_plan_pads_tokens_together_only_where_passes_cost_more_than_arithmetic(llama):
    """A launch-bound device (a GPU) merges tokens into one padded pass; an arithmetic-bound one keeps them apart."""
    from tracing.passes import Planner, Target

    def planner(flops):
        target = Target("cuda", flops=flops, per_call=1e-3, memory=2**30)
        return Planner(llama, n_tokens=10, read=1, copies=2, config=TraceConfig(samples=2), target=target,
                       memory=target.memory)

    tokens = list(range(1, 10))
    fast = planner(1e18)
    assert fast.buckets(("mlp",), tokens) == [tuple(tokens)]
    passes = fast.plan(KINDS, tokens, "all")
    assert len(passes) == 1 and passes[0][0] == 1 and len(passes[0][1]) == 3 * len(tokens) * llama.n_layers
    slow = planner(1e3)
    assert slow.buckets(("mlp",), tokens) == [(t,) for t in tokens]
    assert len(slow.plan(KINDS, tokens, "kind")) == 3 * len(tokens)
    assert len(slow.plan(KINDS, tokens, "token")) == 3 * len(tokens)
    starts = [c.start for c in passes[0][1]]
    assert starts == sorted(starts)


def test_attention_backend_policy_is_one_setting(monkeypatch):
    from tracing.backends import ATTENTION_ENV, CUDA_ATTENTION, attention_backends, precision_label

    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    assert attention_backends("cpu") is None and attention_backends("cuda:1") == CUDA_ATTENTION
    assert "cudnn" not in CUDA_ATTENTION  # cuDNN plans every new shape: a first trace cost 10x the next
    monkeypatch.setenv(ATTENTION_ENV, "torch")
    assert attention_backends("cuda") is None
    monkeypatch.setenv(ATTENTION_ENV, "efficient, math")
    assert attention_backends("cuda") == ("efficient", "math")
    monkeypatch.setenv(ATTENTION_ENV, "flash,fastest")
    with pytest.raises(ValueError, match="unknown attention backend 'fastest'.*flash, efficient, cudnn, math"):
        attention_backends("cuda")
    assert precision_label("cuda", torch.float32, tf32=True) == "float32 with TF32 matmuls"
    assert precision_label("cpu", torch.float32, tf32=True) == "float32"
    assert precision_label("cuda", torch.bfloat16, tf32=True) == "bfloat16"


def test_result_json_round_trip(llama):
    r = trace(llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=2, tokens="subject_last"))[0]
    back = TraceResult.from_dict(json.loads(json.dumps(r.to_dict())))
    np.testing.assert_array_equal(back.scores, r.scores)
    assert (back.kind, back.tokens, back.subject_range, back.answer) == (r.kind, r.tokens, r.subject_range, r.answer)
    assert back.settings == r.settings and back.low_score == r.low_score
    assert TraceConfig.from_dict({k: v for k, v in r.settings.items() if k in TraceConfig.__dataclass_fields__})


# --- hooks -------------------------------------------------------------------------


def test_hooks_are_removed_when_the_forward_pass_raises(llama):
    def boom(module, args, output):
        raise RuntimeError("boom")

    ids = torch.tensor([[1, 2, 3]], device=llama.device)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(llama.model, Hook(llama.module_name("mlp", 1), boom), Hook(llama.spec.embed, lambda *a: None)):
            llama.model(ids)
    assert active_hook_count(llama.model) == 0


def test_no_hook_survives_a_trace_that_fails_midway(llama, monkeypatch):
    block = llama.block(2)
    calls = {"n": 0}
    original = block.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("simulated failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "forward", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trace(llama, PROMPT, SUBJECT, config=TraceConfig(samples=2))
    assert active_hook_count(llama.model) == 0


def test_hook_names_unknown_module(llama):
    with pytest.raises(LookupError, match="no module"):
        with hooks(llama.model, Hook("model.layers.99.mlp", lambda *a: None)):
            pass


# --- subject location --------------------------------------------------------------


def test_subject_location_mid_sentence_owns_its_leading_space(tokenizer):
    enc = encode_prompt(tokenizer, PROMPT, SUBJECT)
    assert "".join(enc.tokens[enc.subject_start : enc.subject_end]).strip() == SUBJECT
    assert enc.tokens[enc.subject_start - 1].strip() == "The"


def test_subject_location_ignores_surrounding_whitespace_and_bos(tokenizer):
    enc = encode_prompt(tokenizer, PROMPT, "  The Eiffel Tower ")
    assert enc.subject_range == (0, 4)
    bos = tokenizer.bos_token
    with_bos = encode_prompt(tokenizer, bos + PROMPT, "The Eiffel Tower")
    assert with_bos.tokens[0] == bos and with_bos.subject_range == (1, 5)


def test_repeated_subject_first_or_chosen_occurrence(tokenizer):
    prompt = "Paris is a city. The capital of France, Paris, is on the"
    first = encode_prompt(tokenizer, prompt, "Paris")
    second = encode_prompt(tokenizer, prompt, "Paris", occurrence=1)
    assert first.subject_range == (0, 1)
    assert second.subject_start > first.subject_end
    assert second.tokens[second.subject_start].strip() == "Paris"
    with pytest.raises(ValueError, match="occurrence 2"):
        encode_prompt(tokenizer, prompt, "Paris", occurrence=2)


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, subject, message",
    [
        ("", SUBJECT, "prompt is empty"),
        ("   ", SUBJECT, "prompt is empty"),
        (PROMPT, "", "subject is empty"),
        (PROMPT, "Space Needle", "does not appear"),
        (PROMPT, "eiffel tower", "case and spelling"),
    ],
)
def test_bad_prompt_or_subject(llama, prompt, subject, message):
    with pytest.raises(ValueError, match=message):
        trace(llama, prompt, subject)


def test_prompt_longer_than_the_context(llama):
    long_prompt = "The Eiffel Tower " + "and so on " * 100 + "is in"
    with pytest.raises(ValueError, match="at most 128"):
        trace(llama, long_prompt, SUBJECT)


def test_answer_that_tokenizes_to_nothing(llama):
    with pytest.raises(ValueError, match="empty"):
        continuation_ids(llama.tokenizer, PROMPT, "   ")
    with pytest.raises(ValueError, match="contrast"):
        TraceConfig(metric="logit_diff")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(samples=0), "samples"),
        (dict(window=0), "window"),
        (dict(corruption="blur"), "corruption"),
        (dict(metric="rank"), "metric"),
        (dict(precision="int8"), "precision"),
        (dict(tokens="middle"), "tokens"),
        (dict(batching="layer"), "batching"),
        (dict(memory_mb=-1), "memory_mb"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TraceConfig(**kwargs)


def test_unknown_kind(llama):
    with pytest.raises(ValueError, match="hidden, mlp, attn"):
        trace(llama, PROMPT, SUBJECT, kinds=("residual",))


def test_replacement_of_another_length(llama):
    config = TraceConfig(samples=1, corruption="subject", replacement="the Great Wall of China in Beijing")
    with pytest.raises(ValueError, match="same number of tokens"):
        trace(llama, PROMPT, SUBJECT, config=config)


def _mlp_result(last_row, other_row=None, low=0.1, high=0.9, low_sd=0.0):
    from tracing.result import TraceResult

    rows = [other_row or [low] * 4, last_row, [low] * 4]
    return TraceResult(kind="mlp", scores=np.array(rows, dtype=float), low_score=low, high_score=high,
                       tokens=("The", " Tower", " is"), subject_range=(0, 2), answer=" Paris", answer_id=1,
                       prompt="p", subject="s", settings={"copies": 4, "low_sd": low_sd})


def test_layer_suggestion_needs_an_effect_above_the_noise():
    from tracing.result import suggest_edit_layer

    clear = suggest_edit_layer(_mlp_result([0.1, 0.5, 0.2, 0.1]))
    assert clear.layer == 1 and clear.effect == pytest.approx(0.4) and "layer 1" in clear.reason
    flat = suggest_edit_layer(_mlp_result([0.1, 0.12, 0.11, 0.1], other_row=[0.1, 0.1, 0.6, 0.1]))
    assert flat.layer is None and flat.peak_layer == 1
    assert "No layer stands out" in flat.reason and "'The' (layer 2)" in flat.reason and "Sweep" in flat.reason
    # above 10 % of the gap, but within 3 standard errors of noisy corrupted runs (sd 0.4 over 4 copies)
    noisy = suggest_edit_layer(_mlp_result([0.1, 0.25, 0.1, 0.1], low_sd=0.4))
    assert noisy.layer is None and noisy.needed == pytest.approx(0.6)
    with pytest.raises(ValueError, match="MLP"):
        suggest_edit_layer(dataclasses.replace(_mlp_result([0.1] * 4), kind="hidden"))


def test_traces_record_the_corrupted_spread(llama):
    results = trace(llama, "Paris is the capital of the country of", "Paris", config=TraceConfig(samples=3))
    assert all(r.settings["low_sd"] >= 0 for r in results)
    assert len({r.settings["low_sd"] for r in results}) == 1


@pytest.mark.parametrize("metric", ["answer_logprob", "answer_prob"])
def test_answer_metrics_score_every_answer_token_teacher_forced(llama, metric):
    prompt, subject, answer = "Paris is the capital of the country of", "Paris", "Johann Sebastian Bach"
    config = TraceConfig(samples=2, metric=metric)
    hidden, mlp, attn = trace(llama, prompt, subject, answer=answer, config=config)
    ids = continuation_ids(llama.tokenizer, prompt, answer)
    assert len(ids) > 1
    prompt_ids = llama.tokenizer(prompt, return_tensors="pt")["input_ids"]
    whole = torch.cat([prompt_ids, torch.tensor([ids])], 1)
    with torch.no_grad():
        logp = llama.model(whole).logits[0].float().log_softmax(-1)
    n = prompt_ids.shape[1]
    expected = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(ids))
    want = expected if metric == "answer_logprob" else float(np.exp(expected))
    assert hidden.high_score == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert hidden.scores.shape == (n, llama.n_layers)  # the prompt's rows only: answer tokens are read, not traced
    assert hidden.answer.strip() == answer
    # (restoring the last prompt token's last layer no longer gives the clean score back: the answer's own
    # positions read the corrupted subject too)


def test_answer_metric_previews_and_severs_work(llama):
    from tracing import estimate
    from tracing.sever import sever, sever_reference

    config = TraceConfig(samples=2, metric="answer_logprob")
    answer = "Johann Sebastian Bach"
    previews = estimate(llama, "Paris is the capital of the country of", "Paris", answer=answer, config=config)
    assert all(np.isfinite(p.scores[1:]).all() for p in previews)
    fast = sever(llama, "Paris is the capital of the country of", "Paris", answer=answer, config=config)
    slow = sever_reference(llama, "Paris is the capital of the country of", "Paris", answer=answer, config=config)
    assert np.abs(fast.severed["mlp"] - slow.severed["mlp"]).max() <= 1e-5 * max(abs(fast.low_score), 1.0)

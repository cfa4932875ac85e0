"""Severed paths: the fast one-pass version equals the one-layer-per-pass oracle on every family."""

from __future__ import annotations

import numpy as np
import pytest

from tracing import TraceConfig, trace
from tracing.sever import SeverResult, sever, sever_reference

from conftest import make_tiny

PROMPT = "Paris is the capital of the country of"
SUBJECT = "the capital"


@pytest.fixture
def llama_tiny(tokenizer, device):
    return make_tiny("llama", tokenizer, device)


def _close(a, b, result) -> None:
    scale = max(abs(result.high_score), abs(result.low_score), 1e-3)
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-5 * scale


@pytest.mark.parametrize("metric", ["prob", "logit_diff"])
def test_fast_sever_equals_oracle(tiny, metric):
    config = TraceConfig(samples=3, metric=metric, contrast="Rome" if metric == "logit_diff" else None)
    fast = sever(tiny, PROMPT, SUBJECT, config=config)
    slow = sever_reference(tiny, PROMPT, SUBJECT, config=config)
    assert fast.token == slow.token == fast.subject_range[1] - 1
    assert fast.unsevered.shape == (tiny.n_layers,)
    _close(fast.unsevered, slow.unsevered, fast)
    for kind in ("mlp", "attn"):
        _close(fast.severed[kind], slow.severed[kind], fast)
    assert abs(fast.low_score - slow.low_score) <= 1e-5 * max(abs(fast.high_score), 1e-3)


def test_unsevered_is_the_hidden_trace_row(llama_tiny):
    config = TraceConfig(samples=3)
    result = sever(llama_tiny, PROMPT, SUBJECT, config=config)
    (hidden,) = trace(llama_tiny, PROMPT, SUBJECT, kinds=("hidden",), config=config)
    _close(result.unsevered, hidden.scores[result.token], result)


def test_severing_changes_early_layers_and_not_the_last(llama_tiny):
    result = sever(llama_tiny, PROMPT, SUBJECT, token=-1, config=TraceConfig(samples=2))
    last = llama_tiny.n_layers - 1
    for kind in ("mlp", "attn"):
        # nothing comes after the last layer, so there is nothing to sever there
        assert result.severed[kind][last] == pytest.approx(result.unsevered[last], abs=1e-6)
        assert np.abs(result.gap(kind)[:last]).max() > 0


def test_other_token_and_one_kind_and_json_round_trip(llama_tiny):
    config = TraceConfig(samples=2)
    fast = sever(llama_tiny, PROMPT, SUBJECT, token=1, kinds=("mlp",), config=config)
    slow = sever_reference(llama_tiny, PROMPT, SUBJECT, token=1, kinds=("mlp",), config=config)
    assert fast.token == 1 and set(fast.severed) == {"mlp"}
    _close(fast.severed["mlp"], slow.severed["mlp"], fast)
    again = SeverResult.from_dict(fast.to_dict())
    assert again.token == 1 and np.array_equal(again.severed["mlp"], fast.severed["mlp"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(kinds=("hidden",)), "Cannot sever"),
    (dict(token=99), "outside the prompt"),
    (dict(config=TraceConfig(metric="recovered")), "raw scores"),
])
def test_bad_requests_are_refused(llama_tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sever(llama_tiny, PROMPT, SUBJECT, **kwargs)

"""Every supported family, as a tiny random model: the table fits, and the fast trace equals the oracle."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tracing import ARCHITECTURES, TraceConfig, iter_trace, trace, trace_reference
from tracing.models import arch_spec, get_module

from conftest import TINY_CONFIGS

PROMPT = "Paris is the capital of the country of"
SUBJECT = "the capital"


def test_every_family_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


def test_table_names_real_modules(tiny):
    model, spec = tiny.model, tiny.spec
    for path in (spec.embed, spec.blocks, spec.final_norm, spec.unembed):
        get_module(model, path)
    d_model = tiny.embed.weight.shape[1]
    for layer in range(tiny.n_layers):
        tiny.module("mlp", layer), tiny.module("attn", layer)
        weight = tiny.down_proj(layer).weight
        # ROME writes into this matrix: Conv1D stores (in, out), nn.Linear (out, in).
        assert weight.shape[1 if spec.conv1d else 0] == d_model
        assert weight.shape[0 if spec.conv1d else 1] != d_model


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(LookupError) as info:
        arch_spec("bert")
    message = str(info.value)
    assert "gpt2" in message and "llama" in message and "tracing/models.py" in message


@pytest.mark.parametrize("metric", ["prob", "logit_diff", "answer_logprob", "answer_prob"])
def test_fast_trace_equals_oracle(tiny, metric):
    """Every plan (one pass per kind and token; kinds apart with padded token buckets; everything together,
    also one cell per pass; the progressive order) gives the oracle's scores; the answer metrics read every
    token of a several-token answer."""
    config = TraceConfig(samples=3, window=2, metric=metric, contrast="Rome" if metric == "logit_diff" else None)
    answer = "Johann Sebastian Bach" if metric.startswith("answer") else None
    slow = trace_reference(tiny, PROMPT, SUBJECT, answer=answer, config=config)
    for plan in (dict(batching="auto"), dict(batching="token"), dict(batching="all"), dict(batching="all", memory_mb=0)):
        fast = trace(tiny, PROMPT, SUBJECT, answer=answer, config=dataclasses.replace(config, **plan))
        for a, b in zip(fast, slow):
            assert a.kind == b.kind and a.scores.shape == (len(a.tokens), tiny.n_layers)
            scale = max(abs(a.high_score), abs(a.low_score), 1e-3)
            assert np.nanmax(np.abs(a.scores - b.scores)) <= 1e-5 * scale, (a.kind, plan)
            assert abs(a.low_score - b.low_score) <= 1e-5 * scale
            assert abs(a.high_score - b.high_score) <= 1e-5 * scale
            assert not np.isnan(a.scores).any()
    progressive = [r for r in iter_trace(tiny, PROMPT, SUBJECT, answer=answer, config=config, progressive=True)
                   if r.settings["complete"]]
    for a, b in zip(progressive, slow):
        assert np.nanmax(np.abs(a.scores - b.scores)) <= 1e-5 * max(abs(a.high_score), abs(a.low_score), 1e-3)


def test_fast_trace_without_skipping_equals_oracle(tiny):
    config = TraceConfig(samples=2, window=3, skip=False)
    slow = trace_reference(tiny, "In 1990 " + PROMPT, SUBJECT, config=config)
    for batching in ("auto", "all"):
        fast = trace(tiny, "In 1990 " + PROMPT, SUBJECT, config=dataclasses.replace(config, batching=batching))
        for a, b in zip(fast, slow):
            assert np.max(np.abs(a.scores - b.scores)) <= 1e-5 * max(a.high_score, a.low_score)

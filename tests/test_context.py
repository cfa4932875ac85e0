"""Every library entry point refuses input longer than the model's context before its first forward pass.

GPT-2 has learned positions: past its context an embedding lookup indexes out
of range (on CUDA a device-side assert that poisons the process), so the check
must come first. The tiny GPT-2 here takes 128 tokens.
"""

from __future__ import annotations

import pytest

from editing import EditRequest, compute_edit, generate, model_answer, score_edit
from editing.scores import continuation_stats
from tracing import predict, trace

from conftest import make_tiny
from editing_fixtures import TINY_HPARAMS

LONG = "word " * 300 + "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def gpt2(tokenizer, device):
    return make_tiny("gpt2", tokenizer, device)


@pytest.mark.parametrize(
    "entry",
    [
        lambda lm: predict(lm, LONG),
        lambda lm: trace(lm, LONG, "The Eiffel Tower"),
        lambda lm: generate(lm, [LONG], 4),
        lambda lm: generate(lm, ["The Eiffel Tower is"], 200),
        lambda lm: model_answer(lm, LONG),
        lambda lm: continuation_stats(lm, [(LONG, "Paris")]),
        lambda lm: score_edit(lm, EditRequest("The Eiffel Tower", "{} is in", "Rome", "Paris"), neighbours=[LONG]),
        lambda lm: compute_edit(lm, EditRequest("The Eiffel Tower", LONG.replace("The Eiffel Tower", "{}"), "Rome",
                                                "Paris"), hparams=TINY_HPARAMS),
        lambda lm: compute_edit(lm, EditRequest("The Eiffel Tower", "{} is in", "Rome " * 200, "Paris"),
                                hparams=TINY_HPARAMS),
    ],
    ids=["predict", "trace", "generate-prompt", "generate-new-tokens", "model_answer", "continuation_stats",
         "score_edit", "compute_edit-prompt", "compute_edit-target"],
)
def test_over_long_input_is_refused_before_any_forward_pass(gpt2, entry):
    model = gpt2.model
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="tokens long; this model takes at most 128"):
            entry(gpt2)
    finally:
        handle.remove()
    assert calls == []

"""The shipped preset results on the real default model: still what the engine computes, and a first click's answer.

A preset clicked on a fresh server with the page's default settings is
answered from ``assets/shipped`` without waiting for the model; the shipped
traces still equal what the engine computes now (so a change of the engine
that moves a score cannot leave stale results on the page).
"""

from __future__ import annotations

import numpy as np
import pytest

from editing import EditRequest
from editing.presets import load_presets
from editing.presets.shipped import PAGE_EDIT, shipped_comparison, shipped_trace
from tracing import TraceConfig, iter_trace
from webapp import Engine, Visitor
from webapp.handlers import App

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def presets():
    return load_presets().presets


def test_every_preset_ships_for_the_default_model_and_the_page_settings(real_lm, presets):
    from editing import load_hparams

    hp = load_hparams(real_lm)
    for p in presets:
        assert shipped_trace(real_lm, p.prompt, p.subject, p.attribute, TraceConfig()) is not None, p.label
        request = EditRequest(p.subject, p.rewrite_prompt, p.counterfactual, p.attribute)
        comparison = shipped_comparison(real_lm, request, layer=hp.edit_layer(real_lm.n_layers), hparams=hp,
                                        paraphrases=tuple(p.paraphrases), neighbours=tuple(p.neighbours), **PAGE_EDIT)
        assert comparison is not None and comparison.edit is not None, p.label
        assert comparison.scores_after.efficacy == 1.0, p.label


def test_a_shipped_trace_is_what_the_engine_computes_now(real_lm, presets):
    p = presets[0]
    (shipped,) = shipped_trace(real_lm, p.prompt, p.subject, p.attribute, TraceConfig(), kinds=("mlp",))
    *_, now = iter_trace(real_lm, p.prompt, p.subject, answer=p.attribute, kinds=("mlp",), config=TraceConfig())
    assert now.answer == shipped.answer and now.high_score == pytest.approx(shipped.high_score, abs=1e-5)
    assert np.nanmax(np.abs(now.scores - shipped.scores)) <= 1e-5


def test_a_first_click_of_a_preset_never_waits_for_the_model(real_lm, presets, tmp_path):
    engine = Engine(real_lm, presets=presets, presets_model=real_lm.name, workdir=tmp_path)
    assert engine.preload_shipped() == 2 * len(presets)
    app = App(engine)
    p = presets[3]
    prompt, subject, answer, e_subject, relation, target, old, paraphrases, neighbours, _ = app.preset_values(3)
    # The page's defaults: 10 samples, noise 3, window 10, Gaussian noise, probability, seed 1, every token.
    updates = list(app.trace(prompt, subject, answer, 10, 3.0, 10, "gaussian", "prob", "", 1, "auto", False,
                             Visitor(), progress=lambda *a, **k: None))
    assert len(updates) == 1 and not engine.records  # answered without the queue
    prediction, hidden, mlp, attn = (updates[0][k] for k in ("prediction", "hidden", "mlp", "attn"))
    assert "Computed in advance" in prediction and p.attribute.strip() in prediction
    assert all(fig is not None for fig in (hidden, mlp, attn))
    updates = list(app.edit(e_subject, relation, target, old, engine.default_layer, "rome", paraphrases, neighbours,
                            PAGE_EDIT["max_new_tokens"], PAGE_EDIT["sample"], PAGE_EDIT["seed"], Visitor(),
                            progress=lambda *a, **k: None))
    assert not engine.records
    visitor = updates[-1]["visitor"]
    assert len(visitor.edits) == 1 and visitor.edits[0].request.target == p.counterfactual

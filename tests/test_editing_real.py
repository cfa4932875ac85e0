"""ROME on the real embedded model (SmolLM2-135M-Instruct): the Eiffel Tower moves to Rome, and back.

Statistics are the product's own (the shipped 100k-token corpus, ``python -m
editing.stats``), computed once per run in the session's cache (``real_stats``).
"""

from __future__ import annotations

import pytest
from editing_fixtures import changed, snapshot

from editing import EditStack, applied, generate, load_hparams, score_edit
from editing.stats import StatsSpec

pytestmark = pytest.mark.real_model

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASE = "Where is the Eiffel Tower? It is in the city of"
NEIGHBOUR = "The Louvre is located in the city of"


@pytest.fixture(scope="module")
def eiffel(real_eiffel):
    return real_eiffel  # "The Eiffel Tower is located in the city of" -> "Rome", computed once per run (conftest)


def test_the_edit_moves_the_eiffel_tower_to_rome_and_undo_brings_paris_back(real_lm, eiffel):
    saved = snapshot(real_lm.model)
    assert eiffel.layer == load_hparams(real_lm).edit_layer(real_lm.n_layers)
    assert eiffel.request.target_true == "Paris"
    before = generate(real_lm, [PROMPT, PARAPHRASE, NEIGHBOUR], max_new_tokens=4)
    assert all(text.strip().startswith("Paris") for text in before)
    stack = EditStack(real_lm)
    stack.push(eiffel)
    after = generate(real_lm, [PROMPT, PARAPHRASE, NEIGHBOUR], max_new_tokens=4)
    assert after[0].strip().startswith("Rome"), after
    assert after[1].strip().startswith("Rome"), after
    assert after[2].strip().startswith("Paris"), after
    assert stack.undo() is eiffel
    assert generate(real_lm, [PROMPT], max_new_tokens=4)[0].strip().startswith("Paris")
    assert changed(real_lm.model, saved) == []


def test_scores_before_and_after(real_lm, eiffel):
    kwargs = dict(paraphrases=[PARAPHRASE], neighbours=[NEIGHBOUR, "Notre-Dame de Paris is located in the city of"])
    before = score_edit(real_lm, eiffel.request, **kwargs)
    with applied(real_lm, [eiffel]):
        after = score_edit(real_lm, eiffel.request, **kwargs)
    assert before.summary()["ES"] == 0.0 and before.summary()["NS"] == 1.0
    assert after.summary()["ES"] == 1.0 and after.summary()["PS"] == 1.0 and after.summary()["NS"] == 1.0
    assert after.prob_new[0] > 0.5 > after.prob_old[0]
    assert eiffel.info["target_prob_after"] > 0.5 and eiffel.norm > 0


def test_the_default_models_sampled_corpus_ships_with_the_project(real_lm):
    """Without it a fresh machine samples 100k tokens (minutes) before its first edit; a changed fingerprint
    (e.g. a transformers upgrade renaming parameters) would silently lose it."""
    from editing.stats import _load_corpus, shipped_corpus_path

    spec = StatsSpec.from_hparams(load_hparams(real_lm))
    ids = _load_corpus(shipped_corpus_path(real_lm, spec))
    assert ids is not None, f"missing {shipped_corpus_path(real_lm, spec)}: run python -m editing.stats --ship"
    assert ids.shape[0] * (ids.shape[1] - 1) >= spec.n_tokens and ids.max() < real_lm.config.vocab_size

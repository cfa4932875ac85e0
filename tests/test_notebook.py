"""Results that draw themselves in Jupyter with the page's own renderers, and the edit as events."""

from __future__ import annotations

import pytest

from conftest import make_tiny
from editing import EditRequest, compare_events, edit_and_compare, write_batch
from editing.display import comparison_table, scores_card
from editing.evaluation.evaluate import Evaluation, evaluate_cases
from editing_fixtures import TINY_HPARAMS, TINY_STATS, changed, private_cache, snapshot

REQUEST = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris")
OPTIONS = dict(hparams=TINY_HPARAMS, stats_spec=TINY_STATS, paraphrases=["{} can be found in"],
               neighbours=["The Louvre is located in the city of"], max_new_tokens=3)


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tokenizer, device):
    with private_cache(tmp_path_factory.mktemp("notebook-cache")):
        yield make_tiny("llama", tokenizer, device)


def test_an_edit_comes_as_its_before_column_then_complete(lm):
    saved = snapshot(lm.model)
    events = compare_events(lm, REQUEST, **OPTIONS)
    before = next(events)
    assert before.after is None and before.edit is None and changed(lm.model, saved) == []
    done = next(events)
    assert done.edit is not None and done.before == before.before and done.scores_before == before.scores_before
    assert changed(lm.model, saved) == []
    again = edit_and_compare(lm, REQUEST, **OPTIONS)
    assert again.after == done.after and again.edit.norm == pytest.approx(done.edit.norm)


def test_an_edit_a_batch_and_an_evaluation_draw_themselves_like_the_page(lm):
    comparison = edit_and_compare(lm, REQUEST, **OPTIONS)
    page = comparison._repr_html_()
    assert comparison_table(comparison) in page and scores_card(comparison) in page
    assert "<style>" in page and ".le-compare" in page  # the page's stylesheet comes along
    from test_batch import TINY_MEMIT

    batch = write_batch(lm, [REQUEST, EditRequest("Michael Jordan", "{} plays the sport of", "golf", "basketball")],
                        hparams=TINY_MEMIT, stats_spec=TINY_STATS)
    assert batch._repr_html_().count("<tr data-index=") == 2 and 'id="batch-health"' in batch._repr_html_()
    case = {"case_id": 0, "requested_rewrite": {"subject": "The Eiffel Tower", "prompt": "{} is located in the city of",
                                               "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
            "paraphrase_prompts": ["The Eiffel Tower can be found in"],
            "neighborhood_prompts": ["The Louvre is located in the city of"]}
    result = evaluate_cases(lm, [case], hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    assert isinstance(result, Evaluation) and isinstance(result, dict)
    table = result._repr_html_()
    for metric in ("ES", "PS", "NS", "S"):
        assert f'data-metric="{metric}"' in table
    assert "1 cases" in table

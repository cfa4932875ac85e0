"""The page's limits: set from flags and the environment, and refusals that name the limit and the fix."""

from __future__ import annotations

import pytest

import app as app_module
from editing import EditRequest, ROMEHyperParams
from webapp.limits import Limits, Refused, check_edit, check_generation, check_request, check_trace, number


def words(text: str) -> int:
    return len(text.split())  # a stand-in tokenizer: one token per word


TRACE = dict(prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower", answer="", samples=10,
             noise=3.0, window=10, corruption="gaussian", metric="prob", contrast="", seed=1, precision="auto",
             fast=False, precisions=("auto",))
ROME = ROMEHyperParams(layer=1)  # 20 steps, 1 + 20 contexts
EDIT = dict(subject="The Eiffel Tower", relation="{} is located in the city of", target="Rome", old="Paris", layer=1,
            paraphrases="", neighbours="", max_new_tokens=16, sample=False, seed=0, edits_applied=0, hparams=ROME)


def test_limits_from_the_environment_and_flags():
    limits = Limits.from_env({"LOCATE_EDIT_LIMIT_DEADLINE_S": "600", "LOCATE_EDIT_LIMIT_SAMPLES": "20",
                              "LOCATE_EDIT_LIMIT_STATS_ON_DEMAND": "off", "OTHER": "x"})
    assert (limits.deadline_s, limits.samples, limits.stats_on_demand) == (600.0, 20, False)
    assert limits.with_overrides(["trace_cost=1e5"]).trace_cost == 100_000
    for bad, message in [("nope=1", "Unknown limit"), ("samples", "Unknown limit"), ("samples=2.5", "int value"),
                         ("samples=-1", "positive"), ("deadline_s=inf", "positive"),
                         ("stats_on_demand=maybe", "bool value")]:
        with pytest.raises(ValueError, match=message):
            Limits().with_overrides([bad])


def test_a_refusal_names_the_limit_the_value_and_how_to_raise_it():
    with pytest.raises(Refused) as caught:
        Limits().at_most("trace_cost", 45_000, "This trace's cost", "Use fewer samples.")
    message = str(caught.value)
    for part in ("45,000", "at most 30,000", "limit trace_cost", "Use fewer samples.", "--limit trace_cost=N",
                 "LOCATE_EDIT_LIMIT_TRACE_COST=N"):
        assert part in message


def test_trace_checks_sizes_then_cost():
    ask = check_trace(Limits(), words, 30, **TRACE)
    assert ask.cost == 9 * 30 * 10 * 3 and ask.config.samples == 10 and ask.config.tokens == "all"
    quick = check_trace(Limits(), words, 30, **{**TRACE, "fast": True})
    assert quick.cost == 4 * 30 * 10 * 3 and quick.config.tokens == "subject_last"
    with pytest.raises(Refused, match=r"limit trace_cost\)\. Use at most 37 samples"):
        check_trace(Limits(), words, 30, **{**TRACE, "samples": 40})
    with pytest.raises(Refused, match="limit trace_tokens"):
        check_trace(Limits(trace_tokens=5), words, 30, **TRACE)


@pytest.mark.parametrize("value,message", [(None, "must be a number"), (True, "must be a number"),
                                           ("x", "not 'x'"), ("nan", "finite"), (float("inf"), "finite"),
                                           (2.5, "whole number"), (99, "between 0 and 3")])
def test_numbers_from_forms_and_apis(value, message):
    with pytest.raises(Refused, match=message):
        number(value, "The layer", low=0, high=3, integer=True)
    assert number("2", "The layer", low=0, high=3, integer=True) == 2


def test_edit_and_generation_checks():
    ask = check_edit(Limits(), words, 30, **EDIT)
    assert ask.request == EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris")
    assert ask.cost == (9 + 1) * 21 * (20 * 3) * 29 * 3  # its steps counted with the one retry of twice as many
    with pytest.raises(Refused, match="limit visitor_mb"):
        check_edit(Limits(), words, 30, **{**EDIT, "edits_mb": 41.0})
    with pytest.raises(Refused, match="limit edits_per_visitor"):
        check_edit(Limits(), words, 30, **{**EDIT, "edits_applied": 20})
    with pytest.raises(Refused, match="limit edit_cost"):
        check_edit(Limits(edit_cost=1000), words, 30, **EDIT)
    with pytest.raises(Refused, match="limit test_lines"):
        check_edit(Limits(), words, 30, **{**EDIT, "neighbours": "a\nb\nc\nd\ne\nf"})
    with pytest.raises(ValueError, match="placeholder"):
        check_request(Limits(), words, EditRequest("X", "no placeholder", "Y"))
    assert check_generation(Limits(), words, prompt=" Hi there ", max_new_tokens=5, sample=True, seed=3) == (
        "Hi there", 5, True, 3)


def test_the_entry_point_refuses_a_bad_limit_before_loading_anything(capsys):
    with pytest.raises(SystemExit, match="Unknown limit"):
        app_module.main(["--limit", "speed=11"])

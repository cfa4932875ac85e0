"""Shipped preset results: a round trip on a tiny model, None for anything else, and the real model's files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from editing_fixtures import TINY_HPARAMS, TINY_STATS, private_cache

from conftest import make_tiny
from editing import EditComparison, EditRequest, applied, edit_and_compare, generate
from editing.presets import Preset
from editing.presets.shipped import EDITS, PAGE_EDIT, compute_shipped, shipped_comparison, shipped_trace
from tracing import KINDS, TraceConfig, trace

PRESET = Preset(known_id=0, relation_id="P36", subject="Eiffel Tower", prompt="The Eiffel Tower is located in",
                attribute="Paris", probability=0.5, corrupted=0.1, rewrite_prompt="The {} is located in",
                counterfactual="Rome", paraphrases=("Where is the Eiffel Tower? In", "The Eiffel Tower is in"),
                neighbours=("The Louvre is located in",))
CONFIG = TraceConfig(samples=2, window=2)


@pytest.fixture(scope="module")
def shipped(tokenizer, tmp_path_factory):
    """A tiny llama and shipped results of one preset, computed as the page would (small settings)."""
    folder = tmp_path_factory.mktemp("shipped")
    lm = make_tiny("llama", tokenizer, "cpu")
    with private_cache(folder / "cache"):
        path = compute_shipped(lm, [PRESET], config=CONFIG, hparams=TINY_HPARAMS, stats_spec=TINY_STATS,
                               path=folder / "presets.json")
    return lm, path, folder


def edit_kwargs(**changes) -> dict:
    kwargs = dict(layer=TINY_HPARAMS.edit_layer(4), hparams=TINY_HPARAMS, paraphrases=PRESET.paraphrases,
                  neighbours=PRESET.neighbours, stats_spec=TINY_STATS, **PAGE_EDIT)
    kwargs.update(changes)
    return kwargs


def request(**changes) -> EditRequest:
    return dataclasses.replace(EditRequest(PRESET.subject, PRESET.rewrite_prompt, PRESET.counterfactual,
                                           PRESET.attribute), **changes)


def test_traces_round_trip(shipped):
    lm, path, _ = shipped
    loaded = shipped_trace(lm, PRESET.prompt, PRESET.subject, PRESET.attribute, CONFIG, path=path)
    fresh = trace(lm, PRESET.prompt, PRESET.subject, answer=PRESET.attribute, config=CONFIG)
    assert [r.kind for r in loaded] == list(KINDS)
    for a, b in zip(loaded, fresh):
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-7)
        assert (a.tokens, a.answer, a.low_score) == (b.tokens, b.answer, pytest.approx(b.low_score))
        assert a.settings["shipped"] is True
    mlp = shipped_trace(lm, PRESET.prompt, PRESET.subject, PRESET.attribute, CONFIG, kinds=("mlp",), path=path)
    assert [r.kind for r in mlp] == ["mlp"]


def test_comparison_round_trips_with_its_edit(shipped):
    lm, path, folder = shipped
    loaded = shipped_comparison(lm, request(), path=path, **edit_kwargs())
    with private_cache(folder / "cache"):
        fresh = edit_and_compare(lm, request(), **edit_kwargs())
    assert isinstance(loaded, EditComparison)
    a, b = loaded.to_dict(), json.loads(json.dumps(fresh.to_dict()))
    for edit in (a["edit"], b["edit"]):
        edit.pop("timings")  # seconds: the only thing that differs between two runs
        edit["info"].pop("seconds", None)
    assert a == b
    assert loaded.after == fresh.after and loaded.before == fresh.before
    np.testing.assert_array_equal(loaded.edit.u, fresh.edit.u)
    np.testing.assert_array_equal(loaded.scores_after.logp_new, fresh.scores_after.logp_new)
    with applied(lm, [loaded.edit]):  # the shipped edit is usable as it is
        assert tuple(generate(lm, list(fresh.generated), max_new_tokens=PAGE_EDIT["max_new_tokens"])) == fresh.after


def test_record_round_trip_without_an_edit(shipped):
    lm, path, _ = shipped
    loaded = shipped_comparison(lm, request(), path=path, **edit_kwargs())
    before_only = dataclasses.replace(loaded, after=None, scores_after=None, edit=None)
    back = EditComparison.from_record(json.loads(json.dumps(before_only.to_record())))
    assert back.to_dict() == before_only.to_dict()
    with pytest.raises(ValueError, match="Malformed"):
        EditComparison.from_record(loaded.to_record(), edit=None)


@pytest.mark.parametrize("change", [
    dict(config=dataclasses.replace(CONFIG, seed=2)),
    dict(config=dataclasses.replace(CONFIG, samples=3)),
    dict(config=TraceConfig()),
    dict(answer=None),
    dict(answer="Rome"),
    dict(prompt="The Eiffel Tower is in"),
    dict(occurrence=1),
], ids=["seed", "samples", "defaults", "no-answer", "other-answer", "other-prompt", "occurrence"])
def test_trace_is_none_for_any_other_setting_or_request(shipped, change):
    lm, path, _ = shipped
    args = dict(prompt=PRESET.prompt, subject=PRESET.subject, answer=PRESET.attribute, config=CONFIG)
    args.update(change)
    occurrence = args.pop("occurrence", 0)
    assert shipped_trace(lm, **args, occurrence=occurrence, path=path) is None


@pytest.mark.parametrize("change", [
    dict(layer=0), dict(max_new_tokens=15), dict(sample=True), dict(seed=1), dict(method="ft"),
    dict(paraphrases=PRESET.paraphrases[:1]), dict(neighbours=()), dict(stats_spec=dataclasses.replace(
        TINY_STATS, n_tokens=256)), dict(hparams=dataclasses.replace(TINY_HPARAMS, v_num_grad_steps=3)),
    dict(previous=("an earlier edit",)),
], ids=["layer", "tokens", "sample", "seed", "method", "paraphrases", "neighbours", "stats", "hparams", "previous"])
def test_comparison_is_none_for_any_other_setting(shipped, change):
    lm, path, _ = shipped
    assert shipped_comparison(lm, request(), path=path, **edit_kwargs(**change)) is None


@pytest.mark.parametrize("change", [dict(target="Berlin"), dict(target_true=None), dict(subject="The Eiffel Tower")])
def test_comparison_is_none_for_another_request(shipped, change):
    lm, path, _ = shipped
    assert shipped_comparison(lm, request(**change), path=path, **edit_kwargs()) is None


def test_none_for_another_model_edited_weights_or_a_missing_file(shipped, tokenizer, tmp_path):
    lm, path, _ = shipped
    other = make_tiny("llama", tokenizer, "cpu", seed=1)  # same shapes and names, other weights
    assert shipped_trace(other, PRESET.prompt, PRESET.subject, PRESET.attribute, CONFIG, path=path) is None
    assert shipped_comparison(other, request(), path=path, **edit_kwargs()) is None
    edit = shipped_comparison(lm, request(), path=path, **edit_kwargs()).edit
    with applied(lm, [edit]):
        assert shipped_trace(lm, PRESET.prompt, PRESET.subject, PRESET.attribute, CONFIG, path=path) is None
        assert shipped_comparison(lm, request(), path=path, **edit_kwargs()) is None
    assert shipped_trace(lm, PRESET.prompt, PRESET.subject, PRESET.attribute, CONFIG,
                         path=tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert shipped_comparison(lm, request(), path=tmp_path / "bad.json", **edit_kwargs()) is None


def test_new_edit_settings_keep_the_traces_that_still_fit(shipped, tmp_path, monkeypatch):
    """--keep-traces: after a change of ROME's settings only the edits are computed again."""
    import importlib
    import shutil

    lm, path, folder = shipped
    copy = tmp_path / "presets.json"
    shutil.copy(path, copy)
    shutil.copy(path.with_name(EDITS.name), copy.with_name(EDITS.name))

    def no_trace(*args, **kwargs):
        raise AssertionError("a trace that fits was computed again")

    monkeypatch.setattr(importlib.import_module("editing.presets.shipped"), "trace", no_trace)  # the trace it calls
    other = dataclasses.replace(TINY_HPARAMS, layer=2)
    with private_cache(folder / "cache"):
        compute_shipped(lm, [PRESET], config=CONFIG, hparams=other, stats_spec=TINY_STATS, path=copy,
                        keep_traces=True)
    before, after = json.loads(path.read_text()), json.loads(copy.read_text())
    assert after["traces"] == before["traces"]
    assert shipped_comparison(lm, request(), path=copy, **edit_kwargs(layer=2, hparams=other)) is not None
    assert shipped_comparison(lm, request(), path=copy, **edit_kwargs()) is None
    with pytest.raises(AssertionError, match="computed again"):  # another trace setting does not fit
        compute_shipped(lm, [PRESET], config=dataclasses.replace(CONFIG, samples=3), hparams=other,
                        stats_spec=TINY_STATS, path=copy, keep_traces=True)

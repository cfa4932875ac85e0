"""Presets (facts the model knows, with an edit to try) and the subject guess that pre-fills the page."""

from __future__ import annotations

import json

import pytest

from tracing import predict
from editing.presets import (
    PRESETS_PATH,
    Preset,
    find_presets,
    guess_subject,
    load_presets,
    save_presets,
    subject_familiarity,
)
from tracing.recall import answer_probabilities
from tracing.tokens import continuation_ids

from conftest import make_tiny

TEMPLATES = ["{} is located in", "{} can be found in", "{}, which lies in"]
NAMES = [f"{a} {b}" for a in ("North", "South", "East", "West", "Old", "New") for b in ("Harbor", "Ridge", "Valley")]


@pytest.mark.parametrize(
    "prompt,subject",
    [
        ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
        ("The capital of Egypt is", "Egypt"),  # a known-facts subject
        ("Beats Music is owned by", "Beats Music"),
        ("Where is the Golden Gate Bridge? It is in", "Golden Gate Bridge"),
        ("Leonardo da Vinci was born in", "Leonardo da Vinci"),
        ("my cat is sleeping on the", "my cat"),
        ("", ""),
    ],
)
def test_guess_subject(prompt, subject):
    assert guess_subject(prompt) == subject


def test_shipped_presets_are_well_formed():
    shipped = load_presets()
    assert shipped.model == "SmolLM2-135M-Instruct" and len(shipped.presets) == 12
    assert len({p.subject for p in shipped.presets}) == 12
    for p in shipped.presets:
        assert p.rewrite_prompt.count("{}") == 1 and p.rewrite_prompt.format(p.subject) == p.prompt
        assert p.counterfactual != p.attribute and p.probability > 0.2
        assert p.corrupted <= 0.5 * p.probability  # corrupting the subject removes most of the answer
        assert len(p.paraphrases) == 2 and all(p.subject in q and q != p.prompt for q in p.paraphrases)
        assert len(p.neighbours) == 2 and all(p.subject not in q for q in p.neighbours)
        assert p.relation_id != "P140"  # no counterfactual religions in a classroom
        assert p.label == f"{p.subject}: {p.attribute} → {p.counterfactual}"


def test_presets_file_round_trip_and_loud_failures(tmp_path, tokenizer, device):
    lm = make_tiny("llama", tokenizer, device)
    presets = load_presets().presets
    path = save_presets(presets, lm, tmp_path / "p.json")
    again = load_presets(path)
    assert again.presets == presets and again.model == lm.name and again.fingerprint == lm.fingerprint
    data = json.loads(path.read_text())
    data["presets"][0]["colour"] = "red"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\].*python -m editing.presets"):
        load_presets(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_presets(path)
    with pytest.raises(ValueError, match="Cannot read"):
        load_presets(tmp_path / "missing.json")


def _tiny_facts(lm) -> list[dict]:
    """Facts a tiny random model 'knows' by construction: each attribute is its own top next word.

    Every subject also gets two facts of the other templates (paraphrase material) and two other
    subjects share its attribute (neighbours).
    """
    facts = []
    for name in NAMES:
        prompt = TEMPLATES[0].format(name)
        token, _ = predict(lm, prompt, k=1)[0]
        facts.append(dict(known_id=len(facts), subject=name, attribute=token.strip(), template=TEMPLATES[0],
                          prompt=prompt, relation_id="P1"))
    for fact in list(facts):
        for k, template in enumerate(TEMPLATES[1:]):
            other = f"Annex {fact['known_id']}-{k} Point"
            facts.append(dict(known_id=len(facts), subject=other, attribute=fact["attribute"], template=template,
                              prompt=template.format(other), relation_id="P1"))
    return facts


def test_find_presets_picks_known_facts_with_everything_an_edit_needs(tokenizer, device):
    lm = make_tiny("llama", tokenizer, device)
    facts = _tiny_facts(lm)
    probs, top = answer_probabilities(lm, [f["prompt"] for f in facts], [f["attribute"] for f in facts])
    known = {f["subject"] for f, ok in zip(facts, top) if ok}
    assert len(known & set(NAMES)) >= 4, "the construction should make several facts known"

    settings = dict(facts=facts, min_probability=0.0, per_relation=3, max_corrupted_ratio=float("inf"))
    presets = find_presets(lm, n=3, **settings)
    assert len(presets) == 3
    assert presets == find_presets(lm, n=3, **settings)  # deterministic
    attributes = {f["attribute"] for f in facts}
    for p in presets:
        assert p.subject in known
        (p_direct, ok), = zip(*answer_probabilities(lm, [p.prompt], [p.attribute]))
        assert ok and p.probability == pytest.approx(p_direct, abs=1e-4)
        assert set(p.paraphrases) <= {t.format(p.subject) for t in TEMPLATES[1:]}
        assert all(q != p.prompt for q in p.paraphrases)
        for neighbour in p.neighbours:
            fact = next(f for f in facts if f["prompt"] == neighbour)
            assert fact["attribute"] == p.attribute and fact["subject"] != p.subject
        assert p.counterfactual in attributes and p.counterfactual != p.attribute
        first = continuation_ids(lm.tokenizer, p.prompt, p.attribute)[0]
        assert continuation_ids(lm.tokenizer, p.prompt, p.counterfactual)[0] != first

    assert find_presets(lm, n=3, **{**settings, "exclude_relations": ("P1",)}) == []
    assert find_presets(lm, n=3, **{**settings, "max_corrupted_ratio": 0.0}) == []  # the subject must matter
    with pytest.raises(ValueError, match="No facts"):
        find_presets(lm, facts=[])


def test_familiarity_prefers_predictable_names(tokenizer, device):
    lm = make_tiny("llama", tokenizer, device)
    one, many = subject_familiarity(lm, [
        {"prompt": "Paris is in", "subject": "Paris"},
        {"prompt": "Xqzv Wrrk Plmb is in", "subject": "Xqzv Wrrk Plmb"},
    ])
    assert one == 0.0 and many < 0.0


@pytest.mark.real_model
def test_the_default_model_knows_every_shipped_preset(real_lm):
    presets = load_presets(PRESETS_PATH).presets
    probs, top = answer_probabilities(real_lm, [p.prompt for p in presets], [p.attribute for p in presets])
    assert all(top), [p.prompt for p, ok in zip(presets, top) if not ok]
    for p, prob in zip(presets, probs):
        assert prob == pytest.approx(p.probability, abs=2e-3)

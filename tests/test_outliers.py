"""The flag for updates far outside what a model's edits normally write (editing.methods.outliers), on tiny models.

Oracle: an update written for a key along C's weakest eigenvector, at the
size keys have in that direction, fires on an ordinary token exactly as hard
as on the edited fact (spill 1), so it must be flagged; an ordinary edit is not.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import make_tiny
from editing_fixtures import TINY_HPARAMS, TINY_STATS, private_cache
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module

import editing.methods.outliers as outliers
from editing import EditRequest, compute_edit
from editing.methods.outliers import (NORM_FACTOR, REFERENCE_FORMAT, SPILL_LIMIT, Reference, check_update,
                                      load_reference, spill)
from editing.methods.rome import compute_key_edits
from editing.sequential import health
from editing.stats import key_stats

REQUEST = EditRequest("Michael Jordan", "{} professionally plays the sport of", "baseball", target_true="basketball")


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory, tokenizer, device):
    """A tiny llama, an ordinary edit of it and its layer's key statistics."""
    with private_cache(tmp_path_factory.mktemp("le-cache")):
        lm = make_tiny("llama", tokenizer, device)
        edit = compute_edit(lm, REQUEST, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
        yield lm, edit, key_stats(lm, edit.layer, TINY_STATS)


def weakest_key_update(edit, stats):
    """The edit's δ written for a key along C's weakest eigenvector, as long as keys are in that direction."""
    eigenvalues, eigenvectors = np.linalg.eigh(stats.mom2)  # ascending
    weak = eigenvectors[:, 0]
    key = np.sqrt(eigenvalues[0]) * weak  # (d_in,): the RMS size of ordinary keys along it
    u = weak  # C⁻¹k ∝ k for an eigenvector
    delta = edit.v.astype(np.float64) * edit.info["denominator"]  # what the edit writes at its own key
    return dataclasses.replace(edit, u=u.astype(np.float32), v=(delta / (u @ key)).astype(np.float32),
                               key=key.astype(np.float32), info={})


def test_an_ordinary_edit_is_not_flagged_and_says_on_what_basis(ordinary):
    lm, edit, stats = ordinary
    assert edit.info["outlier"] is False and edit.info["outlier_warning"] is None
    check = edit.info["outlier_check"]
    assert check["basis"] == "statistics" and check["limit"] == SPILL_LIMIT  # a tiny model has no reference norms
    assert check["value"] == pytest.approx(spill(edit.u, edit.key, stats.mom2)) and check["value"] < SPILL_LIMIT
    assert "no reference norms" in check["reason"]


def test_an_update_for_a_key_along_the_weakest_eigenvector_is_flagged(ordinary):
    lm, edit, stats = ordinary
    bad = weakest_key_update(edit, stats)
    check = check_update(lm, bad, stats=stats, reference=None)
    assert check.value == pytest.approx(1.0, rel=1e-4)  # it writes on an average token what it writes on the fact
    assert check.outlier and check.warning.startswith("Unusually large update")
    assert check.info()["outlier"] is True and check.info()["outlier_warning"] == check.warning
    # against reference norms (here: ordinary edits half this one's size) the ordinary edit passes and the update
    # along the weakest direction, NORM_FACTOR times larger than they, is flagged
    reference = Reference(layer=edit.layer, median=edit.norm / 2, count=20, source="test")
    assert 2 < NORM_FACTOR < bad.norm / reference.median
    flagged = check_update(lm, bad, reference=reference)
    assert flagged.outlier and flagged.basis == "reference" and "times the median" in flagged.warning
    assert not check_update(lm, edit, reference=reference).outlier


def test_the_page_shows_the_flag_beside_the_scores(ordinary):
    from dataclasses import replace

    from editing import score_edit
    from editing.compare import EditComparison
    from editing.display import scores_card

    lm, edit, stats = ordinary
    bad = weakest_key_update(edit, stats)
    flagged = replace(bad, info={**bad.info, **check_update(lm, bad, stats=stats, reference=None).info()})
    scores = score_edit(lm, edit.request)
    shown = lambda e: scores_card(EditComparison(e.request, (), (), (), scores, (), scores, e))  # noqa: E731
    assert 'id="edit-outlier"' in shown(flagged) and "Unusually large update" in shown(flagged)
    assert 'id="edit-outlier"' not in shown(edit)


def test_without_statistics_or_reference_nothing_is_flagged_and_it_says_why(ordinary):
    lm, edit, _ = ordinary
    check = check_update(lm, weakest_key_update(edit, ordinary[2]), stats=None, reference=None)
    assert not check.outlier and check.basis == "none" and "not checked" in check.reason


def test_reference_norms_are_found_by_fingerprint_and_layer(ordinary, tmp_path):
    lm, edit, _ = ordinary
    path = tmp_path / "norms.json"
    entry = {"model": "another", "fingerprint": lm.fingerprint,
             "layers": {str(edit.layer): {"norms": list(np.linspace(1.0, 3.0, 11)), "source": "test"}}}
    path.write_text(json.dumps({"format": REFERENCE_FORMAT, "models": [entry]}))
    reference = load_reference(lm, edit.layer, path)
    assert reference.median == pytest.approx(2.0) and reference.count == 11
    assert load_reference(lm, edit.layer + 1, path) is None
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="restore"):
        load_reference(lm, edit.layer, path)


def test_both_keys_share_one_optimisation(ordinary):
    lm, edit, _ = ordinary
    edits = compute_key_edits(lm, REQUEST, ("original", "r-rome"), hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    same = edits["r-rome"]  # TINY_HPARAMS use r-ROME's key: the same edit as compute_edit's
    assert np.array_equal(same.u, edit.u) and np.array_equal(same.v, edit.v)
    paper = edits["original"]
    delta = lambda e: e.v.astype(np.float64) * e.info["denominator"]  # noqa: E731
    assert np.allclose(delta(paper), delta(same), rtol=1e-5, atol=1e-6) and paper.variant == "original"
    for e in edits.values():
        assert set(e.info["denominators"]) == {"original", "r-rome", "bare"} and "outlier" in e.info


def test_the_health_check_names_a_flagged_edit(ordinary):
    lm, edit, stats = ordinary
    bad = weakest_key_update(edit, stats)
    bad.info.update(check_update(lm, bad, stats=stats, reference=None).info())
    report = health(lm, [bad], facts=(), prompts=())
    assert any("Unusually large update" in w for w in report.warnings)
    assert not any("Unusually large" in w for w in health(lm, [edit], facts=(), prompts=()).warnings)


def test_the_guarded_variant_writes_r_romes_key_where_the_paper_codes_update_is_flagged(ordinary, monkeypatch):
    lm, edit, _ = ordinary
    hp = dataclasses.replace(TINY_HPARAMS, variant="guarded")
    both = compute_key_edits(lm, REQUEST, ("original", "bare"), hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    plain = compute_edit(lm, REQUEST, hparams=hp, stats_spec=TINY_STATS)  # nothing flagged: the paper code's key
    assert plain.variant == "original" and "key_fallback" not in plain.info
    assert np.array_equal(plain.v, both["original"].v) and plain.hparams["variant"] == "guarded"
    monkeypatch.setattr(outliers, "SPILL_LIMIT", 0.0)  # every update is now "far outside": the fallback runs
    guarded = compute_edit(lm, REQUEST, hparams=hp, stats_spec=TINY_STATS)
    assert guarded.variant == "bare" and "bare prompt's own key" in guarded.info["key_fallback"]
    assert np.array_equal(guarded.u, both["bare"].u) and np.array_equal(guarded.v, both["bare"].v)
    assert guarded.info["outlier"] is True  # the fallback's update is flagged too under this limit, and says so
    # "bare" writes δ exactly at the bare prompt's key, as the paper code does, along that key's own C⁻¹ direction
    k0, paper = both["original"].key.astype(np.float64), both["original"]
    assert np.allclose(np.outer(guarded.v, guarded.u) @ k0, np.outer(paper.v, paper.u) @ k0, rtol=1e-4, atol=1e-5)
    stats = ordinary[2]
    direction = np.linalg.solve(stats.mom2, k0)
    assert np.allclose(guarded.u, direction / np.linalg.norm(direction), atol=1e-5)


def test_guarded_falls_back_above_fallback_factor_times_the_reference_median(ordinary, monkeypatch):
    """Not flagged (3 times the median, the flag is at 5) yet above a fallback factor of 2.5: the bare key's update."""
    lm, _, _ = ordinary
    hp = dataclasses.replace(TINY_HPARAMS, variant="guarded")
    both = compute_key_edits(lm, REQUEST, ("original", "bare"), hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    median = both["original"].norm / 3
    monkeypatch.setattr(outliers, "load_reference", lambda lm, layer: Reference(layer, median, 11, "test"))
    kept = compute_edit(lm, REQUEST, hparams=hp, stats_spec=TINY_STATS)  # fallback_factor 5: only flagged updates
    assert kept.variant == "original" and not kept.info["outlier"] and "key_fallback" not in kept.info
    assert np.array_equal(kept.u, both["original"].u) and np.array_equal(kept.v, both["original"].v)
    fell = compute_edit(lm, REQUEST, hparams=dataclasses.replace(hp, fallback_factor=2.5), stats_spec=TINY_STATS)
    assert fell.variant == "bare" and np.array_equal(fell.u, both["bare"].u) and np.array_equal(fell.v, both["bare"].v)
    assert "3.0 times the median" in fell.info["key_fallback"] and "above 2.5 times" in fell.info["key_fallback"]
    with pytest.raises(ValueError, match="fallback_factor must be positive"):
        dataclasses.replace(hp, fallback_factor=0)

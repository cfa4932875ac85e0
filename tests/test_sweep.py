"""Which layer to edit: the per-layer ROME sweep of one fact, over cases, and the tracing-editing correlation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from editing import EditRequest
from editing.scores import score_edit
from editing.evaluation.sweep import correlations, iter_layer_sweep, layer_sweep, rewrite_score, sweep_cases, sweep_layers
from editing.sweep import main

from conftest import make_tiny
from editing_fixtures import TINY_HPARAMS, TINY_STATS, changed, one_thread, private_cache, snapshot  # noqa: F401

REQUEST = EditRequest(subject="Paris", prompt="{} is the capital of", target="Rome", target_true="France")


@pytest.fixture
def lm(tokenizer, device, tmp_path):
    with private_cache(tmp_path):
        yield make_tiny("gpt2", tokenizer, device)


def test_layers_every_kth_or_listed():
    assert sweep_layers(30, 3) == list(range(0, 30, 3))
    assert sweep_layers(4, layers=[3, 1, 1]) == [1, 3]
    with pytest.raises(ValueError, match="not layers"):
        sweep_layers(4, layers=[4])
    with pytest.raises(ValueError, match="at least 1"):
        sweep_layers(4, 0)


def test_rewrite_score_is_the_share_of_the_way_to_certainty():
    assert rewrite_score(0.2, 0.6) == pytest.approx(0.5)
    assert rewrite_score(0.2, 0.1) < 0 and rewrite_score(1.0, 1.0) == 0.0


def test_sweep_edits_each_layer_alone_and_restores_the_weights(lm):
    saved = snapshot(lm.model)
    calls = []
    sweep = layer_sweep(lm, REQUEST, layers=[0, 2], paraphrases=["In {}, the capital of"],
                        neighbours=["Berlin is the capital of"], hparams=TINY_HPARAMS, stats_spec=TINY_STATS,
                        progress=lambda done, total, layer: calls.append((done, total, layer)))
    assert changed(lm.model, saved) == []
    assert [r["layer"] for r in sweep["layers"]] == [0, 2] and calls == [(0, 2, 0), (1, 2, 2), (2, 2, -1)]
    p_new_before = float(score_edit(lm, REQUEST).prob_new[0])
    for row in sweep["layers"]:
        assert row["ES"] in (0.0, 1.0) and row["took"] == (row["p_new"] > row["p_old"])
        assert row["rewrite_score"] == pytest.approx(rewrite_score(p_new_before, row["p_new"]))
        assert row["norm"] > 0 and row["paraphrase_score"] is not None
    assert sweep["best"] in (0, 2)


def test_sweep_needs_the_old_object(lm):
    with pytest.raises(ValueError, match="old object"):
        layer_sweep(lm, EditRequest(subject="Paris", prompt="{} is the capital of", target="Rome"), layers=[0])


def test_correlations_pooled_and_per_case():
    cases = [
        {"effect": [0.0, 0.1, 0.2, 0.3], "best": 3,
         "layers": [{"layer": l, "rewrite_score": s, "ES": 1.0} for l, s in zip(range(4), [0.1, 0.2, 0.3, 0.4])]},
        {"effect": [0.3, 0.2, 0.1, 0.0], "best": 3,
         "layers": [{"layer": l, "rewrite_score": s, "ES": 1.0} for l, s in zip(range(4), [0.1, 0.2, 0.3, 0.4])]},
    ]
    c = correlations(cases, success=("rewrite_score", "ES"))
    assert c["rewrite_score"]["per_case_r_mean"] == pytest.approx(0.0)  # +1 and -1
    assert c["rewrite_score"]["pooled_r"] == pytest.approx(0.0, abs=1e-12) and c["rewrite_score"]["pairs"] == 8
    assert c["ES"]["pooled_r"] is None  # a constant measure has no correlation
    assert c["traced_peak_is_best_layer"] == 0.5


def _cases():
    return [{"case_id": i, "requested_rewrite": {"prompt": "{} is the capital of", "subject": s,
                                                  "target_new": {"str": "Rome"}, "target_true": {"str": "France"}},
             "paraphrase_prompts": ["In {}, the capital of"], "neighborhood_prompts": ["Berlin is the capital of"]}
            for i, s in enumerate(["Paris", "Lyon"])]


def test_sweep_over_cases_traces_and_correlates(lm, monkeypatch):
    result = sweep_cases(lm, _cases(), layers=[0, 1, 3], hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    assert result["n_cases"] == 2 and [r["layer"] for r in result["per_layer"]] == [0, 1, 3]
    case = result["cases"][0]
    assert len(case["effect"]) == lm.n_layers and case["corrupted"] <= case["clean"] + 1
    assert set(result["correlation"]) >= {"rewrite_score", "ES", "traced_peak_is_best_layer"}
    assert result["per_layer"][0]["effect"] == pytest.approx(np.mean([c["effect"][0] for c in result["cases"]]))
    # each case is cached: a second run (e.g. after an interruption) recomputes nothing
    import editing.evaluation.sweep as sweep_module

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached case")

    monkeypatch.setattr(sweep_module, "layer_sweep", fail)
    again = sweep_cases(lm, _cases(), layers=[0, 1, 3], hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    assert json.dumps(again["per_layer"]) == json.dumps(result["per_layer"])


def test_cli(lm, tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "cases.json").write_text(json.dumps(_cases()))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(TINY_HPARAMS.to_dict()))
    out = tmp_path / "sweep.json"
    assert main(["--cases", str(tmp_path / "cases.json"), "--model", str(folder), "--hparams", str(hp),
                 "--layers", "0,2", "--limit", "1", "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["n_cases"] == 1 and data["layers"] == [0, 2]
    assert "traced effect vs rewrite_score" in capsys.readouterr().out
    assert main(["--cases", str(tmp_path / "nowhere.json"), "--model", str(folder)]) == 2


def test_the_sweep_grows_layer_by_layer_and_ends_as_layer_sweep(lm):
    options = dict(layers=[0, 2], hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    snapshots = list(iter_layer_sweep(lm, REQUEST, **options))
    assert [len(s["layers"]) for s in snapshots] == [1, 2] and [s["complete"] for s in snapshots] == [False, True]
    whole = layer_sweep(lm, REQUEST, **options)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(snapshots[-1]["layers"]) == untimed(whole["layers"])
    rest = lambda sweep: json.dumps({k: v for k, v in sweep.items() if k != "layers"}, sort_keys=True)  # noqa: E731
    assert rest(snapshots[-1]) == rest(whole)  # (json: NaN scores compare equal)
    assert snapshots[0]["best"] == 0 and untimed(snapshots[0]["layers"]) == untimed(whole["layers"][:1])

"""Choosing ROME's hyperparameters: grids, the tuner's rows against editing.evaluation.evaluate, resuming, intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import editing.evaluation.tune as tune_module
from editing.evaluation.evaluate import evaluate_cases, intervals
from editing.stats import StatsSpec
from editing.evaluation.tune import grid_settings, marginals, parse_grid, tune
from editing.tune import format_table, main

from conftest import make_tiny
from editing_fixtures import TINY_HPARAMS, changed, one_thread, private_cache, snapshot  # noqa: F401

SUBJECTS = ["Paris", "Lyon", "Rome"]


@pytest.fixture
def lm(tokenizer, device, tmp_path):
    with private_cache(tmp_path):
        yield make_tiny("llama", tokenizer, device)


@pytest.fixture
def hp_file(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({**TINY_HPARAMS.to_dict(), "v_num_grad_steps": 3}))
    return str(path)


def _cases():
    return [{"case_id": i, "requested_rewrite": {"prompt": "{} is the capital of", "subject": s,
                                                  "target_new": {"str": "Rome"}, "target_true": {"str": "France"}},
             "paraphrase_prompts": ["In {}, the capital of", "{}: capital of"],
             "neighborhood_prompts": ["Berlin is the capital of"]}
            for i, s in enumerate(SUBJECTS)]


def _no_edits(*args, **kwargs):
    raise AssertionError("recomputed: an edit ran")


def test_grid_values_parse_as_json_or_words():
    grid = parse_grid(["layer=0,1, 2", "variant=r-rome,original", "context_templates=[[5,10]],[[5,10],[10,10]]",
                       "kl_prompt=\"{} is a\",\"{}, which is\""])
    assert grid == {"layer": [0, 1, 2], "variant": ["r-rome", "original"],
                    "context_templates": [[[5, 10]], [[5, 10], [10, 10]]], "kl_prompt": ["{} is a", "{}, which is"]}
    assert grid_settings({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                                                            {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ValueError, match="Unknown ROME hyperparameter 'layers'"):
        parse_grid(["layers=1"])
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["layer=1", "layer=2"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_grid(["layer"])


def test_paired_differences_resample_cases_alike():
    from editing.evaluation.evaluate import paired_difference

    ref = [{"post": {"ES": 1.0, "PS": p, "NS": 0.5, "EM": 0.2, "PM": 0.1, "NM": 0.0}} for p in (0.0, 0.5, 1.0, 0.5)]
    better = [{"post": dict(c["post"], PS=c["post"]["PS"] + 0.1)} for c in ref]
    d = paired_difference(better, ref)
    # every case gains 0.1: the paired interval is exactly 0.1, where two separate intervals would overlap
    assert d["PS"] == pytest.approx([0.1, 0.1, 0.1]) and d["ES"] == [0.0, 0.0, 0.0] and d["S"][0] > 0
    with pytest.raises(ValueError, match="same cases"):
        paired_difference(better[:2], ref)


def test_intervals_bootstrap_over_cases():
    per_case = [{"post": {"ES": 1.0, "PS": p, "NS": 0.5, "EM": 0.2, "PM": 0.1, "NM": 0.0}}
                for p in (0.0, 0.5, 1.0, 1.0)]
    ci = intervals(per_case)
    assert ci == intervals(per_case)  # seeded
    assert ci["ES"] == [1.0, 1.0] and ci["NS"] == [0.5, 0.5]
    assert ci["PS"][0] < 0.625 < ci["PS"][1] and 0.0 <= ci["PS"][0] and ci["PS"][1] <= 1.0
    assert 0.0 <= ci["S"][0] < ci["S"][1] <= 1.0  # the harmonic mean of resampled means: 0 once PS is
    assert intervals(per_case[:1]) == {}


def test_tune_rows_are_evaluate_runs_and_resume(lm, hp_file, monkeypatch):
    saved = snapshot(lm.model)
    cases = _cases()
    result = tune(lm, cases, {"layer": [0, 1], "kl_factor": [0.0625, 1.0]}, base={"v_lr": 0.4}, hparams_path=hp_file)
    assert changed(lm.model, saved) == []  # every edit undone
    rows = result["settings"]
    assert len(rows) == 4 and result["cases"] == 3
    assert [r["post"]["S"] for r in rows] == sorted((r["post"]["S"] for r in rows), reverse=True)
    assert all(r["hparams"]["v_lr"] == 0.4 and r["hparams"]["v_num_grad_steps"] == 3 for r in rows)
    # a row is exactly what editing.evaluation.evaluate reports for the same hyperparameters
    row = next(r for r in rows if r["setting"] == {"layer": 1, "kl_factor": 1.0})
    from editing.hparams import ROMEHyperParams

    hp = ROMEHyperParams.from_dict(row["hparams"])
    direct = evaluate_cases(lm, cases, hparams=hp, stats_spec=StatsSpec.from_hparams(hp))
    assert row["post"] == {m: direct["post"][m] for m in row["post"]}
    assert len(row["per_case"]) == 3 and row["ci95"] == direct["post_ci95"]
    # what moves PS: one entry per value of each swept hyperparameter
    assert [e["value"] for e in result["marginals"]["layer"]] == [0, 1]
    assert result["marginals"]["layer"][1]["PS"] == pytest.approx(
        np.mean([r["post"]["PS"] for r in rows if r["setting"]["layer"] == 1]))
    assert "S 95 %" in format_table(result) and "layer: 0: PS" in format_table(result)
    # paired differences from the reference: the setting of the file's hyperparameters (layer 1, KL 0.0625) and --set
    assert result["reference"] == {"layer": 1, "kl_factor": 0.0625}
    ref = next(r for r in rows if r["setting"] == result["reference"])
    assert ref["vs_reference"]["S"] == [0.0, 0.0, 0.0]
    assert row["vs_reference"]["PS"][0] == pytest.approx(row["post"]["PS"] - ref["post"]["PS"])
    # an earlier result supplies the settings it holds: nothing is edited again
    monkeypatch.setattr(tune_module, "evaluate_cases", _no_edits)
    again = tune(lm, cases, {"layer": [1, 0]}, base={"v_lr": 0.4, "kl_factor": 1.0}, hparams_path=hp_file,
                 previous=result)
    assert [r["setting"] for r in again["settings"]] != [] and len(again["settings"]) == 2
    # other cases do not match an earlier result
    with pytest.raises(AssertionError, match="recomputed"):
        tune(lm, cases[:2], {"layer": [1]}, hparams_path=hp_file, previous=result)


def test_bad_settings_fail_before_any_edit(lm, hp_file, monkeypatch):
    monkeypatch.setattr(tune_module, "evaluate_cases", _no_edits)
    with pytest.raises(ValueError, match="v_num_grad_steps"):
        tune(lm, _cases(), {"v_num_grad_steps": [3, 0]}, hparams_path=hp_file)
    with pytest.raises(ValueError, match="out of range"):
        tune(lm, _cases(), {"layer": [1, 99]}, hparams_path=hp_file)
    with pytest.raises(ValueError, match="No cases"):
        tune(lm, [], {}, hparams_path=hp_file)


def test_marginals_average_the_rest_of_the_grid():
    rows = [{"setting": {"a": a, "b": b}, "post": {"ES": 1.0, "PS": a + b, "S": 0.5, "PM": 0.0}}
            for a in (0.0, 0.2) for b in (0.0, 0.4)]
    m = marginals(rows, {"a": [0.0, 0.2], "b": [0.0, 0.4], "c": [1]})
    assert set(m) == {"a", "b"} and m["a"][1]["PS"] == pytest.approx(0.4) and m["b"][0]["settings"] == 2


def test_cli_writes_resumes_and_refuses(lm, tokenizer, hp_file, tmp_path, capsys):
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(_cases()))
    out = tmp_path / "tune.json"
    base = ["--cases", str(cases), "--model", str(folder), "--hparams", hp_file, "--limit", "2", "--quiet"]
    assert main([*base, "--grid", "layer=0,1", "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["format"] == tune_module.FORMAT and len(first["settings"]) == 2
    assert "setting" in capsys.readouterr().out
    # extending the grid keeps the two settings already scored and adds one
    assert main([*base, "--grid", "layer=0,1,2", "--json", str(out)]) == 0
    second = json.loads(out.read_text())
    assert len(second["settings"]) == 3
    kept = {json.dumps(r["hparams"], sort_keys=True): r["post"] for r in first["settings"]}
    assert all(kept[json.dumps(r["hparams"], sort_keys=True)] == r["post"]
               for r in second["settings"] if json.dumps(r["hparams"], sort_keys=True) in kept)
    # refusals: a bad grid, a results file of other cases, a file that is not a tuning result
    assert main([*base, "--grid", "layerz=1"]) == 2
    assert main([*base[:-3], "--limit", "1", "--quiet", "--grid", "layer=0", "--json", str(out)]) == 2
    (tmp_path / "other.json").write_text("{}")
    assert main([*base, "--grid", "layer=0", "--json", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "Unknown ROME hyperparameter" in err and "other weights or cases" in err and "not a tuning result" in err

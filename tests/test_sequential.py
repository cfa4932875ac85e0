"""Sequential editing on tiny random models of every family: the projection, the editor, the health check, the CLI.

Oracles: with the projection, the keys of earlier edits map to exactly the
outputs they had before a later edit (without it they move); the editor's
undo and reset give back the earlier weights bit for bit, also after a
computation stopped from ``progress``; the health check leaves the weights
alone and warns about a weight that moved by more than its threshold; the
evaluation command writes batches and sequences with their checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny
from editing_fixtures import TINY_STATS, changed, private_cache, snapshot
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module

from editing import EditRequest, applied
from editing.deltas import WeightDelta
from editing.edit import Edit
from editing.methods import compute_batch
from editing.methods.memit import request_keys
from editing.sequential import MAX_RELATIVE_NORM, Health, SequentialEditor, health
from tracing.hooks import active_hook_count
from test_memit import REQUESTS, TINY_MEMIT

FAMILIES = sorted(TINY_CONFIGS)
MORE = (
    EditRequest("Toyota", "{} is headquartered in the country of", "Brazil", "Japan"),
    EditRequest("The Louvre", "{} is located in the city of", "London", "Paris"),
)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with private_cache(tmp_path_factory.mktemp("sequential-cache")) as path:
        yield path


def _outputs(lm, keys: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """W k (no bias) of each layer's down-projection for the keys (n, d_in) of that layer, float64."""
    out = {}
    for layer, k in keys.items():
        w = lm.down_proj(layer).weight.detach().double()
        out[layer] = k @ w if lm.spec.conv1d else k @ w.T  # (n, d_out)
    return out


def _moved(before: dict, after: dict) -> float:
    """The largest change of any output, relative to the largest output."""
    return max(float((after[j] - before[j]).abs().max() / before[j].abs().max()) for j in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_the_projection_earlier_edits_keys_keep_their_outputs(tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    saved = snapshot(lm.model)
    first = compute_batch(lm, REQUESTS[:2], hparams=TINY_MEMIT, stats_spec=TINY_STATS)
    with applied(lm, [first]):
        keys = request_keys(lm, REQUESTS[:2], TINY_MEMIT.layers, TINY_MEMIT)
        kept = _outputs(lm, keys)
    projected = compute_batch(lm, REQUESTS[2:], hparams=TINY_MEMIT, stats_spec=TINY_STATS, previous=[first],
                              project=True)
    plain = compute_batch(lm, REQUESTS[2:], hparams=TINY_MEMIT, stats_spec=TINY_STATS, previous=[first])
    assert changed(lm.model, saved) == []
    with applied(lm, [first, projected]):
        assert _moved(kept, _outputs(lm, keys)) < 1e-5, family
    with applied(lm, [first, plain]):
        assert _moved(kept, _outputs(lm, keys)) > 1e-3, family
    assert projected.info["residual_left"] < 0.9  # it still writes most of its target
    assert projected.info["projected"] and projected.info["kept_requests"] == 2
    assert all(entry["allowed_dims"] == lm.down_proj(1).weight.numel() // lm.config.hidden_size - 2
               for entry in projected.info["per_layer"])


def test_the_null_space_threshold_confines_updates_to_directions_the_statistics_hardly_use(tokenizer, device):
    from dataclasses import replace

    from editing.methods.updates import nullspace_basis
    from editing.stats import ensure_stats

    lm = make_tiny("llama", tokenizer, device)
    hp = replace(TINY_MEMIT, nullspace_threshold=0.5)
    edit = compute_batch(lm, REQUESTS[:1], hparams=hp, stats_spec=TINY_STATS, project=True)
    for change in edit.deltas:
        null = nullspace_basis(ensure_stats(lm, [change.layer], TINY_STATS)[change.layer], 0.5).numpy()
        assert 0 < null.shape[1] < null.shape[0]
        rows = change.basis.astype(np.float64)  # (n, d_in): every direction lies in the null space
        np.testing.assert_allclose(rows @ null @ null.T, rows, atol=1e-6 * np.abs(rows).max())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_the_editor_adds_undoes_and_resets_bit_for_bit(tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    saved = snapshot(lm.model)
    states = []
    with SequentialEditor(lm, project=True, hparams=TINY_MEMIT, stats_spec=TINY_STATS) as editor:
        first = editor.add(REQUESTS[0])
        states.append(snapshot(lm.model))
        keys = request_keys(lm, [REQUESTS[0]], TINY_MEMIT.layers, TINY_MEMIT)
        kept = _outputs(lm, keys)
        batch = editor.add(list(REQUESTS[1:]))
        states.append(snapshot(lm.model))
        assert _moved(kept, _outputs(lm, keys)) < 1e-5
        all_keys = request_keys(lm, REQUESTS, TINY_MEMIT.layers, TINY_MEMIT)  # every earlier key, as it is now
        all_kept = _outputs(lm, all_keys)
        editor.add(MORE[0])
        assert _moved(all_kept, _outputs(lm, all_keys)) < 1e-5
        # The first edit's keys of two edits ago: the second edit's update at layer 1 moved the key of layer 2 a little.
        assert _moved(kept, _outputs(lm, keys)) < 2e-2
        assert editor.requests == (*REQUESTS, MORE[0]) and len(editor) == 3

        class Stop(Exception):
            pass

        def stop(stage, fraction):
            if stage == "optimising":
                raise Stop

        with pytest.raises(Stop):
            editor.add(MORE[1], progress=stop)
        assert len(editor) == 3
        editor.undo()
        assert changed(lm.model, states[1]) == []
        assert editor.undo() is batch  # the batch goes in one step
        assert changed(lm.model, states[0]) == [] and editor.edits == (first,)
        report = editor.health(max_new_tokens=4)
        assert report.layers == TINY_MEMIT.layers and len(report.relative_norms) == 2
        assert changed(lm.model, states[0]) == []
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    with pytest.raises(ValueError, match="projection is MEMIT's"):
        SequentialEditor(lm, method="rome", project=True)


def test_the_editor_writes_single_facts_with_other_methods(tokenizer, device):
    from editing_fixtures import TINY_HPARAMS

    lm = make_tiny("llama", tokenizer, device)
    saved = snapshot(lm.model)
    with SequentialEditor(lm, method="rome", hparams=TINY_HPARAMS, stats_spec=TINY_STATS) as editor:
        editor.add(REQUESTS[0])
        editor.add(REQUESTS[1])
        assert [e.method for e in editor.edits] == ["rome", "rome"]
        with pytest.raises(ValueError, match="one fact per edit"):
            editor.add(list(MORE))
    assert changed(lm.model, saved) == []


def test_health_measures_without_touching_the_weights_and_warns_about_large_changes(tokenizer, device):
    lm = make_tiny("qwen2", tokenizer, device)
    saved = snapshot(lm.model)
    clean = health(lm, [], max_new_tokens=4)
    assert isinstance(clean, Health) and clean.ok and clean.layers == () and clean.entropy == clean.entropy_before
    assert clean.fact_share == pytest.approx(1.0) and len(clean.facts) == 6
    weight = lm.down_proj(2).weight
    big = WeightDelta(lm.module_name("down_proj", 2), 2,
                      (2 * MAX_RELATIVE_NORM * weight.detach().float()).cpu().numpy())  # W moves by 2x the threshold
    edit = Edit(request=EditRequest("The capital of France", "{} is", "Rome", "Paris"), layer=2,
                module=big.module, method="ft", variant="", deltas=(big,), fingerprint=lm.fingerprint)
    report = health(lm, [edit], reference=clean, max_new_tokens=4)
    assert changed(lm.model, saved) == []
    assert report.layers == (2,) and report.relative_norms[0] == pytest.approx(2 * MAX_RELATIVE_NORM, rel=1e-4)
    assert any("layer 2's MLP weights by 50%" in w for w in report.warnings)
    assert all("France" not in prompt for prompt, _ in report.facts)  # a fact about an edited subject is left out
    json.dumps(report.to_dict())
    with applied(lm, [edit]):
        inside = health(lm, [edit], already_applied=True, reference=clean, max_new_tokens=4)
    assert inside.relative_norms == report.relative_norms and inside.entropy == report.entropy
    assert changed(lm.model, saved) == []


def test_evaluate_writes_batches_and_sequences_with_checkpoints(tokenizer, tmp_path, capsys):
    from editing.evaluate import main as evaluate_main

    lm = make_tiny("llama", tokenizer, "cpu")
    model_dir = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    records = []
    for r, other in zip([*REQUESTS, MORE[0]], ["The Louvre", "Paris", "Lyon", "Kyoto"]):
        records.append({"requested_rewrite": {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target},
                                              "target_true": {"str": r.target_true}},
                        "paraphrase_prompts": [f"{r.subject} is"],
                        "neighborhood_prompts": [f"{other} is", f"{REQUESTS[0].subject} is in"],
                        "generation_prompts": [f"{r.subject} is"]})
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(records))
    tiny = ["--set", "layers=[1,2]", "--set", "context_templates=[[3,2]]", "--set", "stats_tokens=512",
            "--set", "stats_sample_length=32", "--set", "mom2_update_weight=50", "--set", "v_num_grad_steps=3"]
    base = ["--model", str(model_dir), "--device", "cpu", "--threads", "1", "--cases", str(cases)]
    common = [*base, "--method", "memit", "--generation-tokens", "3", *tiny]
    out = tmp_path / "sequential.json"
    assert evaluate_main([*common, "--batch", "3", "--sequential", "--project", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "one after another, projected" in printed
    result = json.loads(out.read_text())
    assert (result["method"], result["batch"], result["sequential"], result["project"]) == ("memit", 3, True, True)
    assert [p["facts"] for p in result["checkpoints"]] == [3, 4] and result["edits"] == 2
    assert set(result["checkpoints"][-1]) >= {"ES", "PS", "NS", "S", "fluency", "health"}
    assert len(result["per_case"]) == 4 and set(result["post"]) >= {"ES", "PS", "NS", "S", "fluency"}
    # a neighbour naming a subject of the run is left out, the other kept
    assert result["neighbours_left_out"] == 4 and result["neighbours_kept"] == 4
    alone = tmp_path / "alone.json"
    assert evaluate_main([*common, "--batch", "2", "--json", str(alone), "--quiet"]) == 0
    result = json.loads(alone.read_text())
    assert result["batch"] == 2 and not result["sequential"] and "checkpoints" not in result and result["edits"] == 2
    for bad in (["--method", "rome", "--batch", "2"], ["--method", "kn", "--project"]):
        with pytest.raises(SystemExit):
            evaluate_main([*base, *bad])

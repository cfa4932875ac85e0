"""What keeps a shared model safe from edits: caches see only the original weights, files are checked
before they are read, foreign edits are refused, and the shared edit-and-compare function restores the model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import make_tiny
from editing import (EditRequest, EditStack, applied, check_edits, compute_edit, edit_and_compare, generate,
                     is_edited, load_edits, original_weights, save_edits, score_edit)
from editing.stats import ensure_stats
from editing.templates import _MEMORY, context_templates
from editing_fixtures import TINY_HPARAMS, TINY_STATS, changed, private_cache, snapshot

REQUEST = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris")


@pytest.fixture(scope="module")
def lm_edit(tmp_path_factory, tokenizer, device):
    with private_cache(tmp_path_factory.mktemp("safety-cache")):
        lm = make_tiny("llama", tokenizer, device)
        yield lm, compute_edit(lm, REQUEST, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)


def test_original_weights_inside_applied_and_stacks(lm_edit):
    lm, edit = lm_edit
    saved = snapshot(lm.model)
    assert not is_edited(lm)
    with applied(lm, [edit]):
        assert is_edited(lm) and changed(lm.model, saved)
        edited = snapshot(lm.model)
        with original_weights(lm):
            assert changed(lm.model, saved) == []
        assert changed(lm.model, edited) == []
        with pytest.raises(RuntimeError):
            with original_weights(lm):
                raise RuntimeError("inside")
        assert changed(lm.model, edited) == []
        with applied(lm, [edit]):  # nested: the outermost original is the one restored inside
            with original_weights(lm):
                assert changed(lm.model, saved) == []
    assert not is_edited(lm) and changed(lm.model, saved) == []
    with EditStack(lm) as stack:
        stack.push(edit)
        with original_weights(lm):
            assert changed(lm.model, saved) == []
        stack.undo()
        assert not is_edited(lm)  # undoing the last edit leaves an unedited model, not one that says it is edited
        stack.push(edit)
        stack.push(edit)
        stack.undo()
        assert is_edited(lm)
    assert not is_edited(lm) and changed(lm.model, saved) == []


def test_caches_filled_while_an_edit_is_applied_describe_the_original_model(tmp_path, tokenizer, device):
    """Context templates and key statistics computed on a cold cache inside applied() equal the unedited ones."""
    lm = make_tiny("llama", tokenizer, device)
    with private_cache(tmp_path / "a"):
        edit = compute_edit(lm, REQUEST, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    lengths = ((3, 3),)
    with private_cache(tmp_path / "b"):
        _MEMORY.clear()
        plain_templates = context_templates(lm, lengths, seed=7)
        plain_stats = ensure_stats(lm, [2], TINY_STATS)[2].mom2
    with private_cache(tmp_path / "c"):
        _MEMORY.clear()
        with applied(lm, [edit]):
            assert context_templates(lm, lengths, seed=7) == plain_templates
            np.testing.assert_array_equal(ensure_stats(lm, [2], TINY_STATS)[2].mom2, plain_stats)
    _MEMORY.clear()


def test_check_edits_refuses_another_models_edit_with_the_same_shapes(lm_edit, tokenizer, device):
    lm, edit = lm_edit
    check_edits(lm, [edit])
    twin = make_tiny("llama", tokenizer, device, seed=1)  # same shapes, other weights
    saved = snapshot(twin.model)
    with pytest.raises(ValueError, match="was made for tiny-llama .*compute it again"):
        check_edits(twin, [edit])
    check_edits(twin, [edit], same_model=False)  # shapes fit
    assert changed(twin.model, saved) == []


def test_load_edits_checks_size_count_and_shapes_before_reading(lm_edit, tmp_path):
    lm, edit = lm_edit
    path = save_edits([edit, edit, edit], tmp_path / "three.safetensors")
    assert len(load_edits(path)) == 3
    with pytest.raises(ValueError, match="accepted up to 100 bytes"):
        load_edits(path, max_bytes=100)
    with pytest.raises(ValueError, match="holds 3 edits; at most 2"):
        load_edits(path, max_edits=2)
    header = {"format": "locate-edit/rome-edits", "version": "1", "edits": json.dumps([edit.metadata()])}
    vectors = {f"edit0.{n}": getattr(edit, n) for n in ("u", "v", "key", "value")}
    matrix = tmp_path / "matrix.safetensors"
    save_file({**vectors, "edit0.u": np.ones((4, 4), np.float32)}, str(matrix), metadata=header)
    with pytest.raises(ValueError, match="edit vectors are 1-D"):
        load_edits(matrix)
    liar = tmp_path / "liar.safetensors"  # a header length larger than the file
    liar.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header is longer than the file"):
        load_edits(liar)
    bad_request = tmp_path / "request.safetensors"
    meta = {**edit.metadata(), "request": {**edit.request.to_dict(), "prompt": "no placeholder"}}
    save_file(vectors, str(bad_request), metadata={**header, "edits": json.dumps([meta])})
    with pytest.raises(ValueError, match="placeholder"):
        load_edits(bad_request)


def test_edit_and_compare_matches_its_parts_and_restores_the_model(lm_edit):
    lm, edit = lm_edit
    saved = snapshot(lm.model)
    seen = []
    result = edit_and_compare(lm, REQUEST, hparams=TINY_HPARAMS, stats_spec=TINY_STATS,
                              paraphrases=["{} can be found in"], neighbours=["The Louvre is located in the city of"],
                              max_new_tokens=4, on_before=seen.append)
    assert changed(lm.model, saved) == []
    assert [k for k, _ in result.prompts] == ["rewrite", "paraphrase", "neighbour"]
    assert result.generated == tuple(text for _, text in result.prompts)
    assert len(seen) == 1 and seen[0].after is None and seen[0].before == result.before
    np.testing.assert_allclose(result.edit.u, edit.u, rtol=1e-5, atol=1e-6)
    assert result.before == tuple(generate(lm, list(result.generated), 4))
    with applied(lm, [result.edit]):
        assert result.after == tuple(generate(lm, list(result.generated), 4))
        after = score_edit(lm, REQUEST, ["{} can be found in"], ["The Louvre is located in the city of"])
    np.testing.assert_allclose(after.logp_new, result.scores_after.logp_new)
    rows = result.to_dict()["rows"]
    assert rows[0]["before"] == result.before[0] and rows[0]["p_new_after"] == pytest.approx(after.prob_new[0])


def test_edit_and_compare_remembers_only_without_earlier_edits(lm_edit):
    lm, edit = lm_edit
    memory = {}

    def memo(key, compute):
        if key not in memory:
            memory[key] = compute()
        return memory[key]

    kwargs = dict(hparams=TINY_HPARAMS, stats_spec=TINY_STATS, max_new_tokens=3, memo=memo)
    first = edit_and_compare(lm, REQUEST, **kwargs)
    keys = set(memory)
    again = edit_and_compare(lm, REQUEST, **kwargs)
    assert again.edit is first.edit and set(memory) == keys
    edit_and_compare(lm, REQUEST, previous=[edit], **kwargs)
    assert set(memory) == keys  # results on top of a visitor's edits are never remembered


def test_a_stop_raised_from_progress_restores_every_weight(lm_edit):
    lm, edit = lm_edit
    saved = snapshot(lm.model)

    class Stop(Exception):
        pass

    for stage in ("before", "optimising", "after"):
        def progress(name, fraction, stage=stage):
            if name == stage:
                raise Stop(stage)

        with pytest.raises(Stop):
            edit_and_compare(lm, EditRequest("Michael Jordan", "{} plays the sport of", "golf", "basketball"),
                             hparams=TINY_HPARAMS, stats_spec=TINY_STATS, max_new_tokens=3, previous=[edit],
                             progress=progress)
        assert changed(lm.model, saved) == [] and not is_edited(lm)

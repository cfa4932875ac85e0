"""The ROME engine on tiny random models of every supported family (seconds), plus files, scores and errors.

Oracles: the update has rank one and the edited layer maps k* to v*; the
suffix-only runner reproduces the full forward pass; statistics accumulated
while sampling equal those recomputed from the cached corpus; every weight is
bitwise the original after ``applied`` (also on exceptions), undo and reset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny
from editing_fixtures import TINY_HPARAMS, TINY_STATS, changed, private_cache, snapshot
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module

from editing import (
    Edit,
    EditRequest,
    EditScores,
    EditStack,
    ROMEHyperParams,
    applied,
    compute_edit,
    generate,
    load_edits,
    model_answer,
    load_hparams,
    save_edits,
    score_edit,
)
from editing.evaluate import format_table
from editing.evaluation.evaluate import answered_paraphrases, evaluate_cases, read_cases
from editing.applying import edits_on
from editing.hparams import hparams_files
from editing.methods.common import SuffixRunner, build_rows
from editing.scores import (accuracy_scores, continuation_logprobs, continuation_predictions, harmonic_mean,
                            ngram_entropy, token_accuracy, token_predictions)
from editing.stats import StatsSpec, ensure_stats, key_stats, stats_dir, stats_path
from editing.templates import context_templates
from tracing.hooks import active_hook_count

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = sorted(TINY_CONFIGS)
REQ1 = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", target_true="Paris")
REQ2 = EditRequest("Michael Jordan", "{} professionally plays the sport of", "baseball", target_true="basketball")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer):
    # The tokenizer fixture runs first, so the converted default model stays in the real cache.
    with private_cache(tmp_path_factory.mktemp("le-cache")) as path:
        yield path


@pytest.fixture(scope="module")
def edits_of(cache, tokenizer, device):
    """family -> (tiny model, edit 1, edit 2), computed once per module."""
    made = {}

    def get(family: str):
        if family not in made:
            lm = make_tiny(family, tokenizer, device)
            first = compute_edit(lm, REQ1, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
            second = compute_edit(lm, REQ2, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
            made[family] = (lm, first, second)
        return made[family]

    return get


def _weight(lm, layer):
    return lm.down_proj(layer).weight


# ---------------------------------------------------------------------------
# The method's algebra, on every architecture


@pytest.mark.parametrize("family", FAMILIES)
def test_update_is_rank_one_and_maps_key_to_value(edits_of, family):
    lm, edit, _ = edits_of(family)
    weight = _weight(lm, edit.layer)
    before = weight.detach().double().clone()
    module = lm.down_proj(edit.layer)
    key = torch.from_numpy(edit.key).to(weight.device, weight.dtype)
    with torch.no_grad():
        out_before = module(key[None])[0].double()
    with applied(lm, [edit]):
        diff = weight.detach().double() - before
        with torch.no_grad():
            out_after = module(key[None])[0].double()
    singular = torch.linalg.svdvals(diff)
    assert singular[0] > 0 and singular[1] / singular[0] < 1e-5  # rank one
    expected = edit.update(conv1d=lm.spec.conv1d).double().to(diff.device)
    assert torch.allclose(diff, expected, atol=1e-5 * float(expected.abs().max()))
    value = torch.from_numpy(edit.value).double().to(out_after.device)
    assert (out_after - value).norm() <= 1e-3 * value.norm()  # W' k* + b = v*
    assert float((out_before - value).norm()) == pytest.approx(edit.info["delta_norm"], rel=1e-3)
    assert edit.norm == pytest.approx(float(singular[0]), rel=1e-4)
    assert lm.spec.conv1d == (family == "gpt2")  # both weight orientations are covered


@pytest.mark.parametrize("variant", ["original", "exact"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bare_prompt_variants_map_the_bare_prompts_key(edits_of, family, variant):
    lm, _, _ = edits_of(family)
    hp = ROMEHyperParams(**{**TINY_HPARAMS.to_dict(), "variant": variant})
    edit = compute_edit(lm, REQ1, hparams=hp, stats_spec=TINY_STATS)
    rows = build_rows(lm, REQ1, ["{}"], hp.kl_prompt)
    captured = []
    from tracing.hooks import Hook, hooks

    def grab(module, args, output):
        captured.append(args[0][0, rows.lookups[0]].detach().clone())

    with torch.no_grad(), hooks(lm.model, Hook(lm.module_name("down_proj", edit.layer), grab)):
        lm.model(torch.tensor([rows.ids[0]], device=lm.device))
    assert np.allclose(captured[0].cpu().numpy(), edit.key, atol=1e-5)  # the bare prompt's key
    module = lm.down_proj(edit.layer)
    with applied(lm, [edit]), torch.no_grad():
        out = module(torch.from_numpy(edit.key)[None].to(lm.device))[0]
    assert np.allclose(out.cpu().numpy(), edit.value, atol=1e-3 * np.linalg.norm(edit.value))
    assert edit.info["bare_scale"] == pytest.approx(1.0) and edit.variant == variant


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_runner_reproduces_the_full_forward_pass(cache, tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 5, 6, 7, 8, 9, 10, 4], [3, 4], [7, 8, 9, 10, 11]]
    for lookups, layer in (([2, 5, 1, 0], 1), ([0, 0, 0, 0], 3), ([3, 6, 1, 2], 0)):
        runner = SuffixRunner(lm, rows, lookups, layer)
        hidden = runner.run()
        for r, (row, lk) in enumerate(zip(rows, lookups)):
            with torch.no_grad():
                full = lm.model(torch.tensor([row], device=device)).logits[0, lk:]
            n = len(row) - lk
            got = runner.logits(hidden, torch.full((n,), r, device=device), torch.arange(n, device=device))
            assert torch.allclose(got, full.float(), atol=1e-4), (family, lookups, layer, r)
    assert active_hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_compute_edit_never_modifies_the_model(cache, tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    saved = snapshot(lm.model)
    calls = []
    edit = compute_edit(lm, REQ1, hparams=TINY_HPARAMS, stats_spec=TINY_STATS,
                        progress=lambda stage, fraction: calls.append((stage, fraction)))
    assert changed(lm.model, saved) == []
    assert active_hook_count(lm.model) == 0
    stages = [s for s, _ in calls]
    assert stages[0] == "templates" and "optimising" in stages and stages[-1] == "update"
    assert all(0.0 <= f <= 1.0 for _, f in calls)
    assert edit.request.target_true == "Paris" and edit.layer == 1
    assert set(edit.timings) == {"templates", "statistics", "keys", "optimise", "update", "other"}  # no "answer":
    # the request had its old object
    assert edit.seconds == pytest.approx(sum(edit.timings.values())) and edit.timings["other"] < 0.5 * edit.seconds
    assert edit.info["steps"] >= 1 and np.isfinite(edit.norm)


def test_missing_old_object_is_filled_from_the_models_answer(edits_of):
    lm, _, _ = edits_of("llama")
    edit = compute_edit(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"),
                        hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    answer = edit.request.target_true
    assert answer and answer == model_answer(lm, REQ1.text)
    assert generate(lm, [REQ1.text], 6)[0].strip().startswith(answer)


# ---------------------------------------------------------------------------
# Reversibility


@pytest.mark.parametrize("family", FAMILIES)
def test_applied_restores_every_weight_bitwise(edits_of, family):
    lm, first, second = edits_of(family)
    saved = snapshot(lm.model)
    with applied(lm, [first, second]):
        assert changed(lm.model, saved) == [f"{lm.module_name('down_proj', first.layer)}.weight"]
    assert changed(lm.model, saved) == []
    with pytest.raises(RuntimeError, match="boom"):
        with applied(lm, [first, second]):
            raise RuntimeError("boom")
    assert changed(lm.model, saved) == []
    with applied(lm, first):  # a single edit works too
        with applied(lm, [second]):  # nested: the inner exit restores the outer state
            pass
        assert changed(lm.model, saved) != []
    assert changed(lm.model, saved) == []


def test_applied_does_not_apply_again_what_an_outer_context_applied(edits_of):
    lm, first, second = edits_of("llama")
    saved = snapshot(lm.model)
    with applied(lm, [first, second]):
        both = snapshot(lm.model)
    with applied(lm, [first]):  # e.g. the page's engine applying a visitor's edits
        assert edits_on(lm) == (first,)
        with applied(lm, [first, second]):  # a library call "on top of previous": only `second` is added
            assert edits_on(lm) == (first, second) and changed(lm.model, both) == []
        assert edits_on(lm) == (first,)
        with applied(lm, [second, first]):  # not the model's edits as a prefix: everything is applied
            assert edits_on(lm) == (first, second, first)
    assert edits_on(lm) == () and changed(lm.model, saved) == []
    stack = EditStack(lm)
    stack.push(first)
    with applied(lm, [first, second]):
        assert changed(lm.model, both) == []
    stack.reset()
    assert edits_on(lm) == () and changed(lm.model, saved) == []


def test_applied_checks_every_edit_before_touching_weights(edits_of):
    lm, first, _ = edits_of("llama")
    gpt2, other, _ = edits_of("gpt2")
    saved = snapshot(lm.model)
    with pytest.raises(ValueError, match="another"):
        with applied(lm, [first, other]):
            pass
    assert changed(lm.model, saved) == []
    far = Edit(**{**first.__dict__, "layer": lm.n_layers + 3})
    with pytest.raises(ValueError, match="layers 0 to"):
        with applied(lm, [far]):
            pass
    assert changed(lm.model, saved) == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_stack_undo_and_reset_are_exact(edits_of, family):
    lm, first, second = edits_of(family)
    saved = snapshot(lm.model)
    stack = EditStack(lm)
    with pytest.raises(LookupError):
        stack.undo()
    stack.push(first)
    after_first = snapshot(lm.model)
    stack.push(second)
    assert stack.edits == (first, second) and len(stack) == 2
    assert changed(lm.model, after_first) != []
    assert stack.undo() is second
    assert changed(lm.model, after_first) == []
    stack.push(second)
    stack.reset()
    assert changed(lm.model, saved) == [] and stack.edits == ()
    with EditStack(lm) as scoped:
        scoped.push(first)
        scoped.push(second)
    assert changed(lm.model, saved) == []
    # Applying the stack's edits with `applied` gives the same bytes as the stack.
    stack.push(first)
    stack.push(second)
    stacked = snapshot(lm.model)
    stack.reset()
    with applied(lm, [first, second]):
        assert changed(lm.model, stacked) == []


def test_sequential_edits_stay_bounded(cache, tokenizer, device):
    lm = make_tiny("llama", tokenizer, device, seed=3)
    saved = snapshot(lm.model)
    facts = [("The Eiffel Tower", "{} is located in the city of", "Rome"),
             ("Michael Jordan", "{} professionally plays the sport of", "baseball"),
             ("Danielle Darrieux", "The mother tongue of {} is", "English"),
             ("Toyota", "{} was founded in the country of", "Germany"),
             ("The Louvre", "{} is a museum in", "London"),
             ("Angela Merkel", "{} was the leader of", "Canada"),
             ("Mount Everest", "{} is the highest mountain of", "Africa"),
             ("Python", "{} was designed by", "Microsoft")]
    norms = []
    with EditStack(lm) as stack:
        for subject, prompt, target in facts:
            edit = compute_edit(lm, EditRequest(subject, prompt, target, "x"), hparams=TINY_HPARAMS,
                                stats_spec=TINY_STATS)
            stack.push(edit)
            norms.append(edit.norm)
        total = (_weight(lm, 1).detach().double() - saved[f"{lm.module_name('down_proj', 1)}.weight"].double()).norm()
    assert all(np.isfinite(norms))
    assert max(norms) <= 5 * np.median(norms), norms  # no edit blows up
    assert float(total) <= sum(norms) + 1e-6
    assert float(_weight(lm, 1).detach().abs().max()) < 1e3
    assert changed(lm.model, saved) == []


# ---------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_and_load_reproduce_the_same_weights(edits_of, family, tmp_path):
    lm, first, second = edits_of(family)
    path = save_edits([first, second], tmp_path / "edits.safetensors")
    loaded = load_edits(path)
    assert [e.request for e in loaded] == [first.request, second.request]
    for a, b in zip(loaded, [first, second]):
        assert a.layer == b.layer and a.module == b.module and a.variant == b.variant
        assert np.array_equal(a.u, b.u) and np.array_equal(a.v, b.v)
        assert np.array_equal(a.key, b.key) and np.array_equal(a.value, b.value)
        assert a.timings == b.timings and a.norm == b.norm
    with applied(lm, [first, second]):
        direct = snapshot(lm.model)
    with applied(lm, loaded):
        assert changed(lm.model, direct) == []
    assert load_edits(save_edits([], tmp_path / "none.safetensors")) == []
    # JSON form too
    again = Edit.from_dict(json.loads(json.dumps(first.to_dict())))
    assert np.array_equal(again.u, first.u) and again.request == first.request


def test_load_edits_rejects_corrupt_and_foreign_files(edits_of, tmp_path):
    from safetensors.numpy import save_file

    lm, first, _ = edits_of("llama")
    with pytest.raises(ValueError, match="does not exist"):
        load_edits(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="not a readable edits file"):
        load_edits(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        load_edits(empty)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros(3, dtype=np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a locate-edit edits file"):
        load_edits(foreign)
    good = save_edits([first], tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_edits(truncated)
    vectors = {f"edit0.{n}": getattr(first, n) for n in ("u", "v", "key", "value")}
    header = {"format": "locate-edit/rome-edits", "version": "1"}
    for name, meta, tensors, message in [
        ("badjson", {**header, "edits": "[{"}, vectors, "corrupt edits header"),
        ("missing", {**header, "edits": json.dumps([first.metadata()])}, {"edit0.u": first.u}, "missing tensor"),
        ("nan", {**header, "edits": json.dumps([first.metadata()])},
         {**vectors, "edit0.v": np.full_like(first.v, np.nan)}, "finite"),
        ("norequest", {**header, "edits": json.dumps([{**first.metadata(), "request": {}}])}, vectors, "subject"),
        ("version", {**header, "version": "99", "edits": "[]"}, vectors, "version"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match=message):
            load_edits(path)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "request_, message",
    [
        (EditRequest("The Eiffel Tower", "The Eiffel Tower is located in", "Rome"), r"Replace the subject"),
        (EditRequest("The Eiffel Tower", "is located in", "Rome"), r"no \{\} placeholder"),
        (EditRequest("The Eiffel Tower", "{} and {} are in", "Rome"), "exactly one"),
        (EditRequest("", "{} is located in", "Rome"), "subject is empty"),
        (EditRequest("  ", "{} is located in", "Rome"), "subject is empty"),
        (EditRequest("The Eiffel Tower", "{} is located in", ""), "target is empty"),
        (EditRequest("The Eiffel Tower", "{} is located in", "   "), "target is empty"),
        (EditRequest("The Eiffel Tower", "{}", "Rome"), "only a placeholder"),
        (EditRequest("The Eiffel Tower", "{} is located in", "Paris", "paris"), "same as the old"),
    ],
)
def test_bad_requests_fail_clearly_before_any_work(edits_of, request_, message):
    lm, _, _ = edits_of("llama")
    saved = snapshot(lm.model)
    with pytest.raises(ValueError, match=message):
        compute_edit(lm, request_, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    assert changed(lm.model, saved) == []


@pytest.mark.parametrize("layer", [-1, 4, 100, 1.5, "2"])
def test_layer_out_of_range_fails_clearly(edits_of, layer):
    lm, _, _ = edits_of("llama")
    with pytest.raises(ValueError, match="layer|Layer"):
        compute_edit(lm, REQ1, layer=layer, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    with pytest.raises(ValueError, match="out of range"):
        ROMEHyperParams(layer=50).edit_layer(4)


def test_prompt_longer_than_the_model_takes_fails_clearly(edits_of):
    lm, _, _ = edits_of("llama")
    long_prompt = "{} " + "is really " * 200 + "located in"
    with pytest.raises(ValueError, match="at most|longer"):
        compute_edit(lm, EditRequest("The Eiffel Tower", long_prompt, "Rome"), hparams=TINY_HPARAMS,
                     stats_spec=TINY_STATS)


# ---------------------------------------------------------------------------
# Hyperparameters


def test_every_shipped_hparams_file_loads_and_matches_its_models():
    for path in hparams_files():
        data = json.loads(path.read_text())
        hp = load_hparams(path=path)
        for name in data.get("match", []):
            assert load_hparams(name).layer == hp.layer, (path.name, name)
    assert load_hparams("gpt2-xl").layer == 17
    assert load_hparams("openai-community/gpt2-medium").layer == 8
    assert load_hparams("EleutherAI/gpt-j-6B").layer == 5
    assert load_hparams("gpt2-large").edit_layer(36) == 12
    fallback = load_hparams("some/unknown-model")
    assert fallback.layer is None and fallback.edit_layer(24) == 8 and fallback.edit_layer(48) == 16
    assert fallback.v_num_grad_steps == 20 and fallback.v_lr == 0.5 and fallback.kl_factor == 0.0625
    assert fallback.context_templates == ((5, 10), (10, 10)) and fallback.clamp_norm_factor == 4.0


def test_hparams_reject_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="Unknown ROME hyperparameter.*v_lrr"):
        load_hparams("gpt2-xl", v_lrr=0.1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": 3, "learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        load_hparams(path=bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hparams(path=bad)
    with pytest.raises(ValueError, match="variant"):
        ROMEHyperParams(variant="memit")
    with pytest.raises(ValueError, match="kl_prompt"):
        ROMEHyperParams(kl_prompt="is a")
    hp = load_hparams("gpt2-xl", context_templates=[[4, 2]], variant="original")
    assert hp.context_templates == ((4, 2),) and hp.variant == "original"
    assert ROMEHyperParams.from_dict(hp.to_dict()) == hp


# ---------------------------------------------------------------------------
# Key statistics


def test_statistics_are_cached_and_agree_between_sampling_and_recomputation(cache, tokenizer, device):
    lm = make_tiny("llama", tokenizer, device, seed=5)
    spec = StatsSpec(n_tokens=300, sample_length=20, batch_rows=8, seed=7)
    sampled = key_stats(lm, 1, spec)  # sampled, keys accumulated on the fly
    assert sampled.count == 15 * 20 and sampled.mom2.dtype == np.float64
    assert np.allclose(sampled.mom2, sampled.mom2.T)
    assert np.linalg.eigvalsh(sampled.mom2).min() > -1e-9
    assert (stats_dir(lm, spec) / "corpus.safetensors").is_file()
    again = key_stats(lm, 1, spec)
    assert np.array_equal(again.mom2, sampled.mom2)
    more = ensure_stats(lm, [0, 2], spec)  # from the cached corpus, one prefill pass
    assert set(more) == {0, 2} and more[0].count == sampled.count
    stats_path(lm, 1, spec).unlink()
    recomputed = key_stats(lm, 1, spec)  # now by prefill too: must equal the on-the-fly sums
    assert np.allclose(recomputed.mom2, sampled.mom2, rtol=1e-4, atol=1e-6 * np.abs(sampled.mom2).max())
    assert not [p for p in stats_dir(lm, spec).iterdir() if p.name.endswith(".tmp")]
    k = torch.randn(sampled.mom2.shape[0], dtype=torch.float64)
    assert torch.allclose(torch.from_numpy(sampled.mom2) @ sampled.solve(k), k, atol=1e-6 * float(k.norm()) * 1e3)


def test_interrupted_sampling_resumes_to_the_same_statistics(cache, tokenizer, device, tmp_path, monkeypatch):
    import editing.stats as stats_module

    monkeypatch.setattr(stats_module, "CHUNK_ROWS", 50)  # flush inside the decoding loop as a long run does
    lm = make_tiny("gpt2", tokenizer, device, seed=6)
    spec = StatsSpec(n_tokens=400, sample_length=20, batch_rows=5, seed=11)  # 4 batches of 5 documents

    def interrupt(stage, fraction):
        if fraction > 0.6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        key_stats(lm, 1, spec, progress=interrupt)
    folder = stats_dir(lm, spec)
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.partial.safetensors"]  # no stats, no temp files
    resumed = key_stats(lm, 1, spec)
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.safetensors", "layer1.safetensors"]
    with private_cache(tmp_path / "fresh"):
        fresh = key_stats(lm, 1, spec)
        fresh_ids = stats_module._load_corpus(stats_dir(lm, spec) / "corpus.safetensors")
    assert np.array_equal(stats_module._load_corpus(folder / "corpus.safetensors"), fresh_ids)
    assert resumed.count == fresh.count == 400
    assert np.allclose(resumed.mom2, fresh.mom2, rtol=1e-4, atol=1e-6 * np.abs(fresh.mom2).max())


def test_a_shipped_corpus_replaces_sampling_on_a_fresh_machine(cache, tokenizer, device, tmp_path, monkeypatch):
    import editing.stats as stats_module

    lm = make_tiny("qwen2", tokenizer, device, seed=8)
    spec = StatsSpec(n_tokens=200, sample_length=20, batch_rows=10, seed=3)
    sampled = key_stats(lm, 1, spec)
    monkeypatch.setattr(stats_module, "SHIPPED", tmp_path / "assets-stats")
    shipped = stats_module.shipped_corpus_path(lm, spec)
    shipped.parent.mkdir(parents=True)
    shutil.copyfile(stats_dir(lm, spec) / "corpus.safetensors", shipped)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the corpus ships")

    monkeypatch.setattr(stats_module, "_sample_corpus", no_sampling)
    with private_cache(tmp_path / "fresh"):  # a machine that never ran this model
        fresh = key_stats(lm, 1, spec)
        assert (stats_dir(lm, spec) / "corpus.safetensors").is_file()  # cached for the next layers
    assert fresh.count == sampled.count
    assert np.allclose(fresh.mom2, sampled.mom2, rtol=1e-4, atol=1e-6 * np.abs(sampled.mom2).max())


def test_statistics_from_a_text_file(cache, tokenizer, device, tmp_path):
    lm = make_tiny("gpt2", tokenizer, device)
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    spec = StatsSpec(corpus=f"file:{text}", n_tokens=200, sample_length=16)
    stats = key_stats(lm, 2, spec)
    assert stats.count == 13 * 16 and stats.corpus.startswith("file:")
    with pytest.raises(ValueError, match="Unknown statistics corpus"):
        StatsSpec(corpus="wikipedia")
    with pytest.raises(ValueError, match="Cannot read"):
        key_stats(lm, 2, StatsSpec(corpus=f"file:{tmp_path / 'nope.txt'}"))
    with pytest.raises(ValueError, match="out of range"):
        key_stats(lm, 9, spec)


def test_context_templates_are_cached_and_well_formed(cache, tokenizer, device):
    lm = make_tiny("llama", tokenizer, device)
    templates = context_templates(lm, ((3, 4), (6, 2)), top_k=5, seed=1)
    assert len(templates) == 7 and templates[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{") == 1 for t in templates[1:])
    assert context_templates(lm, ((3, 4), (6, 2)), top_k=5, seed=1) == templates


# ---------------------------------------------------------------------------
# Generation and scores


def test_generate_is_batched_exactly_and_seeded(edits_of):
    lm, _, _ = edits_of("llama")
    prompts = ["The Eiffel Tower is located in the city of", "Hi", "Michael Jordan plays"]
    batch = generate(lm, prompts, max_new_tokens=6)
    assert batch == [generate(lm, [p], max_new_tokens=6)[0] for p in prompts]
    assert all(isinstance(t, str) and not t.startswith(p) for t, p in zip(batch, prompts))
    a = generate(lm, prompts, 6, sample=True, seed=3)
    assert a == generate(lm, prompts, 6, sample=True, seed=3)
    assert a != generate(lm, prompts, 6, sample=True, seed=4)
    assert generate(lm, [], 5) == []
    with pytest.raises(ValueError, match="empty"):
        generate(lm, ["ok", " "], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, ["ok"], 0)
    with pytest.raises(ValueError, match="list"):
        generate(lm, "a single string", 3)


def test_continuation_logprobs_match_a_manual_computation(edits_of):
    lm, _, _ = edits_of("gpt2")
    pairs = [("The Eiffel Tower is located in the city of", "Paris"), ("Hi", " New York City")]
    got = continuation_logprobs(lm, pairs)
    for (prompt, cont), value in zip(pairs, got):
        head = lm.tokenizer(prompt)["input_ids"]
        text = cont if cont.startswith(" ") else " " + cont
        tail = lm.tokenizer(prompt + text)["input_ids"][len(head):]
        with torch.no_grad():
            logp = lm.model(torch.tensor([head + tail], device=lm.device)).logits[0].log_softmax(-1)
        manual = np.mean([float(logp[len(head) - 1 + i, t]) for i, t in enumerate(tail)])
        assert value == pytest.approx(manual, abs=1e-4)


def _argmax_by_hand(lm, prompt, cont):
    """The argmax at each position predicting a token of ``cont``, teacher-forced, and those tokens."""
    head = lm.tokenizer(prompt)["input_ids"]
    text = cont if cont.startswith(" ") else " " + cont
    tail = lm.tokenizer(prompt + text)["input_ids"][len(head):]
    with torch.no_grad():
        logits = lm.model(torch.tensor([head + tail], device=lm.device)).logits[0]
    return [int(logits[len(head) - 1 + i].argmax()) for i in range(len(tail))], tail


def test_token_accuracy_matches_a_hand_computation(edits_of):
    lm, edit, _ = edits_of("gpt2")
    prompt = "The Eiffel Tower is located in the city of"
    greedy = generate(lm, [prompt], max_new_tokens=4)[0]  # the model's own answer: some tokens predicted
    pairs = [(prompt, "Paris"), ("Hi", " New York City"), (prompt, greedy)]
    got = continuation_predictions(lm, pairs, batch_rows=2)  # two passes, right-padded
    shares = []
    for (p, cont), (predicted, target) in zip(pairs, got):
        hand, tail = _argmax_by_hand(lm, p, cont)
        assert predicted.tolist() == hand and target.tolist() == tail
        share = sum(a == b for a, b in zip(hand, tail)) / len(tail)
        assert token_accuracy(predicted, target) == pytest.approx(share)
        shares.append(share)
    assert shares[2] > 0
    # the per-case scores: mean over the prompts of each kind; locality = agreement with the unedited argmax
    scores = score_edit(lm, REQ1, paraphrases=["{} stands in the city of", "{} is in"], neighbours=["The Louvre is in"])
    before = token_predictions(lm, [scores])[0]
    values = accuracy_scores(scores, before, before)
    hand = [_argmax_by_hand(lm, p, REQ1.target_true if k == "neighbour" else REQ1.target)
            for p, k in zip(scores.prompts, scores.kinds)]
    share = [sum(a == b for a, b in zip(*h)) / len(h[1]) for h in hand]
    assert values["rel_acc"] == pytest.approx(share[0])
    assert values["gen_acc"] == pytest.approx((share[1] + share[2]) / 2)
    assert values["loc_acc"] == 1.0  # the "edited" model is the unedited one
    assert "loc_acc" not in accuracy_scores(scores, before)
    with applied(lm, [edit]):
        after = score_edit(lm, REQ1, paraphrases=["{} stands in the city of", "{} is in"],
                           neighbours=["The Louvre is in"])
        edited = token_predictions(lm, [after])[0]
        hand_after = _argmax_by_hand(lm, "The Louvre is in", REQ1.target_true)[0]
    loc = accuracy_scores(after, edited, before)["loc_acc"]
    assert loc == pytest.approx(np.mean(np.array(hand_after) == np.array(hand[3][0])))


def test_edit_scores_arithmetic():
    scores = EditScores(
        prompts=("r", "p1", "p2", "n1", "n2"), kinds=("rewrite", "paraphrase", "paraphrase", "neighbour", "neighbour"),
        logp_new=np.log([0.9, 0.6, 0.1, 0.2, 0.7]), logp_old=np.log([0.1, 0.3, 0.5, 0.6, 0.2]),
        target="Rome", target_true="Paris")
    s = scores.summary()
    assert s["ES"] == 1.0 and s["PS"] == 0.5 and s["NS"] == 0.5
    assert s["S"] == pytest.approx(3 / (1 + 2 + 2))
    assert s["EM"] == pytest.approx(0.8) and s["PM"] == pytest.approx((0.3 - 0.4) / 2)
    assert s["NM"] == pytest.approx((0.4 - 0.5) / 2)
    assert list(scores.success) == [True, True, False, True, False]
    back = EditScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert back.summary() == pytest.approx(s)
    only = EditScores(("r",), ("rewrite",), np.array([-1.0]), np.array([-2.0]), "a", "b")
    assert np.isnan(only.paraphrase) and only.score == 1.0
    assert harmonic_mean([1.0, 0.0]) == 0.0 and np.isnan(harmonic_mean([]))


def test_score_edit_needs_the_old_object_and_fills_subjects(edits_of):
    lm, edit, _ = edits_of("llama")
    with pytest.raises(ValueError, match="target_true"):
        score_edit(lm, EditRequest("The Eiffel Tower", "{} is in", "Rome"))
    scores = score_edit(lm, REQ1, paraphrases=["{} stands in the city of"], neighbours=["The Louvre is in"])
    assert scores.prompts == (REQ1.text, "The Eiffel Tower stands in the city of", "The Louvre is in")
    assert scores.kinds == ("rewrite", "paraphrase", "neighbour")
    with applied(lm, [edit]):
        after = score_edit(lm, REQ1, paraphrases=["{} stands in the city of"], neighbours=["The Louvre is in"])
    assert after.logp_new[0] > scores.logp_new[0]  # the edit raised p(Rome) on the rewrite prompt


def test_ngram_entropy_drops_for_repetitive_text():
    varied = "The tower was built for the world fair and became a symbol of the city and the country."
    assert ngram_entropy("the the the the the the the the") < ngram_entropy(varied)
    assert ngram_entropy("") == 0.0


def test_evaluate_cases_reports_pre_and_post(edits_of, tmp_path):
    lm, _, _ = edits_of("llama")
    cases = [{
        "case_id": 7,
        "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                              "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
        "paraphrase_prompts": ["The Eiffel Tower stands in"],
        "neighborhood_prompts": ["The Louvre is located in the city of"],
        "generation_prompts": ["The Eiffel Tower is"],
    }]
    result = evaluate_cases(lm, cases, hparams=TINY_HPARAMS, stats_spec=TINY_STATS, generation_tokens=5)
    assert set(result["pre"]) >= {"ES", "PS", "NS", "S", "fluency", "rel_acc", "gen_acc"} and result["cases"] == 1
    assert result["pre"]["loc_acc"] is None and 0 <= result["post"]["loc_acc"] <= 1
    assert all(0 <= result["post"][m] <= 1 for m in ("rel_acc", "gen_acc")) and "rel_acc" in format_table(result)
    assert result["per_case"][0]["case_id"] == 7 and result["seconds_per_edit"] > 0
    assert len(result["per_case"][0]["prompts"]) == 3
    assert result["answered_paraphrases"]["of"] == 1
    assert "paraphrase prompts the unedited model answers" in format_table(result) or \
        result["answered_paraphrases"]["PS"] is None
    json.dumps(result)  # strict JSON
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    assert read_cases(path) == cases
    path.write_text(json.dumps([{"requested_rewrite": {"prompt": "no placeholder", "subject": "x",
                                                       "target_new": {"str": "a"}, "target_true": {"str": "b"}}}]))
    with pytest.raises(ValueError, match="Case 0"):
        read_cases(path)


def test_answered_paraphrases_keep_the_prompts_that_elicit_the_fact():
    def prompt(kind, p_old, success):
        return {"kind": kind, "p_old": p_old, "success_post": success}

    per_case = [{"prompts": [prompt("rewrite", 0.9, True), prompt("paraphrase", 0.30, True),
                             prompt("paraphrase", 0.001, False)]},
                {"prompts": [prompt("paraphrase", 0.05, False), prompt("neighborhood", 0.5, True)]},
                {"prompts": []}]
    out = answered_paraphrases(per_case, threshold=0.05)
    assert (out["prompts"], out["of"]) == (2, 3)
    assert out["PS"] == pytest.approx(0.5) and out["PS_all"] == pytest.approx(1 / 3)
    assert answered_paraphrases(per_case, threshold=0.5)["PS"] is None


def test_shipped_counterfact_set_is_well_formed():
    cases = read_cases(ROOT / "assets" / "counterfact_smollm2.json")
    assert len(cases) >= 40
    for case in cases:
        rw = case["requested_rewrite"]
        assert rw["target_new"]["str"].lower() != rw["target_true"]["str"].lower()
        assert case["paraphrase_prompts"] and case["neighborhood_prompts"]
        assert all(rw["subject"] in p for p in case["paraphrase_prompts"])
        assert not any(rw["subject"] in p for p in case["neighborhood_prompts"])


# ---------------------------------------------------------------------------
# Command lines, on a tiny model saved to disk


def test_command_lines_on_a_saved_tiny_model(cache, tokenizer, tmp_path, capsys):
    from editing.__main__ import main as edit_main
    from editing.evaluate import main as evaluate_main
    from editing.stats.__main__ import main as stats_main

    lm = make_tiny("llama", tokenizer, "cpu")
    model_dir = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--device", "cpu", "--threads", "1"]

    assert stats_main([*common, "--layers", "1", "--tokens", "600"]) == 0
    assert "layer 1:" in capsys.readouterr().out
    assert edit_main(["--subject", "X", "--prompt", "no placeholder", "--target", "Rome", *common]) == 2
    assert "placeholder" in capsys.readouterr().err
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{
        "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                              "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
        "paraphrase_prompts": ["The Eiffel Tower stands in"], "neighborhood_prompts": ["The Louvre is in"]}]))
    out = tmp_path / "eval.json"
    assert evaluate_main([*common, "--cases", str(cases), "--json", str(out), "--layer", "1",
                          "--stats-tokens", "600", "--variant", "original", "--quiet"]) == 0
    assert "ES" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) >= {"pre", "post", "per_case", "seconds_per_edit"} and result["variant"] == "original"
    assert set(result["post"]) >= {"ES", "PS", "NS", "S"}

    # `python -m editing` end to end in a fresh interpreter (statistics come from the cache filled above).
    saved = tmp_path / "edit.safetensors"
    env = {**os.environ, "LOCATE_EDIT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "editing", *common, "--subject", "The Eiffel Tower",
         "--prompt", "{} is located in the city of", "--target", "Rome", "--layer", "1", "--stats-tokens", "600",
         "--generate", "The Eiffel Tower is", "--neighbour", "The Louvre is located in the city of",
         "--max-new-tokens", "5", "--save", str(saved)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "before:" in proc.stdout and "after:" in proc.stdout and "ES" in proc.stdout
    assert len(load_edits(saved)) == 1


def test_an_edit_says_whether_it_took_and_retries_once_when_it_did_not(tokenizer, device, tmp_path, caplog):
    import editing.methods.rome as rome
    from editing.edit import EditRequest

    with private_cache(tmp_path):
        lm = make_tiny("gpt2", tokenizer, device)
        request = EditRequest("Paris", "{} is the capital of", "Rome", "France")
        edit = rome.compute_edit(lm, request, layer=1, hparams=TINY_HPARAMS)
        p_new, p_old = rome._rewrite_preference(lm, edit)
        assert edit.info["p_new"] == pytest.approx(p_new) and edit.info["took"] == (p_new > p_old)
        # an optimisation that never moves: the edit cannot take, one retry with more steps is tried, and it says so
        hp = dataclasses.replace(TINY_HPARAMS, v_lr=1e-12)
        stuck = rome.compute_edit(lm, request, layer=1, hparams=hp)
        assert stuck.info["took"] is False and stuck.info["warning"].startswith("The edit did not take")
        assert stuck.info["retried"]["steps"] == 2 * hp.v_num_grad_steps and "Try another layer" in stuck.info["warning"]
        assert any(r.levelname == "WARNING" and "did not take" in r.getMessage() for r in caplog.records)
        caplog.clear()
        none = rome.compute_edit(lm, request, layer=1, hparams=hp, retries=0)
        assert "retried" not in none.info and none.info["took"] is False
        # without retries (a layer sweep, which expects misses) the miss is recorded, not raised as a warning
        assert not any(r.levelname == "WARNING" for r in caplog.records)

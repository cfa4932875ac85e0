"""MEMIT batches on tiny random models of every family.

Oracles: computing a batch never changes a weight (also when stopped from
``progress``); a batch applies and undoes as one step, bit for bit, and
round-trips through a file (version 3: several requests, low-rank deltas)
whose announced shapes are checked before anything is read; with one fact at
one layer MEMIT's update is ROME's direction scaled by kᵀC⁻¹k / (λ + kᵀC⁻¹k),
and tends to ROME's update as λ → 0; the update fits the keys it was computed
from as its closed form says.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny
from editing_fixtures import TINY_STATS, changed, private_cache, snapshot
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module
from safetensors.numpy import save_file

from editing import EditRequest, EditStack, applied, check_edits, load_edits, save_edits, score_edit
from editing.deltas import WeightDelta
from editing.edit import Edit
from editing.edit_files import FILE_VERSION
from editing.hparams import METHODS, MEMITHyperParams, ROMEHyperParams, hparams_files, load_hparams
from editing.methods import STAGES, compute, compute_batch
from editing.methods.memit import compute_memit, request_keys
from editing.methods.rome import compute_edit
from editing.stats import ensure_stats
from tracing.hooks import active_hook_count

FAMILIES = sorted(TINY_CONFIGS)
REQUESTS = (
    EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
    EditRequest("Michael Jordan", "{} professionally plays the sport of", "baseball", "basketball"),
    EditRequest("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
)
# Small settings for tiny models (keys 64 or 128 wide: λ of the order of the width, as λ ≈ 20000 is for GPT-2 XL).
TINY_MEMIT = MEMITHyperParams(layers=(1, 2), context_templates=((3, 2),), stats_tokens=512, stats_sample_length=32,
                              clamp_norm_factor=4.0, mom2_update_weight=50.0, v_num_grad_steps=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with private_cache(tmp_path_factory.mktemp("memit-cache")) as path:
        yield path


@pytest.fixture(scope="module")
def batch_of(cache, tokenizer, device):
    """family -> (tiny model, a MEMIT edit of the three requests), computed once per module."""
    made = {}

    def get(family: str):
        if family not in made:
            lm = make_tiny(family, tokenizer, device)
            made[family] = (lm, compute_batch(lm, REQUESTS, hparams=TINY_MEMIT, stats_spec=TINY_STATS))
        return made[family]

    return get


# ---------------------------------------------------------------------------
# A batch is one edit: computed on the side, applied and undone as one step, saved and loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_undoes_bit_for_bit_and_round_trips_through_a_file(batch_of, family, tmp_path):
    lm, edit = batch_of(family)
    saved = snapshot(lm.model)
    assert edit.method == "memit" and edit.requests == REQUESTS and edit.request == REQUESTS[0]
    assert edit.layers == (1, 2) and edit.layer == 2 and len(edit.deltas) == 2
    assert all(d.basis is not None and d.basis.shape[0] == len(REQUESTS) for d in edit.deltas)
    with applied(lm, [edit]):
        touched = changed(lm.model, saved)
        edited = snapshot(lm.model)
    assert set(touched) == {f"{lm.module_name('down_proj', j)}.weight" for j in (1, 2)}
    assert changed(lm.model, saved) == []
    with EditStack(lm) as stack:
        stack.push(edit)
        assert changed(lm.model, edited) == []
        assert stack.undo() is edit  # the whole batch in one step
        assert changed(lm.model, saved) == []
    path = save_edits([edit], tmp_path / "batch.safetensors")
    (again,) = load_edits(path, lm=lm, max_requests=3)
    check_edits(lm, [again])
    assert again.requests == edit.requests and again.layers == edit.layers and again.norm == pytest.approx(edit.norm)
    with applied(lm, [again]):
        assert changed(lm.model, edited) == []
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    assert "3 facts" in edit.describe() and "MEMIT" in edit.describe()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_low_rank_change_equals_its_dense_product(batch_of, family):
    lm, edit = batch_of(family)
    for change in edit.deltas:
        weight = lm.down_proj(change.layer).weight
        before = weight.detach().double().clone()
        with applied(lm, [edit]):
            diff = weight.detach().double() - before
        dense = change.delta.T.astype(np.float64) @ change.basis.astype(np.float64)  # (out, in)
        if lm.spec.conv1d:
            dense = dense.T
        np.testing.assert_allclose(diff.cpu().numpy(), dense, atol=1e-5 * np.abs(dense).max() + 1e-6)
        assert change.norm == pytest.approx(np.linalg.norm(dense), rel=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3"])
def test_computing_never_modifies_the_model_also_when_stopped(cache, tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    saved = snapshot(lm.model)
    calls = []
    compute_batch(lm, REQUESTS[:2], hparams=TINY_MEMIT, stats_spec=TINY_STATS,
                  progress=lambda s, f: calls.append((s, f)))
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    stages = [s for s, _ in calls]
    assert set(stages) == set(STAGES["memit"]) and stages[-1] == "update"
    assert all(0.0 <= f <= 1.0 for _, f in calls)
    assert sum(s == "optimising" for s in stages) >= TINY_MEMIT.v_num_grad_steps // 2

    class Stop(Exception):
        pass

    for stage in ("statistics", "optimising", "update"):
        def stop(name, fraction, stage=stage):
            if name == stage and (stage != "update" or fraction > 0):
                raise Stop(stage)

        with pytest.raises(Stop):
            compute_batch(lm, REQUESTS[:2], hparams=TINY_MEMIT, stats_spec=TINY_STATS, progress=stop)
        assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    # also on top of earlier edits, which are applied for the computation only
    earlier = compute_batch(lm, REQUESTS[2:], hparams=TINY_MEMIT, stats_spec=TINY_STATS)
    with pytest.raises(Stop):
        compute_batch(lm, REQUESTS[:2], hparams=TINY_MEMIT, stats_spec=TINY_STATS, previous=[earlier], project=True,
                      progress=lambda s, f: (_ for _ in ()).throw(Stop()) if s == "optimising" else None)
    assert changed(lm.model, saved) == []


# ---------------------------------------------------------------------------
# What MEMIT computes


def _matched(weight: float) -> tuple[ROMEHyperParams, MEMITHyperParams]:
    """ROME and MEMIT settings whose δ optimisations coincide (one context text, no decay, a clamp never reached)."""
    common = dict(context_templates=((3, 1),), v_num_grad_steps=6, v_weight_decay=0.0, clamp_norm_factor=1e6,
                  stats_tokens=512, stats_sample_length=32)
    return (ROMEHyperParams(layer=1, **common),
            MEMITHyperParams(layers=(1,), mom2_update_weight=weight, **common))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_one_at_one_layer_is_rome_scaled_by_its_closed_form(cache, tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    rome_hp, memit_hp = _matched(50.0)
    rome = compute_edit(lm, REQUESTS[0], hparams=rome_hp, stats_spec=TINY_STATS, retries=0)  # MEMIT does not retry
    memit = compute_batch(lm, [REQUESTS[0]], hparams=memit_hp, stats_spec=TINY_STATS)
    (change,) = memit.deltas
    rome_dw = np.outer(rome.v, rome.u).astype(np.float64)  # (out, in)
    memit_dw = change.delta.T.astype(np.float64) @ change.basis.astype(np.float64)
    cosine = float((rome_dw * memit_dw).sum() / (np.linalg.norm(rome_dw) * np.linalg.norm(memit_dw)))
    assert cosine > 0.999, family
    # |ΔW_memit| / |ΔW_rome| = s / (λ + s), s = k*ᵀ C⁻¹ k*
    stats = ensure_stats(lm, [1], TINY_STATS)[1]
    k = torch.from_numpy(rome.key).double()
    s = float(k @ stats.solve(k))
    ratio = np.linalg.norm(memit_dw) / np.linalg.norm(rome_dw)
    assert ratio == pytest.approx(s / (50.0 + s), rel=2e-3), family
    # λ → 0: ROME's update itself
    tiny_weight = compute_batch(lm, [REQUESTS[0]], hparams=_matched(1e-6)[1], stats_spec=TINY_STATS).deltas[0]
    close = tiny_weight.delta.T.astype(np.float64) @ tiny_weight.basis.astype(np.float64)
    np.testing.assert_allclose(close, rome_dw, atol=2e-3 * np.abs(rome_dw).max())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_each_layer_writes_its_share_of_the_residual_as_the_closed_form_says(batch_of, family):
    """At the first layer ΔW K = R Kᵀ(λC + KKᵀ)⁻¹K, R = (z − h) / L; the last layer's output moves toward z."""
    lm, edit = batch_of(family)
    keys = request_keys(lm, REQUESTS, [1], TINY_MEMIT)[1]  # (n, d_in), as MEMIT averaged them
    first = edit.deltas[0]
    dense = torch.from_numpy(first.delta.T.astype(np.float64) @ first.basis.astype(np.float64))
    stats = ensure_stats(lm, [1], TINY_STATS)[1]
    c = torch.from_numpy(stats.mom2)
    k = keys.T
    values = torch.from_numpy(first.delta.astype(np.float64))  # (n, d_out) = R
    expected = values.T @ k.T @ torch.linalg.solve(TINY_MEMIT.mom2_update_weight * c + k @ k.T, k)
    np.testing.assert_allclose((dense @ k).numpy(), expected.numpy(), rtol=1e-3,
                               atol=1e-4 * float(expected.abs().max()))
    assert edit.info["residual_left"] < 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batches_move_every_fact_toward_its_new_object(batch_of, family):
    lm, edit = batch_of(family)
    before = [score_edit(lm, r).logp_new[0] - score_edit(lm, r).logp_old[0] for r in REQUESTS]
    with applied(lm, [edit]):
        after = [score_edit(lm, r).logp_new[0] - score_edit(lm, r).logp_old[0] for r in REQUESTS]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_compute_takes_memit_and_batches_refuse_what_they_cannot_do(batch_of):
    lm, _ = batch_of("llama")
    saved = snapshot(lm.model)
    single = compute(lm, REQUESTS[0], method="memit", hparams=TINY_MEMIT, stats_spec=TINY_STATS)
    assert single.method == "memit" and single.requests == (REQUESTS[0],)
    at_three = compute(lm, REQUESTS[0], method="memit", layer=3, hparams=TINY_MEMIT, stats_spec=TINY_STATS)
    assert at_three.layers == (2, 3)  # the range keeps its length and ends at the given layer
    with pytest.raises(ValueError, match="one fact per edit"):
        compute_batch(lm, REQUESTS, method="rome")
    with pytest.raises(ValueError, match="repeats the subject and prompt of request 1"):
        compute_batch(lm, [REQUESTS[0], EditRequest("The Eiffel Tower", "{} is located in the city of", "Oslo")],
                      hparams=TINY_MEMIT)
    with pytest.raises(ValueError, match="Request 2 of 2.*placeholder"):
        compute_batch(lm, [REQUESTS[0], EditRequest("X", "no placeholder", "Rome")], hparams=TINY_MEMIT)
    with pytest.raises(ValueError, match="at least one"):
        compute_batch(lm, [], hparams=TINY_MEMIT)
    with pytest.raises(ValueError, match="out of range"):
        compute_batch(lm, REQUESTS[:1], layers=[2, 9], hparams=TINY_MEMIT)
    with pytest.raises(ValueError, match="takes MEMITHyperParams"):
        compute_batch(lm, REQUESTS[:1], hparams=ROMEHyperParams())
    with pytest.raises(ValueError, match="exactly one request"):
        Edit(request=REQUESTS[0], requests=REQUESTS, layer=1, module="m", u=np.ones(2, np.float32),
             v=np.ones(2, np.float32), key=np.ones(2, np.float32), value=np.ones(2, np.float32))
    assert changed(lm.model, saved) == []


def test_memit_hyperparameters_files_load_and_unknown_keys_fail():
    assert "memit" in METHODS
    for path in hparams_files(method="memit"):
        hp = load_hparams(path=path, method="memit")
        assert isinstance(hp, MEMITHyperParams) and json.loads(path.read_text())["description"]
    gpt2 = load_hparams("gpt2-xl", method="memit")
    assert gpt2.edit_layers(48) == (13, 14, 15, 16, 17) and gpt2.mom2_update_weight == 20000
    assert load_hparams("EleutherAI/gpt-j-6b", method="memit").edit_layers(28) == (3, 4, 5, 6, 7, 8)
    assert load_hparams("some/unknown-model", method="memit").edit_layers(48) == (13, 14, 15, 16, 17)
    smol = load_hparams("HuggingFaceTB/SmolLM2-135M-Instruct", method="memit")
    assert "memit_sweep" in smol.description and smol.edit_layers(30) == (0, 1, 2, 3, 4)
    assert smol.mom2_update_weight < 20000
    with pytest.raises(ValueError, match="Unknown MEMIT hyperparameter.*lambda"):
        load_hparams("gpt2-xl", method="memit", **{"lambda": 3.0})
    with pytest.raises(ValueError, match="ascending"):
        MEMITHyperParams(layers=(3, 2))
    with pytest.raises(ValueError, match="out of range"):
        MEMITHyperParams(layers=(3, 40)).edit_layers(30)
    assert MEMITHyperParams.from_dict(gpt2.to_dict()) == gpt2


# ---------------------------------------------------------------------------
# Files: several requests and low-rank deltas, announced and bounded before reading


def _rewrite(path, out, edit_header=None, tensors=None, version=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        data = {name: f.get_tensor(name) for name in f.keys()}
    if edit_header is not None:
        meta["edits"] = json.dumps([edit_header(json.loads(meta["edits"])[0])])
    if version is not None:
        meta["version"] = version
    data.update(tensors or {})
    save_file(data, str(out), metadata=meta)
    return out


def test_batch_files_are_checked_before_they_are_read(batch_of, tokenizer, device, tmp_path):
    lm, edit = batch_of("llama")
    good = save_edits([edit, edit], tmp_path / "two.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="numpy") as f:
        assert f.metadata()["version"] == FILE_VERSION == "3"
    basis = list(edit.deltas[0].basis.shape)

    def with_delta(**changes):
        return lambda rec: {**rec, "deltas": [{**rec["deltas"][0], **changes}, *rec["deltas"][1:]]}

    cases = [
        (with_delta(basis=[basis[0], basis[1] + 1]), None, "header announces"),
        (with_delta(basis=[basis[0] + 1, basis[1]]), None, "one row per value row"),
        (with_delta(basis=[1 << 21, 4]), None, "basis of shape"),
        (with_delta(basis=[basis[0], basis[1]], neurons=basis[0]), None, "both neurons and a basis"),
        (lambda rec: {**rec, "requests": []}, None, "requests must be a list of 1 to"),
        (lambda rec: {**rec, "requests": [rec["request"]] * 5000}, None, "requests must be a list of 1 to"),
        (lambda rec: {**rec, "requests": [{**rec["requests"][0], "subject": "Someone else"}, *rec["requests"][1:]]},
         None, "first request differs"),
        (lambda rec: {**rec, "requests": [rec["requests"][0], {"subject": "x"}]}, None, "prompt"),
        (None, {"edit0.basis0": np.full(basis, np.nan, np.float32)}, "finite"),
        (None, {"edit0.basis0": np.zeros(basis, np.float64)}, "not F32"),
    ]
    for i, (header, tensors, message) in enumerate(cases):
        path = _rewrite(good, tmp_path / f"bad{i}.safetensors", header, tensors)
        with pytest.raises(ValueError, match=message):
            load_edits(path)
    with pytest.raises(ValueError, match="writes 6 facts; at most 5"):
        load_edits(good, max_requests=5)
    assert len(load_edits(good, max_requests=6)) == 2
    other = make_tiny("gpt2", tokenizer, device)
    with pytest.raises(ValueError, match="another architecture"):
        load_edits(good, lm=other)
    wide = make_tiny("llama", tokenizer, device)
    wide.model.model.layers[1].mlp.down_proj.weight.data = torch.zeros(32, 128)
    with pytest.raises(ValueError, match="directions of 64 inputs"):
        load_edits(good, lm=wide)


def test_version_2_files_still_load(cache, batch_of, tmp_path):
    lm, _ = batch_of("llama")
    from editing.methods.ft import compute_ft
    from editing.hparams import FTHyperParams

    ft = compute_ft(lm, REQUESTS[0], hparams=FTHyperParams(layer=1, num_steps=2, lr=5e-3))
    old = _rewrite(save_edits([ft], tmp_path / "ft.safetensors"), tmp_path / "v2.safetensors", version="2")
    (loaded,) = load_edits(old, lm=lm)
    assert loaded.method == "ft" and loaded.requests == (ft.request,)
    with applied(lm, [ft]):
        direct = snapshot(lm.model)
    with applied(lm, [loaded]):
        assert changed(lm.model, direct) == []


def test_weight_delta_factors_are_dense_when_that_is_smaller():
    values, basis = np.ones((3, 4), np.float32), np.ones((3, 5), np.float32)
    assert WeightDelta.low_rank("m", 0, values, basis, conv1d=False).basis is None  # 3 * 9 > 20
    small = WeightDelta.low_rank("m", 0, values[:1], basis[:1], conv1d=False)
    assert small.basis is not None and small.header()["basis"] == [1, 5]
    dense = WeightDelta.low_rank("m", 0, values, basis, conv1d=True)
    np.testing.assert_array_equal(dense.delta, basis.T @ values)  # Conv1D layout (in, out)


# ---------------------------------------------------------------------------
# The real default model


@pytest.mark.real_model
def test_a_memit_batch_edits_the_default_model_reversibly(real_lm, real_stats):
    requests = [EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
                EditRequest("Michael Jordan", "{} plays the sport of", "golf", "basketball"),
                EditRequest("Toyota", "{} is headquartered in the country of", "Brazil", "Japan")]
    saved = snapshot(real_lm.model)
    with private_cache(real_stats):  # the product's statistics, not this module's tiny ones
        edit = compute_batch(real_lm, requests)
    assert changed(real_lm.model, saved) == []
    with applied(real_lm, [edit]):
        assert all(score_edit(real_lm, r).summary()["ES"] == 1.0 for r in requests)
    assert changed(real_lm.model, saved) == []

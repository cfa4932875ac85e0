"""The paper's other editors (FT, FT+L, KN) behind the one edit interface, on tiny random models of every family.

Oracles: computing an edit never changes a weight (also when stopped from
``progress``); every method's change undoes bit for bit (``applied``,
``EditStack``), exports and imports to the same bytes, in one file format
that still reads version-1 files; FT's applied delta reproduces the model it
optimised, FT+L's stays within ε, KN changes exactly the chosen neurons' value
vectors by the library's vector, and its integrated gradients match a naive
full-model computation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny
from editing_fixtures import TINY_HPARAMS, TINY_STATS, changed, private_cache, snapshot
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module
from safetensors.numpy import save_file

from editing import EditRequest, EditStack, applied, check_edits, load_edits, save_edits, score_edit
from editing.deltas import WeightDelta
from editing.edit import Edit
from editing.hparams import FTHyperParams, KNHyperParams, ROMEHyperParams, hparams_files, load_hparams
from editing.methods import METHODS, STAGES, compute
from editing.methods.common import SuffixRunner
from editing.methods.ft import compute_ft
from editing.methods.kn import attribution_scores, compute_kn
from tracing.hooks import Hook, active_hook_count, hooks
from tracing.tokens import continuation_ids

FAMILIES = sorted(TINY_CONFIGS)
DENSE = ("ft", "ft-l", "kn")
REQ = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", target_true="Paris")
REQ2 = EditRequest("Michael Jordan", "{} professionally plays the sport of", "baseball", target_true="basketball")
# Small settings for tiny models: FT as in the paper, FT+L with a looser ε, KN with few integration points.
TINY = {
    "ft": FTHyperParams(layer=1, num_steps=10, lr=5e-3),
    "ft-l": FTHyperParams(layer=1, num_steps=10, lr=5e-3, norm_constraint=2e-3),
    "kn": KNHyperParams(steps=4, batch_size=2),
}


@pytest.fixture(scope="module")
def edits_of(tokenizer, device):
    """family -> (tiny model, {method: edit}), computed once per module."""
    made = {}

    def get(family: str):
        if family not in made:
            lm = make_tiny(family, tokenizer, device)
            made[family] = (lm, {m: compute(lm, REQ, method=m, hparams=TINY[m]) for m in DENSE})
        return made[family]

    return get


# ---------------------------------------------------------------------------
# Every method, every family: computing leaves the model alone, applying undoes bit for bit, files round-trip


@pytest.mark.parametrize("family", FAMILIES)
def test_each_method_undoes_bit_for_bit_and_round_trips_through_a_file(edits_of, family, tmp_path):
    lm, edits = edits_of(family)
    saved = snapshot(lm.model)
    down = f"{lm.module_name('down_proj', 1)}.weight"
    for method, edit in edits.items():
        assert edit.method == method and edit.fingerprint == lm.fingerprint and np.isfinite(edit.norm)
        with applied(lm, [edit]):
            touched = changed(lm.model, saved)
            assert touched and all(name.endswith(".weight") for name in touched)
            assert set(touched) == {f"{lm.module_name('down_proj', j)}.weight" for j in edit.layers}
            edited = snapshot(lm.model)
        assert changed(lm.model, saved) == []
        if method != "kn":
            assert touched == [down]
        with pytest.raises(RuntimeError, match="boom"):
            with applied(lm, edit):
                raise RuntimeError("boom")
        assert changed(lm.model, saved) == []
        path = save_edits([edit], tmp_path / f"{method}.safetensors")
        (again,) = load_edits(path, lm=lm)
        check_edits(lm, [again])
        assert again.method == method and again.layers == edit.layers and again.norm == edit.norm
        assert again.request == edit.request and again.timings == edit.timings
        with applied(lm, [again]):
            assert changed(lm.model, edited) == []
        assert changed(lm.model, saved) == []
    assert active_hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_stacks_mix_methods_and_undo_exactly(edits_of, family, tmp_path):
    lm, edits = edits_of(family)
    with private_cache(tmp_path):
        rome = compute(lm, REQ2, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    order = [rome, edits["ft"], edits["kn"], edits["ft-l"]]
    saved = snapshot(lm.model)
    states = []
    with EditStack(lm) as stack:
        for edit in order:
            stack.push(edit)
            states.append(snapshot(lm.model))
        for i in range(len(order) - 1, 0, -1):
            assert stack.undo() is order[i]
            assert changed(lm.model, states[i - 1]) == []
        stack.push(order[1])
    assert changed(lm.model, saved) == []
    with applied(lm, order):  # applied gives the same bytes as the stack
        assert changed(lm.model, states[-1]) == []
    path = save_edits(order, tmp_path / "mixed.safetensors")
    loaded = load_edits(path)
    assert [e.method for e in loaded] == ["rome", "ft", "kn", "ft-l"]
    with applied(lm, loaded):
        assert changed(lm.model, states[-1]) == []
    assert changed(lm.model, saved) == []


@pytest.mark.parametrize("method", DENSE)
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3"])
def test_computing_never_modifies_the_model_also_when_stopped(tokenizer, device, family, method):
    lm = make_tiny(family, tokenizer, device)
    saved = snapshot(lm.model)
    calls = []
    edit = compute(lm, REQ, method=method, hparams=TINY[method], progress=lambda s, f: calls.append((s, f)))
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    stages = [s for s, _ in calls]
    assert set(stages) == set(STAGES[method]) and stages[-1] == "update"
    assert all(0.0 <= f <= 1.0 for _, f in calls)
    assert edit.seconds == pytest.approx(sum(edit.timings.values()))

    class Stop(Exception):
        pass

    def stop_midway(stage, fraction):
        if stage != "update" and fraction >= 0.5:
            raise Stop

    with pytest.raises(Stop):
        compute(lm, REQ, method=method, hparams=TINY[method], progress=stop_midway)
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0


# ---------------------------------------------------------------------------
# What each method computes


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ft_delta_reproduces_the_optimised_model_and_ft_l_stays_within_epsilon(edits_of, family):
    lm, edits = edits_of(family)
    for method in ("ft", "ft-l"):
        edit = edits[method]
        (change,) = edit.deltas
        assert change.neurons is None and change.delta.shape == tuple(lm.down_proj(1).weight.shape)
        assert edit.layer == 1 and edit.module == change.module == lm.module_name("down_proj", 1)
        assert edit.info["steps"] >= 1
        with applied(lm, [edit]):
            after = score_edit(lm, edit.request).prob_new[0]
        assert after == pytest.approx(edit.info["target_prob_after"], rel=1e-3)
        assert edit.info["target_prob_after"] > edit.info["target_prob_before"]
    eps = TINY["ft-l"].norm_constraint
    assert np.abs(edits["ft-l"].deltas[0].delta).max() <= np.float32(eps)  # ε as the float32 the clamp used
    assert float(np.abs(edits["ft"].deltas[0].delta).max()) > eps  # unconstrained moves further


def test_ft_stops_once_the_new_object_wins_by_the_early_stop_margin(tokenizer, device):
    lm = make_tiny("llama", tokenizer, device)
    ten = compute_ft(lm, REQ, hparams=FTHyperParams(layer=1, num_steps=10, lr=5e-3, early_stop_loss=0.0))
    margin = ten.info["loss"] * 1.0001  # reached after 10 steps: a longer run must stop there
    edit = compute_ft(lm, REQ, hparams=FTHyperParams(layer=1, num_steps=200, lr=5e-3, early_stop_loss=margin))
    assert ten.info["steps"] == 10 and edit.info["steps"] <= 10 and edit.info["loss"] < margin


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_kn_rewrites_exactly_the_chosen_value_vectors(edits_of, family):
    lm, edits = edits_of(family)
    edit = edits["kn"]
    embed = lm.embed.weight.detach().float()
    new_ids = continuation_ids(lm.tokenizer, REQ.text, REQ.target)
    expected = (embed[new_ids].sum(0) - 2.0 * embed[edit.info["erased_token_id"]]).cpu().numpy()
    assert edit.info["neurons"] == sum(len(d.neurons) for d in edit.deltas) >= 1
    for change in edit.deltas:
        weight = lm.down_proj(change.layer).weight
        before = weight.detach().clone()
        with applied(lm, [edit]):
            diff = (weight.detach().float() - before.float()).cpu().numpy()
        if lm.spec.conv1d:
            diff = diff.T  # (out, in): a neuron's value vector is a column
        moved = np.flatnonzero(np.abs(diff).max(0) > 0)
        assert set(moved) <= set(change.neurons.tolist())
        np.testing.assert_allclose(diff[:, change.neurons].T, np.tile(expected, (len(change.neurons), 1)),
                                   atol=1e-5 * float(np.abs(expected).max()) + 1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_kn_integrated_gradients_match_a_naive_full_model_computation(tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    hp = KNHyperParams(steps=6, batch_size=3)
    head = lm.tokenizer(REQ.text)["input_ids"]
    old = continuation_ids(lm.tokenizer, REQ.text, "the old city")  # three tokens: teacher-forced
    row, lookup, layer = head + old[:-1], len(head) - 1, 2
    name = lm.module_name("down_proj", layer)
    acts = []

    def grab(module, args, output):
        acts.append(args[0][0, lookup].clone())

    with torch.no_grad(), hooks(lm.model, Hook(name, grab)):
        lm.model(torch.tensor([row], device=device))
    activation = acts[0].float()
    runner = SuffixRunner(lm, [row] * hp.batch_size, [lookup] * hp.batch_size, 0)
    with torch.enable_grad():
        fast = attribution_scores(lm, runner, layer, activation, old, hp)
        total = torch.zeros_like(activation)
        for alpha in torch.linspace(0, 1, hp.steps):
            scaled = (alpha * activation).requires_grad_(True)

            def put(module, args, kwargs):
                x = args[0].clone()
                x[0, lookup] = scaled
                return (x, *args[1:]), kwargs

            with hooks(lm.model, Hook(name, put, pre=True)):
                logits = lm.model(torch.tensor([row], device=device)).logits[0].float()
            probs = torch.softmax(logits[lookup:], -1)[torch.arange(len(old)), torch.tensor(old)]
            (grad,) = torch.autograd.grad(probs.mean(), scaled)
            total += grad
    naive = activation * total / hp.steps
    assert torch.allclose(fast, naive, atol=1e-6 + 1e-4 * float(naive.abs().max())), family
    assert active_hook_count(lm.model) == 0


def test_kn_searches_one_layer_when_asked(edits_of):
    lm, _ = edits_of("llama")
    edit = compute_kn(lm, REQ, layer=2, hparams=TINY["kn"])
    assert edit.layers == (2,) and edit.layer == 2 and edit.info["layers_searched"] == 1


# ---------------------------------------------------------------------------
# Files: one format for every method, version-1 files still load, dense deltas checked before reading


def test_version_1_files_still_load(edits_of, tmp_path):
    lm, _ = edits_of("llama")
    with private_cache(tmp_path):
        rome = compute(lm, REQ, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    record = {k: v for k, v in rome.metadata().items() if k != "method"}  # what version 1 wrote
    vectors = {f"edit0.{n}": getattr(rome, n) for n in ("u", "v", "key", "value")}
    old = tmp_path / "v1.safetensors"
    save_file(vectors, str(old), metadata={"format": "locate-edit/rome-edits", "version": "1",
                                           "edits": json.dumps([record])})
    (loaded,) = load_edits(old)
    assert loaded.method == "rome" and loaded.variant == rome.variant and np.array_equal(loaded.u, rome.u)
    with applied(lm, [rome]):
        direct = snapshot(lm.model)
    with applied(lm, [loaded]):
        assert changed(lm.model, direct) == []


def _rewrite(path, out, edit_header=None, tensors=None):
    """A copy of an edits file with its header record and/or tensors changed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        data = {name: f.get_tensor(name) for name in f.keys()}
    if edit_header is not None:
        meta["edits"] = json.dumps([edit_header(json.loads(meta["edits"])[0])])
    data.update(tensors or {})
    save_file(data, str(out), metadata=meta)
    return out


def test_dense_deltas_are_checked_before_they_are_read(edits_of, tokenizer, device, tmp_path):
    lm, edits = edits_of("llama")
    ft, kn = edits["ft"], edits["kn"]
    good_ft = save_edits([ft], tmp_path / "ft.safetensors")
    good_kn = save_edits([kn], tmp_path / "kn.safetensors")
    shape = list(ft.deltas[0].delta.shape)

    def with_delta(**changes):
        return lambda rec: {**rec, "deltas": [{**rec["deltas"][0], **changes}]}

    cases = [
        (good_ft, with_delta(shape=[shape[0], shape[1] + 1]), None, "header announces"),
        (good_ft, with_delta(shape=[1 << 21, 4]), None, "weight deltas are 2-D"),
        (good_ft, with_delta(shape=[1 << 14, 1 << 14]), None, "at most"),
        (good_ft, with_delta(neurons=3), None, "announces 3 neurons"),
        (good_ft, lambda rec: {**rec, "deltas": []}, None, "1 to"),
        (good_ft, lambda rec: {k: v for k, v in rec.items() if k != "deltas"}, None, "announce"),
        (good_ft, lambda rec: {**rec, "method": "Bad Method"}, None, "unknown method"),
        (good_ft, None, {"edit0.delta0": np.full(shape, np.nan, np.float32)}, "finite"),
        (good_ft, None, {"edit0.delta0": np.zeros(shape, np.float64)}, "not F32"),
        (good_kn, None, {"edit0.neurons0": np.full(len(kn.deltas[0].neurons), -1, np.int64)}, "distinct"),
    ]
    for i, (source, header, tensors, message) in enumerate(cases):
        path = _rewrite(source, tmp_path / f"bad{i}.safetensors", header, tensors)
        with pytest.raises(ValueError, match=message):
            load_edits(path)
    # Against a model: the named weight must exist with the announced shape, before anything is read.
    other = make_tiny("gpt2", tokenizer, device)
    with pytest.raises(ValueError, match="another architecture"):
        load_edits(good_ft, lm=other)
    wide = make_tiny("llama", tokenizer, device)
    wide.model.model.layers[1].mlp.down_proj.weight.data = torch.zeros(shape[0], shape[1] * 2)
    with pytest.raises(ValueError, match="needs"):
        load_edits(good_ft, lm=wide)
    far = _rewrite(good_kn, tmp_path / "far.safetensors",
                   lambda rec: {**rec, "deltas": [{**d, "layer": 40} for d in rec["deltas"]]})
    with pytest.raises(ValueError, match="layers 0 to"):
        load_edits(far, lm=lm)
    out_of_range = WeightDelta(kn.deltas[0].module, kn.deltas[0].layer, kn.deltas[0].delta[:1], np.array([10_000]))
    foreign = Edit(**{**kn.__dict__, "deltas": (out_of_range,)})
    with pytest.raises(ValueError, match="neuron 10000"):
        check_edits(lm, [foreign])


# ---------------------------------------------------------------------------
# Entry point, hyperparameters and the command line


def test_compute_refuses_unknown_methods_and_mismatched_hyperparameters(edits_of):
    lm, _ = edits_of("llama")
    saved = snapshot(lm.model)
    with pytest.raises(ValueError, match="Unknown editing method 'mend'.*rome, ft, ft-l, kn, memit"):
        compute(lm, REQ, method="mend")
    with pytest.raises(ValueError, match="takes FTHyperParams"):
        compute(lm, REQ, method="ft", hparams=ROMEHyperParams())
    with pytest.raises(ValueError, match="needs a norm_constraint"):
        compute(lm, REQ, method="ft-l", hparams=FTHyperParams())
    with pytest.raises(ValueError, match="needs a norm_constraint"):
        compute(lm, REQ, method="ft", hparams=FTHyperParams(norm_constraint=1e-3))
    with pytest.raises(ValueError, match="placeholder"):
        compute(lm, EditRequest("X", "no placeholder", "Rome"), method="kn", hparams=TINY["kn"])
    with pytest.raises(ValueError, match="out of range"):
        compute(lm, REQ, method="ft", layer=9, hparams=TINY["ft"])
    assert changed(lm.model, saved) == []


@pytest.mark.parametrize("method", DENSE)
def test_edit_and_compare_takes_a_method_and_restores_the_model(edits_of, method):
    from editing import edit_and_compare, generate

    lm, edits = edits_of("llama")
    saved = snapshot(lm.model)
    stages = []
    result = edit_and_compare(lm, REQ, method=method, hparams=TINY[method], neighbours=["The Louvre is in"],
                              max_new_tokens=3, previous=[edits["ft"]], progress=lambda s, f: stages.append(s))
    assert changed(lm.model, saved) == [] and result.edit.method == method
    assert set(STAGES[method]) <= set(stages)
    with applied(lm, [edits["ft"], result.edit]):
        assert result.after == tuple(generate(lm, list(result.generated), 3))
    with pytest.raises(ValueError, match="Unknown editing method"):
        edit_and_compare(lm, REQ, method="mend")


def test_every_methods_hparams_files_load_and_unknown_keys_fail(tmp_path):
    assert METHODS == ("rome", "ft", "ft-l", "kn", "memit")
    for method in METHODS:
        for path in hparams_files(method=method):
            hp = load_hparams(path=path, method=method)
            assert json.loads(path.read_text()).get("description"), path
        assert type(load_hparams("some/unknown-model", method=method)).__name__ == {
            "rome": "ROMEHyperParams", "ft": "FTHyperParams", "ft-l": "FTHyperParams", "kn": "KNHyperParams",
            "memit": "MEMITHyperParams"}[method]
    paper_ft, paper_ftl = load_hparams("gpt2-xl", method="ft"), load_hparams("gpt2-xl", method="ft-l")
    assert (paper_ft.layer, paper_ft.lr, paper_ft.num_steps, paper_ft.norm_constraint) == (1, 5e-4, 25, None)
    assert (paper_ftl.layer, paper_ftl.norm_constraint) == (0, 5e-4)
    kn = load_hparams("gpt2-xl", method="kn")
    assert (kn.steps, kn.adaptive_threshold, kn.erase_scale, kn.write_scale, kn.layers) == (20, 0.2, 2.0, 1.0, ())
    smol = load_hparams("HuggingFaceTB/SmolLM2-135M-Instruct", method="ft-l")
    assert "tuning" in smol.description
    with pytest.raises(ValueError, match="Unknown FT hyperparameter.*learning_rate"):
        load_hparams("gpt2-xl", method="ft", learning_rate=1e-3)
    with pytest.raises(ValueError, match="Unknown KN hyperparameter.*threshold"):
        load_hparams("gpt2-xl", method="kn", threshold=0.3)
    with pytest.raises(ValueError, match="divisor"):
        KNHyperParams(steps=20, batch_size=3)
    with pytest.raises(ValueError, match="norm_constraint must be positive"):
        FTHyperParams(norm_constraint=0.0)
    assert FTHyperParams.from_dict(paper_ftl.to_dict()) == paper_ftl
    assert KNHyperParams.from_dict({**kn.to_dict(), "layers": [3, 1]}).layers == (3, 1)


def test_evaluate_command_line_takes_a_method(tokenizer, tmp_path, capsys):
    from editing.evaluate import main as evaluate_main

    lm = make_tiny("llama", tokenizer, "cpu")
    model_dir = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{
        "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                              "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
        "paraphrase_prompts": ["The Eiffel Tower stands in"], "neighborhood_prompts": ["The Louvre is in"],
        "generation_prompts": ["The Eiffel Tower is"]}]))
    common = ["--model", str(model_dir), "--device", "cpu", "--threads", "1", "--cases", str(cases), "--quiet"]
    for method, extra in (("ft-l", ["--set", "num_steps=3"]), ("kn", ["--set", "steps=2", "--set", "batch_size=2"])):
        out = tmp_path / f"{method}.json"
        assert evaluate_main([*common, "--method", method, "--json", str(out), "--generation-tokens", "4",
                              *extra]) == 0
        printed = capsys.readouterr().out
        assert "EM" in printed and "fluency" in printed
        result = json.loads(out.read_text())
        assert result["method"] == method and result["per_case"][0]["method"] == method
        assert set(result["post"]) >= {"ES", "PS", "NS", "S", "EM", "PM", "NM", "fluency"}
    with pytest.raises(SystemExit):
        evaluate_main([*common, "--method", "kn", "--variant", "original"])


# ---------------------------------------------------------------------------
# The real default model


@pytest.mark.real_model
def test_every_method_edits_the_default_model_reversibly(real_lm, real_stats, real_eiffel):
    request = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris")
    saved = snapshot(real_lm.model)
    for method in METHODS:
        if method == "rome":  # the run's shared ROME edit of this request (checked there not to touch the model)
            assert real_eiffel.request == request
            edit = real_eiffel
        else:
            with private_cache(real_stats):
                edit = compute(real_lm, request, method=method)
        assert changed(real_lm.model, saved) == []
        with applied(real_lm, [edit]):
            after = score_edit(real_lm, edit.request).summary()
        assert changed(real_lm.model, saved) == []
        if method in ("rome", "ft"):
            assert after["ES"] == 1.0, method

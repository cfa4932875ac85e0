"""Sharded models: a model dispatched by accelerate (its hooks attached) traces and edits like the plain model.

On the CPU every family is dispatched with ``accelerate.dispatch_model`` over
"cpu" devices with ``force_hooks`` (each block, the embeddings, the final
norm and the unembedding get their own AlignDevicesHook, as in a real
multi-device map), and with the last blocks offloaded to disk (their weights
load for each forward pass). Oracles: the plain model's traces (fast engine
and the one-cell-per-pass oracle, every kind), preview, severed paths and
generated tokens; every editor's update, and undo bit for bit; an offloaded
layer refused before anything changes. With ``--device cuda`` half of the
blocks run on cuda:0 and half on the CPU (skipped elsewhere).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from accelerate import dispatch_model
from conftest import TINY_CONFIGS, make_tiny
from editing_fixtures import TINY_HPARAMS, TINY_STATS, bitwise_equal, private_cache
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module

from editing import EditRequest, EditStack, applied
from editing.hparams import FTHyperParams, KNHyperParams, MEMITHyperParams
from editing.methods import compute, compute_batch
from editing.sampling import decode
from tracing import trace
from tracing.loading import describe_placement, load_model, parse_device_map, parse_max_memory, wrap_model
from tracing.models import LoadedModel, editable_weight, get_module, stored_value
from tracing.preview import block_dtype, estimate
from tracing.reference import trace_reference
from tracing.result import KINDS, TraceConfig
from tracing.sever import sever
from webapp.engine import create_engine

FAMILIES = sorted(TINY_CONFIGS)
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
CONFIG = TraceConfig(samples=3)
ORACLE = TraceConfig(samples=3, tokens="subject_last")
REQ = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", target_true="Paris")
TINY_MEMIT = MEMITHyperParams(layers=(0, 1), context_templates=((3, 2),), stats_tokens=512, stats_sample_length=32,
                              clamp_norm_factor=4.0, mom2_update_weight=50.0, v_num_grad_steps=8)
EDITORS = {
    "rome": TINY_HPARAMS,  # layer 1
    "memit": TINY_MEMIT,
    "ft": FTHyperParams(layer=1, num_steps=10, lr=5e-3),
    "ft-l": FTHyperParams(layer=1, num_steps=10, lr=5e-3, norm_constraint=2e-3),
    "kn": None,  # searches every layer: its own small settings below
}
KN = KNHyperParams(steps=4, batch_size=2)


def device_map(lm: LoadedModel, blocks) -> dict[str, str]:
    """A map that names every part of the model: block j on ``blocks[j]``, the rest on the CPU."""
    base = lm.spec.blocks.rpartition(".")[0]  # "model", "transformer", "gpt_neox"
    parts = {f"{base}.{name}": "cpu" for name, _ in get_module(lm.model, base).named_children()}
    parts |= {name: "cpu" for name, _ in lm.model.named_children() if name != base}
    del parts[lm.spec.blocks]
    return parts | {f"{lm.spec.blocks}.{j}": device for j, device in enumerate(blocks)}


def dispatched(plain: LoadedModel, blocks, offload_dir=None, **options) -> LoadedModel:
    """A copy of ``plain`` dispatched by accelerate with block j on ``blocks[j]``, hooks attached."""
    model = copy.deepcopy(plain.model)
    dispatch_model(model, device_map(plain, blocks), offload_dir=offload_dir, force_hooks=True, **options)
    return wrap_model(model, plain.tokenizer, plain.name)


def hook_count(lm: LoadedModel) -> int:
    return sum(hasattr(m, "_hf_hook") for m in lm.model.modules())


def assert_same_traces(a, b, tol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.kind == y.kind
        np.testing.assert_allclose(y.scores, x.scores, atol=tol, rtol=0)
        assert abs(x.low_score - y.low_score) <= tol and abs(x.high_score - y.high_score) <= tol


def values(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """Every weight's values as the model computes with them (offloaded ones from their hook's map)."""
    return {name: stored_value(lm.model, name, t).detach().cpu().clone() for name, t in lm.model.state_dict().items()}


@pytest.fixture(scope="module")
def pair(tokenizer, tmp_path_factory):
    """family -> (plain tiny model, the same dispatched over CPU devices with hooks, the same with blocks 2-3 on disk)."""
    made = {}

    def get(family: str):
        if family not in made:
            plain = make_tiny(family, tokenizer, "cpu")
            on_cpu = dispatched(plain, ["cpu"] * 4)
            on_disk = dispatched(plain, ["cpu", "cpu", "disk", "disk"], offload_dir=tmp_path_factory.mktemp(family))
            made[family] = plain, on_cpu, on_disk
        return made[family]

    return get


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with private_cache(tmp_path_factory.mktemp("le-cache")) as path:
        yield path


# ---------------------------------------------------------------------------
# Placement


def test_dispatched_model_has_its_hooks_and_says_where_blocks_sit(pair):
    plain, on_cpu, on_disk = pair("llama")
    assert hook_count(plain) == 0 and hook_count(on_cpu) >= 4 and hook_count(on_disk) >= 4
    assert on_cpu.placement() == ["cpu"] * 4 and on_cpu.device == torch.device("cpu")
    assert describe_placement(on_cpu) == "all 4 blocks on cpu"
    assert on_disk.placement() == ["cpu", "cpu", "cpu (offloaded to disk)", "cpu (offloaded to disk)"]
    assert describe_placement(on_disk) == "blocks 0-1 on cpu, 2-3 on cpu (offloaded to disk)"
    assert on_disk.down_proj(3).weight.device.type == "meta"
    assert on_disk.offloaded and not on_cpu.offloaded and not plain.offloaded
    assert on_disk.fingerprint == plain.fingerprint == on_cpu.fingerprint  # the values, wherever they are kept


def test_the_pages_model_card_shows_where_the_blocks_sit(pair, tmp_path):
    from webapp.engine import Engine
    from webapp.render import model_card

    plain, _, on_disk = pair("llama")
    card = model_card(Engine(on_disk, workdir=tmp_path / "split"))
    assert 'id="model-placement"' in card and "2-3 on cpu (offloaded to disk)" in card
    assert "model-placement" not in model_card(Engine(plain, workdir=tmp_path / "plain"))


def test_device_map_and_max_memory_text_parse_or_say_what_to_write():
    assert parse_device_map("auto") == "auto" and parse_device_map(None) is None and parse_device_map(" ") is None
    assert parse_device_map('{"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}') == {
        "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}
    assert parse_device_map({"a": "0", "b": "cuda:1"}) == {"a": 0, "b": "cuda:1"}
    for bad in ("everywhere", "[1, 2]", '{"a": "gpu"}'):
        with pytest.raises(ValueError, match="device"):
            parse_device_map(bad)
    assert parse_max_memory("0=10GiB, cpu=20GiB") == {0: "10GiB", "cpu": "20GiB"}
    assert parse_max_memory("cuda:1=500MB,disk=1TB") == {1: "500MB", "disk": "1TB"}
    assert parse_max_memory({0: 1000}) == {0: 1000} and parse_max_memory("") is None
    for bad, says in (("0:10GiB", "no '='"), ("gpu=10GiB", "not a device"), ("0=ten", "not a size"),
                      ("cpu=10 parsecs", "not a size")):
        with pytest.raises(ValueError, match=says):
            parse_max_memory(bad)
    with pytest.raises(ValueError, match="device map"):
        load_model("/no/such/model", max_memory="0=1GiB")
    with pytest.raises(ValueError, match="not both"):
        load_model("/no/such/model", device="cpu", device_map="auto")


# ---------------------------------------------------------------------------
# Traces, preview, severed paths, generation


@pytest.mark.parametrize("family", FAMILIES)
def test_traces_of_a_dispatched_model_equal_the_plain_model(pair, family):
    plain, on_cpu, on_disk = pair(family)
    fast = trace(plain, PROMPT, SUBJECT, kinds=KINDS, config=CONFIG)
    oracle = trace_reference(plain, PROMPT, SUBJECT, kinds=KINDS, config=ORACLE)
    for lm in (on_cpu, on_disk):
        assert_same_traces(fast, trace(lm, PROMPT, SUBJECT, kinds=KINDS, config=CONFIG))
        assert_same_traces(oracle, trace_reference(lm, PROMPT, SUBJECT, kinds=KINDS, config=ORACLE))


def test_another_precision_copies_a_dispatched_model_and_refuses_an_offloaded_one(pair):
    plain, on_cpu, on_disk = pair("qwen2")
    config = TraceConfig(samples=3, precision="bf16")
    before = values(on_cpu)
    assert_same_traces(trace(plain, PROMPT, SUBJECT, config=config), trace(on_cpu, PROMPT, SUBJECT, config=config))
    after = values(on_cpu)  # the bf16 copy is a copy: the model keeps its float32 weights
    assert all(bitwise_equal(before[name], after[name]) for name in before)
    with pytest.raises(ValueError, match="offloaded by accelerate .* load the model in that dtype"):
        trace(on_disk, PROMPT, SUBJECT, config=config)


def test_passes_in_parallel_threads_on_a_dispatched_model(pair, monkeypatch):
    plain, on_cpu, on_disk = pair("llama")
    expected = trace(plain, PROMPT, SUBJECT, kinds=KINDS, config=CONFIG)
    monkeypatch.setenv("LOCATE_EDIT_TRACE_WORKERS", "2")  # hooks shared by two passes at once (offloaded: one)
    for lm in (on_cpu, on_disk):
        assert_same_traces(expected, trace(lm, PROMPT, SUBJECT, kinds=KINDS, config=CONFIG))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_preview_severed_paths_and_generation_of_a_dispatched_model_equal_the_plain_model(pair, family):
    plain, on_cpu, on_disk = pair(family)
    config = TraceConfig(samples=3, precision="fp32")  # the preview's bf16 blocks are a copy: compare in fp32
    preview = estimate(plain, PROMPT, SUBJECT, config=config)
    severed = sever(plain, PROMPT, SUBJECT, config=CONFIG)
    ids = [plain.tokenizer.encode(PROMPT)] * 2
    tokens = decode(plain, ids, 6, generator=torch.Generator().manual_seed(1), top_k=5)
    assert block_dtype(on_disk) == torch.float32  # offloaded weights: no bf16 copy to make
    assert_same_traces(preview, estimate(on_disk, PROMPT, SUBJECT, config=CONFIG))
    assert_same_traces(estimate(plain, PROMPT, SUBJECT, config=CONFIG), estimate(on_cpu, PROMPT, SUBJECT, config=CONFIG))
    for lm in (on_cpu, on_disk):
        assert_same_traces(preview, estimate(lm, PROMPT, SUBJECT, config=config))
        other = sever(lm, PROMPT, SUBJECT, config=CONFIG)
        np.testing.assert_allclose(other.unsevered, severed.unsevered, atol=1e-5, rtol=0)
        for kind in severed.severed:
            np.testing.assert_allclose(other.severed[kind], severed.severed[kind], atol=1e-5, rtol=0)
        assert decode(lm, ids, 6, generator=torch.Generator().manual_seed(1), top_k=5) == tokens


# ---------------------------------------------------------------------------
# Editing


def edit_with(lm: LoadedModel, method: str, layer: int | None = None):
    if method == "memit":
        hp = TINY_MEMIT if layer is None else dataclasses.replace(TINY_MEMIT, layers=(layer,))
        return compute_batch(lm, [REQ], method="memit", hparams=hp, stats_spec=TINY_STATS)
    hp = EDITORS[method] if method != "kn" else KN
    return compute(lm, REQ, method=method, layer=layer, hparams=hp, stats_spec=TINY_STATS)


def same_update(a, b) -> None:
    assert a.layers == b.layers
    for x, y in zip(a.arrays().values(), b.arrays().values(), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(EDITORS))
def test_each_editor_gives_the_plain_models_update_and_undoes_bit_for_bit(pair, cache, family, method):
    plain, on_cpu, on_disk = pair(family)
    expected = edit_with(plain, method)
    for lm in (on_cpu, on_disk):
        if method == "kn" and lm is on_disk:
            continue  # KN chooses its layers by attribution; offloaded layers are refused below
        before = values(lm)
        edit = edit_with(lm, method)
        same_update(expected, edit)
        with applied(lm, edit):
            with applied(plain, expected):
                logits = plain.model(torch.tensor([plain.tokenizer.encode(PROMPT)])).logits
                edited = lm.model(torch.tensor([lm.tokenizer.encode(PROMPT)])).logits
                torch.testing.assert_close(edited, logits, atol=1e-4, rtol=1e-4)
        with EditStack(lm) as stack:
            stack.push(edit)
            assert any(not bitwise_equal(before[n], v) for n, v in values(lm).items())
            stack.undo()
        after = values(lm)
        assert all(bitwise_equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_an_offloaded_layer_is_refused_before_anything_changes(pair, cache, family):
    plain, _, on_disk = pair(family)
    name = on_disk.module_name("down_proj", 2)
    says = f"{name} is offloaded to disk by accelerate"
    before = values(on_disk)
    for method in ("rome", "ft", "memit"):
        with pytest.raises(ValueError, match=says):
            edit_with(on_disk, method, layer=2)
    made_elsewhere = edit_with(plain, "rome", layer=2)
    with pytest.raises(ValueError, match=says):
        with applied(on_disk, made_elsewhere):
            pass
    with pytest.raises(ValueError, match="keeps it in memory"):
        EditStack(on_disk).push(made_elsewhere)
    with pytest.raises(ValueError, match=f"{on_disk.module_name('down_proj', 3)} is offloaded to disk"):
        editable_weight(on_disk, 3)
    after = values(on_disk)
    assert all(bitwise_equal(before[n], after[n]) for n in before)
    assert editable_weight(on_disk, 1) is on_disk.down_proj(1).weight


def test_a_weight_on_the_meta_device_without_a_hook_is_refused(tokenizer):
    lm = make_tiny("llama", tokenizer, "cpu")
    module = lm.down_proj(0)
    module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj has no weights loaded"):
        editable_weight(lm, 0)


# ---------------------------------------------------------------------------
# Half of the blocks on cuda:0, half on the CPU (run with --device cuda)


@pytest.fixture
def cuda_pair(tokenizer, device):
    if device.type != "cuda":
        pytest.skip("blocks on cuda:0 and the CPU: run with --device cuda")
    plain = make_tiny("llama", tokenizer, device)
    cpu_plain = make_tiny("llama", tokenizer, "cpu")
    # main_device="cpu": blocks mapped to the CPU run there, in place (not offloaded to the GPU's pass)
    split = dispatched(cpu_plain, ["cuda:0", "cuda:0", "cpu", "cpu"], main_device="cpu")
    return plain, split


def test_half_on_cuda_half_on_the_cpu_traces_like_one_device(cuda_pair):
    plain, split = cuda_pair
    assert split.placement() == ["cuda:0", "cuda:0", "cpu", "cpu"]
    assert describe_placement(split) == "embeddings on cpu, blocks 0-1 on cuda:0, 2-3 on cpu"
    fast = trace(plain, PROMPT, SUBJECT, kinds=KINDS, config=CONFIG)
    assert_same_traces(fast, trace(split, PROMPT, SUBJECT, kinds=KINDS, config=CONFIG))
    assert_same_traces(trace_reference(plain, PROMPT, SUBJECT, kinds=KINDS, config=ORACLE),
                       trace_reference(split, PROMPT, SUBJECT, kinds=KINDS, config=ORACLE))
    severed = sever(plain, PROMPT, SUBJECT, config=CONFIG)
    np.testing.assert_allclose(sever(split, PROMPT, SUBJECT, config=CONFIG).unsevered, severed.unsevered,
                               atol=1e-5, rtol=0)
    config = TraceConfig(samples=3, precision="fp32")
    assert_same_traces(estimate(plain, PROMPT, SUBJECT, config=config),
                       estimate(split, PROMPT, SUBJECT, config=config), tol=1e-4)


def test_half_on_cuda_half_on_the_cpu_edits_each_side_and_undoes_bit_for_bit(cuda_pair, cache):
    _, split = cuda_pair
    before = values(split)
    for layer in (1, 2):  # cuda:0, then the CPU
        for method in sorted(EDITORS):
            edit = edit_with(split, method, layer=layer)
            weight = split.down_proj(layer).weight
            assert weight.device == split.layer_device(layer)
            with applied(split, edit):
                assert not bitwise_equal(weight.detach().cpu(), before[split.module_name("down_proj", layer)
                                                                        + ".weight"])
            after = values(split)
            assert all(bitwise_equal(before[n], after[n]) for n in before)


def test_offloaded_to_the_cpu_by_a_gpu_map_traces_and_refuses_edits(tokenizer, device, cache):
    if device.type != "cuda":
        pytest.skip("CPU offloading next to cuda:0: run with --device cuda")
    plain = make_tiny("llama", tokenizer, device)
    split = dispatched(make_tiny("llama", tokenizer, "cpu"), ["cuda:0", "cuda:0", "cpu", "cpu"])  # main: cuda:0
    assert split.placement()[2:] == ["cuda:0 (offloaded to cpu)"] * 2
    assert_same_traces(trace(plain, PROMPT, SUBJECT, config=CONFIG), trace(split, PROMPT, SUBJECT, config=CONFIG))
    with pytest.raises(ValueError, match="offloaded to the CPU by accelerate"):
        edit_with(split, "rome", layer=2)


# ---------------------------------------------------------------------------
# The embedded model, loaded with a device map; the app's variables


def test_the_app_passes_its_device_map_variable_to_load_model(monkeypatch):
    monkeypatch.delenv("LOCATE_EDIT_MODEL", raising=False)
    monkeypatch.setenv("LOCATE_EDIT_DEVICE_MAP", "everywhere")
    with pytest.raises(ValueError, match="Device map 'everywhere' is neither"):
        create_engine()
    monkeypatch.setenv("LOCATE_EDIT_DEVICE_MAP", "auto")
    monkeypatch.setenv("LOCATE_EDIT_MAX_MEMORY", "0=lots")
    with pytest.raises(ValueError, match="'lots' is not a size"):
        create_engine()


@pytest.mark.real_model
def test_embedded_model_with_a_device_map_gives_the_plain_maps(real_lm, device):
    config = TraceConfig(samples=2, tokens="subject_last")
    expected = trace(real_lm, PROMPT, SUBJECT, kinds=("hidden",), config=config)
    tol = 1e-4 if device.type != "cpu" else 1e-5
    auto = load_model(device_map="auto")
    assert auto.n_layers == real_lm.n_layers and describe_placement(auto).startswith(("all 30 blocks", "blocks"))
    assert_same_traces(expected, trace(auto, PROMPT, SUBJECT, kinds=("hidden",), config=config), tol=tol)
    del auto
    main = "cpu" if device.type == "cpu" else 0
    spread = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main,
              **{f"model.layers.{j}": "disk" if j >= 28 else main for j in range(30)}}
    offloaded = load_model(device_map=spread)  # the last two blocks load from disk for each pass
    assert offloaded.fingerprint == real_lm.fingerprint and offloaded.offloaded
    assert describe_placement(offloaded).endswith("28-29 on cpu (offloaded to disk)" if main == "cpu"
                                                  else "28-29 on cuda:0 (offloaded to disk)")
    assert_same_traces(expected, trace(offloaded, PROMPT, SUBJECT, kinds=("hidden",), config=config), tol=tol)
    with pytest.raises(ValueError, match="model.layers.29.mlp.down_proj is offloaded to disk"):
        editable_weight(offloaded, 29)

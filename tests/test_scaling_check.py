"""docs/scaling.md's formulas against the code: counted FLOPs and block calls equal the predicted ones.

The full check is ``benchmarks/scaling_check.py``; here the tiny shapes only, so that a change to the engine's
plan or to ROME's passes that the formulas no longer describe fails here.
"""

from __future__ import annotations

import pytest

from benchmarks.scaling_check import Shape, build, check_rome, check_trace, window_blocks


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))  # random models' noise scales, templates, statistics


@pytest.mark.parametrize("name, gpu", [("tiny-llama", False), ("tiny-llama", True), ("tiny-gpt2", True)])
def test_trace_flops_and_calls_are_the_plans(name, gpu):
    row = check_trace(name, 2, gpu)
    assert row["flops"] == pytest.approx(row["flops_plan"], rel=1e-12)
    assert row["block_calls"] == row["block_calls_plan"]
    assert row["stored_bytes"] == row["stored_formula"]
    assert row["passes"] == (1 if gpu else 30)
    if not gpu:  # one pass per kind and token: the closed form, within the 2 % it misses when L < window
        assert row["flops_closed"] == pytest.approx(row["flops"], rel=0.03)


def test_rome_flops_and_calls_are_predicted():
    row = check_rome("tiny-gpt2", steps=2, stats_tokens=None)  # no statistics: the same passes, no corpus to sample
    assert row["steps"] == 2
    assert row["flops"] == pytest.approx(row["flops_plan"], rel=1e-12)
    assert row["block_calls"] == row["block_calls_plan"]


def test_window_blocks_by_hand():
    # L = 4, w = 2 (a = b = 1): hidden 3 + 2 + 1 + 0; attn windows start at 0, 0, 1, 2: the layer-1 window shares
    # rows with layer 0's until block 1, so 4 + 3 + 3 + 2; mlp one block later where not shared: 3 + 3 + 2 + 1.
    assert window_blocks(4, 2) == (6, 9, 12)


def test_shape_of_a_gqa_model_on_the_meta_device():
    lm = build("llama-3-70b", device="meta")
    shape = Shape.of(lm)
    assert (shape.layers, shape.d, shape.m, shape.vocab, shape.d_kv) == (80, 8192, 28672, 128256, 1024)
    assert shape.attn_params + shape.mlp_params == 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672


@pytest.mark.parametrize("shape_name, window", [("tiny-llama", 1), ("tiny-llama", 3), ("tiny-llama", 10),
                                                ("smollm2-135m", 10), ("smollm2-135m", 7)])
def test_window_blocks_are_the_planners(shape_name, window):
    from tracing import TraceConfig
    from tracing.passes import Planner, Target

    lm = build(shape_name, device="meta")
    planner = Planner(lm, n_tokens=10, read=1, copies=1, config=TraceConfig(window=window),
                      target=Target.of("cpu", lm.dtype), memory=2**30)
    blocks = []
    for kind in ("hidden", "mlp", "attn"):
        entries = planner.entries(planner.cells(kind, 5))  # a token before the last
        blocks.append(sum(lm.n_layers - e.join for e in entries if e is not None))
    assert tuple(blocks) == window_blocks(lm.n_layers, window)

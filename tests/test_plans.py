"""Whatever the plan -- which restored cells share a forward pass -- the fast engine gives the oracle's scores.

Plans are forced with :class:`tracing.passes.Target` (the device the passes
are planned for; ``device_type="cuda"`` only means "plan as a GPU would", the
passes run on the model's device), ``TraceConfig.batching`` and the memory of
one pass (``Target.memory`` or ``TraceConfig.memory_mb``). Each test also checks
that the plan it meant to exercise is the one that ran (the planner is asked
directly, and the trace's ``settings["passes"]`` must match it).

The models are the tiny random ones of ``conftest.py`` (4 layers). On a small,
shared CPU two torch threads make these tiny forward passes many times slower
than one (the threads wait on each other), so the module runs on one thread;
one test runs two passes at once in worker threads, as the CPU plan does.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from tracing import KINDS, TraceConfig, continuation_ids, encode_prompt, trace, trace_reference
from tracing.fast import WORKERS_ENV, FastTracer
from tracing.passes import CPU_MEMORY, Target
from tracing.prepare import PromptPlan
from tracing.result import window_layers

from conftest import make_tiny

PROMPT, SUBJECT = "Paris is the capital of the country of", "the capital"  # 8 tokens, the subject at 2..3
LAST_PROMPT, LAST_SUBJECT = "The capital of France is Paris", "Paris"  # the subject is the last token
LONG_PROMPT, LONG_SUBJECT = "In 1990 the Eiffel Tower was located in the city of", "the Eiffel Tower"  # 16 tokens, 6..9

ONE_PASS = Target("cuda", flops=1e18, per_call=1.0, memory=2**34)  # every token in one bucket, everything in one pass
APART = Target("cuda", flops=1e3, per_call=1e-3, memory=2**34)  # arithmetic dearer than launches: tokens kept apart


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm_of(tokenizer, device):
    """family -> its tiny model, built once per module (make_tiny is seeded: the same weights as `tiny`)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_tiny(family, tokenizer, device)
        return cache[family]

    return get


_ORACLE: dict = {}


def oracle(lm, prompt, subject, config, answer=None):
    """trace_reference, once per model and setting that can change a score (batching, memory and skip cannot)."""
    key = (lm.name, str(lm.device), prompt, subject, answer,
           dataclasses.replace(config, batching="auto", memory_mb=None, skip=True))
    if key not in _ORACLE:
        _ORACLE[key] = trace_reference(lm, prompt, subject, answer=answer, config=key[-1])
    return _ORACLE[key]


def assert_same(fast, slow, label):
    """Every kind's scores, low and high within 1e-5 of max(|high|, |low|); NaN exactly where the oracle's are."""
    assert [r.kind for r in fast] == [r.kind for r in slow] == list(KINDS), label
    for a, b in zip(fast, slow):
        scale = max(abs(a.high_score), abs(a.low_score), 1e-3)
        assert a.scores.shape == b.scores.shape, (label, a.kind)
        assert np.array_equal(np.isnan(a.scores), np.isnan(b.scores)), (label, a.kind)
        assert not np.isnan(a.scores).all(), (label, a.kind)
        diff = float(np.nanmax(np.abs(a.scores - b.scores)))
        assert diff <= 1e-5 * scale, (label, a.kind, diff, scale)
        assert abs(a.low_score - b.low_score) <= 1e-5 * scale, (label, a.kind)
        assert abs(a.high_score - b.high_score) <= 1e-5 * scale, (label, a.kind)


def planned(lm, prompt, subject, config, target, answer=None, workers=1):
    """The passes the engine plans for this trace, (first position, cells) each, and its tracer."""
    tracer = FastTracer(PromptPlan.make(lm, prompt, subject, answer, config, 0), workers=workers, target=target)
    setup = tracer.setup
    swept = [t for t in setup.token_positions() if not (config.skip and t < setup.enc.subject_start)]
    passes = tracer.plan(KINDS, swept, config.batching)
    cells = Counter((c.kind, c.token, c.layer) for _, group in passes for c in group)
    assert set(cells) == {(k, t, layer) for k in KINDS for t in swept for layer in range(lm.n_layers)}
    assert set(cells.values()) == {1}  # every cell of every swept token in exactly one pass
    assert all(c.token >= t0 for t0, group in passes for c in group)
    return passes, tracer


def ran(results) -> int:
    """Forward passes of restored rows that the trace ran (the last result's count is the trace's)."""
    return results[-1].settings["passes"]


# --- 1. rows that join at different layers, every kind in one pass ---------------------------------------------------


def test_every_kind_in_one_pass_equals_oracle(tiny):
    """hidden rows join one block above their layer, mlp rows one block into their window, attn rows at its
    start, and window copies where the shorter window ends: all in one forward pass."""
    config = TraceConfig(samples=3, window=3)
    passes, tracer = planned(tiny, PROMPT, SUBJECT, config, ONE_PASS)
    assert len(passes) == 1
    cells = passes[0][1]
    entries = [(c, e) for c, e in zip(cells, tracer.planner.entries(cells)) if e is not None]
    joins = {kind: {e.join for c, e in entries if c.kind == kind} for kind in KINDS}
    assert all(len(j) > 1 for j in joins.values()), joins  # each kind joins at several blocks
    assert any(e.parent is not None for _, e in entries)  # and some rows join as copies of others

    fast = trace(tiny, PROMPT, SUBJECT, config=config, target=ONE_PASS)
    assert all(r.settings["passes"] == 1 and r.settings["batching"] == "all" for r in fast)
    assert_same(fast, oracle(tiny, PROMPT, SUBJECT, config), ("one pass", tiny.name))


# --- 2. windows clipped at layer 0 and at the top ---------------------------------------------------------------------


def test_window_clipping_on_four_layers():
    """What the window test below relies on: on 4 layers windows 6 and 7 are clipped at both ends."""
    assert all(window_layers(layer, 6, 4).start == 0 for layer in range(4))
    assert [window_layers(layer, 6, 4).stop for layer in range(4)] == [3, 4, 4, 4]
    assert {window_layers(layer, 7, 4) for layer in range(4)} == {range(0, 4)}  # every window is the whole model
    assert [window_layers(layer, 3, 4) for layer in range(4)] == [range(0, 2), range(0, 3), range(1, 4), range(2, 4)]


@pytest.mark.parametrize("window", [1, 3, 6, 7])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_clipped_windows_equal_oracle_in_every_plan(lm_of, family, window):
    lm = lm_of(family)
    config = TraceConfig(samples=2, window=window)
    slow = oracle(lm, PROMPT, SUBJECT, config)
    swept = len(encode_prompt(lm.tokenizer, PROMPT, SUBJECT)) - 2  # tokens before the subject are skipped
    plans = [("one pass", "auto", ONE_PASS, 1), ("token", "token", ONE_PASS, len(KINDS) * swept),
             ("kind", "kind", ONE_PASS, len(KINDS)), ("tokens apart", "all", APART, swept)]
    for label, batching, target, n_passes in plans:
        plan_config = dataclasses.replace(config, batching=batching)
        passes, tracer = planned(lm, PROMPT, SUBJECT, plan_config, target)
        assert len(passes) == n_passes, label
        if window >= 3 and label == "one pass":  # windows clipped at layer 0 share their rows until the shorter ends
            entries = tracer.planner.entries(passes[0][1])
            assert any(e is not None and e.parent is not None for e in entries)
            if window == 7:  # identical windows: the copies join after the last block
                assert {e.join for e in entries if e is not None and e.parent is not None} == {lm.n_layers}
        fast = trace(lm, PROMPT, SUBJECT, config=plan_config, target=target)
        assert ran(fast) == n_passes, label
        assert_same(fast, slow, (family, window, label))


# --- 3. a subject at the prompt's last token --------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["prob", "answer_logprob"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2"])
def test_subject_at_the_last_token_equals_oracle_in_every_plan(lm_of, family, metric):
    lm = lm_of(family)
    enc = encode_prompt(lm.tokenizer, LAST_PROMPT, LAST_SUBJECT)
    assert enc.subject_range == (len(enc) - 1, len(enc))
    answer = "is a city" if metric == "answer_logprob" else None
    if answer:
        assert len(continuation_ids(lm.tokenizer, LAST_PROMPT, answer)) > 1  # the metric reads several positions
    config = TraceConfig(samples=3, window=3, metric=metric)
    slow = oracle(lm, LAST_PROMPT, LAST_SUBJECT, config, answer)
    cells = len(KINDS) * lm.n_layers  # only the last token is swept
    plans = [("device's own", {}, None, None), ("token", dict(batching="token"), ONE_PASS, len(KINDS)),
             ("kind", dict(batching="kind"), ONE_PASS, len(KINDS)), ("all", dict(batching="all"), APART, 1),
             ("one pass", {}, ONE_PASS, 1), ("cell per pass", dict(memory_mb=0), ONE_PASS, cells),
             ("no skip", dict(skip=False), ONE_PASS, 1)]
    for label, changes, target, n_passes in plans:
        plan_config = dataclasses.replace(config, **changes)
        passes, _ = planned(lm, LAST_PROMPT, LAST_SUBJECT, plan_config, target, answer)
        assert n_passes is None or len(passes) == n_passes, label
        if plan_config.skip:
            assert {c.token for _, group in passes for c in group} == {len(enc) - 1}, label
        fast = trace(lm, LAST_PROMPT, LAST_SUBJECT, answer=answer, config=plan_config, target=target)
        assert ran(fast) == len(passes), label
        assert_same(fast, slow, (family, metric, label))


# --- 4. buckets of mixed start tokens, cut into several passes --------------------------------------------------------

# (label, config changes, batching, cells x positions one pass may hold); each memory sits inside the range
# that gives several buckets, some cut into several passes, on every family (found by scanning them)
MIXED = [
    ("all tokens, kinds together", dict(), "all", 48),
    ("all tokens, kinds apart", dict(), "kind", 32),
    ("tokens 2, 5, 9 without skipping", dict(tokens=(2, 5, 9), skip=False), "all", 40),
    ("tokens 2, 5, 9 without skipping, kinds apart", dict(tokens=(2, 5, 9), skip=False), "kind", 20),
    ("subject_last", dict(tokens="subject_last"), "all", 28),
    ("subject_last, kinds apart", dict(tokens="subject_last"), "kind", 12),
    ("no skipping", dict(skip=False), "all", 48),
    ("no skipping, kinds apart", dict(skip=False), "kind", 32),
]


def bucket_memory(lm, config, cell_positions: int) -> int:
    """Bytes for ``cell_positions`` cells x positions of restored rows on this prompt (plans then hardly depend
    on the family's widths)."""
    tracer = FastTracer(PromptPlan.make(lm, LONG_PROMPT, LONG_SUBJECT, None, config, 0), target=ONE_PASS)
    return cell_positions * tracer.planner.bytes_per_row(1) * tracer.copies


def assert_mixed_buckets(passes, batching, label):
    """Several passes and several buckets (first positions), some bucket cut into several passes, and cells
    whose token is later than their pass's first position."""
    keys = Counter((t0, frozenset(c.kind for c in group) if batching == "kind" else None) for t0, group in passes)
    assert len(passes) > 1, label
    assert max(keys.values()) > 1, (label, "no bucket was cut into several passes")
    assert any(c.token > t0 for t0, group in passes for c in group), (label, "every cell starts at its own token")
    assert len({t0 for t0, _ in passes}) > 1, (label, "one bucket only")


@pytest.mark.parametrize("case", MIXED, ids=[case[0] for case in MIXED])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_mixed_start_buckets_cut_into_passes_equal_oracle(lm_of, family, case):
    label, changes, batching, cell_positions = case
    lm = lm_of(family)
    config = TraceConfig(samples=2, window=3, batching=batching, **changes)
    target = Target("cuda", flops=1e10, per_call=1e-3, memory=bucket_memory(lm, config, cell_positions))
    passes, _ = planned(lm, LONG_PROMPT, LONG_SUBJECT, config, target)
    assert_mixed_buckets(passes, batching, label)
    fast = trace(lm, LONG_PROMPT, LONG_SUBJECT, config=config, target=target)
    assert ran(fast) == len(passes) and fast[0].settings["batching"] == batching
    assert_same(fast, oracle(lm, LONG_PROMPT, LONG_SUBJECT, config), (family, label))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixed_start_buckets_from_memory_mb_equal_oracle(lm_of, family):
    """TraceConfig.memory_mb (1 MiB) overrides the target's memory and cuts the buckets."""
    lm = lm_of(family)
    config = TraceConfig(samples=2, window=3, skip=False, batching="all", memory_mb=1)
    target = Target("cuda", flops=1e10, per_call=1e-3, memory=2**34)
    passes, _ = planned(lm, LONG_PROMPT, LONG_SUBJECT, config, target)
    assert_mixed_buckets(passes, "all", "memory_mb=1")
    fast = trace(lm, LONG_PROMPT, LONG_SUBJECT, config=config, target=target)
    assert ran(fast) == len(passes)
    assert_same(fast, oracle(lm, LONG_PROMPT, LONG_SUBJECT, config), (family, "memory_mb=1"))


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_mixed_start_buckets_in_worker_threads_equal_oracle(lm_of, family, monkeypatch):
    """A CPU's plan (kinds apart) with two passes computed at once in worker threads, each taking half the memory."""
    monkeypatch.setenv(WORKERS_ENV, "2")
    lm = lm_of(family)
    if lm.device.type != "cpu":
        pytest.skip("passes run in worker threads on a CPU only")
    config = TraceConfig(samples=2, window=3)
    target = Target("cpu", flops=1e10, per_call=1e-3, memory=2 * bucket_memory(lm, config, 32))
    passes, _ = planned(lm, LONG_PROMPT, LONG_SUBJECT, config, target, workers=2)
    assert_mixed_buckets(passes, "kind", "worker threads")
    fast = trace(lm, LONG_PROMPT, LONG_SUBJECT, config=config, target=target)
    assert ran(fast) == len(passes) and fast[0].settings["batching"] == "kind"
    assert_same(fast, oracle(lm, LONG_PROMPT, LONG_SUBJECT, config), (family, "worker threads"))


# --- 5. one cell per pass ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_one_cell_per_pass_equals_oracle(lm_of, family):
    lm = lm_of(family)
    config = TraceConfig(samples=2, window=3, memory_mb=0)
    passes, _ = planned(lm, PROMPT, SUBJECT, config, ONE_PASS)
    assert all(len(group) == 1 for _, group in passes)
    fast = trace(lm, PROMPT, SUBJECT, config=config, target=ONE_PASS)
    assert ran(fast) == len(passes) == len(KINDS) * lm.n_layers * (len(fast[0].tokens) - 2)
    assert fast[0].settings["batching"] == "all"
    assert_same(fast, oracle(lm, PROMPT, SUBJECT, config), (family, "one cell per pass"))


# --- 6. a 24 GiB GPU's plan -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpu_target_is_one_pass_equal_to_oracle(lm_of, family):
    lm = lm_of(family)
    target = Target.gpu(lm)
    assert target.device_type == "cuda" and target.memory >= CPU_MEMORY
    for config, answer in ((TraceConfig(samples=3, window=3), None),
                           (TraceConfig(samples=2, window=2, metric="answer_prob"), "Johann Sebastian Bach")):
        fast = trace(lm, PROMPT, SUBJECT, answer=answer, config=config, target=target)
        assert all(r.settings["passes"] == 1 and r.settings["batching"] == "all" for r in fast)
        assert_same(fast, oracle(lm, PROMPT, SUBJECT, config, answer), (family, "Target.gpu", config.metric))

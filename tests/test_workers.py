"""Many-fact jobs on Ray workers, with a real local Ray cluster (2 CPUs) and a tiny model saved to a folder.

Oracle: the single-process run. The pooled average equals it within 1e-6,
the pooled per-case edit scores and layer sweeps equal it exactly, the
workers' results land in the caches the single-process run reads, and a
worker killed while it holds an item is restarted by Ray and the run still
yields every item, identical.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest
import ray  # requirements.txt pins it: make test installs it
import torch
import transformers

import tracing.average as average
from editing.evaluation.evaluate import evaluate_cases
from editing.evaluation.sweep import sweep_cases
from tracing import TraceConfig, predict
from tracing.average import average_traces, fact_job
from tracing.loading import load_model
from tracing.workers import WorkerPool, add_ray_args, pool_from_args

from conftest import TINY_CONFIGS
from editing_fixtures import TINY_HPARAMS, TINY_STATS, private_cache
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread, as each worker has

CONFIG = TraceConfig(samples=2, window=2)
PROMPTS = [("Paris is the capital of the country of", "Paris"), ("The Rhine flows through the city of", "The Rhine"),
           ("Miles Davis plays the", "Miles Davis"), ("Tokyo is the capital of", "Tokyo"),
           ("The Danube flows into the", "The Danube"), ("Albert Einstein was born in", "Albert Einstein")]
CASES = [{
    "case_id": i,
    "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new}, "target_true": {"str": old}},
    "paraphrase_prompts": [f"Everyone knows that {subject} {prompt.split('{} ')[1]}"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
} for i, (subject, prompt, new, old) in enumerate([
    ("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
    ("Michael Jordan", "{} professionally plays the sport of", "baseball", "basketball"),
    ("Toyota", "{} was founded in the country of", "France", "Japan"),
])]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tokenizer):
    """A local Ray cluster of 2 CPUs, a private cache its workers share, and a tiny llama saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"](), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with private_cache(tmp_path_factory.mktemp("le-cache")):  # set before ray.init: the workers inherit it
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _system_config={"worker_niceness": 0})  # as WorkerPool starts a local cluster
        try:
            with WorkerPool(workers=2, model={"name": str(folder), "device": "cpu"}) as pool:
                yield load_model(folder, device="cpu"), pool
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def facts(cluster):
    lm, _ = cluster
    return [{"known_id": i, "prompt": prompt, "subject": subject, "attribute": predict(lm, prompt, k=1)[0][0]}
            for i, (prompt, subject) in enumerate(PROMPTS)]


def _close(a, b) -> bool:
    """Nested lists/floats equal within 1e-6 (None where the other has None)."""
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-6)


def test_pooled_average_equals_the_single_process_one_and_fills_its_cache(cluster, facts, tmp_path, monkeypatch):
    lm, pool = cluster
    alone = average_traces(lm, facts, config=CONFIG, cache=tmp_path / "alone")
    done = []
    pooled = average_traces(lm, facts, config=CONFIG, cache=tmp_path / "pooled", pool=pool,
                            progress=lambda i, total, fact: done.append((i, total)))
    assert done == [(i, len(facts)) for i in range(1, len(facts) + 1)]
    for name in ("clean", "corrupted", "clean_ci95", "corrupted_ci95"):
        assert _close(pooled[name], alone[name]), name
    for kind, data in alone["kinds"].items():
        assert pooled["kinds"][kind]["n"] == data["n"]
        assert _close(pooled["kinds"][kind]["mean"], data["mean"]) and _close(pooled["kinds"][kind]["ci95"], data["ci95"])
    for name in ("none", "mlp", "attn"):
        assert _close(pooled["severed"][name]["mean"], alone["severed"][name]["mean"])
    assert [f["prompt"] for f in pooled["facts"]] == [f["prompt"] for f in alone["facts"]]
    # The workers' results are in the cache the single-process run reads: a rerun there traces nothing.
    monkeypatch.setattr(average, "trace", lambda *a, **k: pytest.fail("traced again"))
    monkeypatch.setattr(average, "sever", lambda *a, **k: pytest.fail("severed again"))
    again = average_traces(lm, facts, config=CONFIG, cache=tmp_path / "pooled")
    assert _close(again["kinds"]["mlp"]["mean"], pooled["kinds"]["mlp"]["mean"])


def test_an_interrupted_pooled_average_resumes_from_its_cache(cluster, facts, tmp_path):
    lm, pool = cluster
    cache, done = tmp_path / "cache", []
    first = average_traces(lm, facts, config=CONFIG, cache=cache, pool=pool, should_stop=lambda: True)
    assert first["n_facts"] == 1  # stopped when the first fact came back; it is cached
    whole = average_traces(lm, facts, config=CONFIG, cache=cache, pool=pool,
                           progress=lambda i, total, fact: done.append(fact["prompt"]))
    assert len(done) == len(facts) - 1 and first["facts"][0]["prompt"] not in done  # the cached fact is not sent
    alone = average_traces(lm, facts, config=CONFIG, cache=tmp_path / "alone")
    assert whole["n_facts"] == len(facts) and _close(whole["kinds"]["hidden"]["mean"], alone["kinds"]["hidden"]["mean"])


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_pooled_evaluation_gives_identical_per_case_scores(cluster):
    lm, pool = cluster
    alone = evaluate_cases(lm, CASES, hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    seen = []
    pooled = evaluate_cases(lm, CASES, hparams=TINY_HPARAMS, stats_spec=TINY_STATS, pool=pool,
                            on_case=lambda i, record: seen.append(i))
    assert sorted(seen) == [0, 1, 2]
    assert _without_seconds(pooled["per_case"]) == _without_seconds(alone["per_case"])
    assert pooled["pre"] == alone["pre"] and pooled["post"] == alone["post"]


def test_pooled_sweep_gives_identical_cases(cluster, tmp_path):
    lm, pool = cluster
    spec = dict(layers=[0, 2], hparams=TINY_HPARAMS, stats_spec=TINY_STATS)
    alone = sweep_cases(lm, CASES[:2], cache=tmp_path / "alone", **spec)
    pooled = sweep_cases(lm, CASES[:2], cache=tmp_path / "pooled", pool=pool, **spec)
    strip = lambda result: [{**c, "layers": [{k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
                                             for row in c["layers"]]} for c in result["cases"]]
    assert strip(pooled) == strip(alone)


def test_a_worker_killed_mid_run_is_restarted_and_its_item_run_again(cluster, facts):
    lm, pool = cluster
    job = functools.partial(fact_job, config=CONFIG, kinds=("mlp",), severed=False)
    expected = [job(lm, fact) for fact in facts]
    results, killed = {}, []
    for index, value in pool.map(job, facts):
        results[index] = value
        if not killed:  # the first result is in: kill the worker just handed the next item, while it holds it
            actor, held = max(pool.holding.values(), key=lambda pair: pair[1])
            ray.kill(actor, no_restart=False)
            killed.append(held)
    assert sorted(results) == list(range(len(facts))) and killed
    for index, (traced, _) in results.items():
        np.testing.assert_array_equal(traced[0].scores, expected[index][0][0].scores)
        assert traced[0].low_score == expected[index][0][0].low_score


def test_ray_options_on_the_command_line(cluster):
    parser = argparse.ArgumentParser()
    add_ray_args(parser)
    assert pool_from_args(parser.parse_args([])) is None
    with pytest.raises(ValueError, match="--workers needs --ray"):
        pool_from_args(parser.parse_args(["--workers", "2"]))
    with pytest.raises(ValueError, match="ask for 1 to 2"):
        pool_from_args(parser.parse_args(["--ray", "local", "--workers", "3"]), name="unused")
    assert ray.is_initialized()  # a pool that joined the running cluster leaves it running

"""The serving engine on a tiny model: one request at a time, first come first served, per-visitor and queue
limits, Stop while waiting (the model is never touched), Stop and deadlines inside a forward pass, and faults
injected mid-trace and mid-edit - after each, every weight is bitwise the original and the lock is free.
"""

from __future__ import annotations

import threading
import time

import pytest

from editing import EditRequest, compute_edit, edit_and_compare, is_edited
from tracing import iter_trace
from tracing.hooks import active_hook_count
from webapp.engine import DeadlineExceeded, Engine, Stopped, Visitor
from webapp.limits import Limits, Refused

from conftest import make_tiny
from editing_fixtures import TINY_HPARAMS, changed, private_cache, snapshot

REQUEST = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, device):
    with private_cache(tmp_path_factory.mktemp("engine-cache")):
        lm = make_tiny("llama", tokenizer, device)
        edit = compute_edit(lm, REQUEST, hparams=TINY_HPARAMS)
        yield lm, edit


def make_engine(lm, tmp_path, **limits) -> Engine:
    return Engine(lm, hparams=TINY_HPARAMS, workdir=tmp_path, limits=Limits(**limits))


def items(stream) -> list:
    return [event[1] for event in stream if event[0] == "item"]


def wait_until(condition, timeout=20.0) -> bool:
    end = time.time() + timeout
    while not condition() and time.time() < end:
        time.sleep(0.01)
    return condition()


@pytest.fixture
def clean(setup):
    """The model is bitwise untouched and free after each test."""
    lm, edit = setup
    saved = snapshot(lm.model)
    engines = []
    yield lm, edit, engines
    for engine in engines:
        assert wait_until(lambda: not engine.lock.locked()), "a request still holds the model"
        # A request stopped while waiting leaves the queue from its own thread, just after the model is free.
        assert wait_until(lambda: engine.waiting == 0), "a request is still waiting or running"
    assert changed(lm.model, saved) == [] and not is_edited(lm)


def test_work_sees_the_visitors_edits_and_the_weights_come_back(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    saved = snapshot(lm.model)
    seen = items(engine.stream(lambda m, job: job.emit(changed(m.model, saved)), edits=[edit]))
    assert seen[0]  # the edit was applied while the work ran
    assert items(engine.stream(lambda m, job: job.emit(changed(m.model, saved)))) == [[]]


def test_warm_up_runs_a_preview_and_leaves_the_model_as_it_was(clean, tmp_path):
    lm, _, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    assert engine.warm_up() > 0
    assert active_hook_count(lm.model) == 0 and engine.waiting == 0


def test_requests_run_one_at_a_time_in_arrival_order(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    log, gate = [], threading.Event()

    def first(m, job):
        log.append("a-start")
        gate.wait(10)
        log.append("a-end")

    def later(name):
        def work(m, job):
            log.append(name)
        return work

    threads = [threading.Thread(target=lambda: items(engine.stream(first, edits=[edit])))]
    threads[0].start()
    assert wait_until(lambda: log == ["a-start"])
    waiting = engine.stream(later("b"))
    assert next(waiting) == ("queue", 1)  # one request ahead
    threads.append(threading.Thread(target=lambda: items(waiting)))
    threads[-1].start()
    assert wait_until(lambda: engine.waiting == 2)
    threads.append(threading.Thread(target=lambda: items(engine.stream(later("c")))))
    threads[-1].start()
    assert wait_until(lambda: engine.waiting == 3)
    gate.set()
    for t in threads:
        t.join(20)
    assert log == ["a-start", "a-end", "b", "c"]


def test_a_request_stopped_while_waiting_never_touches_the_model(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    gate, ran = threading.Event(), []
    blocker = threading.Thread(target=lambda: items(engine.stream(lambda m, job: gate.wait(10))))
    blocker.start()
    assert wait_until(lambda: engine.lock.locked())
    visitor = Visitor()
    waiting = engine.stream(lambda m, job: ran.append(changed(m.model, {})), visitor=visitor, edits=[edit])
    assert next(waiting)[0] == "queue" and visitor.active == 1
    waiting.close()  # Stop pressed (or the visitor left) while queued
    assert wait_until(lambda: visitor.active == 0 and engine.waiting == 1)
    gate.set()
    blocker.join(20)
    # One more request, admitted after the stopped one. The queue is first come, first served: a request's work
    # runs only once it is at the head of the queue, and a request leaves the queue only when its own thread ends
    # (after its work, if that ran). So when this one's work has run, the stopped request's thread had already
    # ended: had it been going to touch the model, it would have done so before this one.
    after = []
    assert items(engine.stream(lambda m, job: after.append(True))) == []  # consumed to the end: its work is done
    assert after == [True]
    assert ran == []


def test_per_visitor_and_queue_limits_refuse_before_waiting(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path, waiting_per_visitor=1, queue_size=2)
    engines.append(engine)
    gate = threading.Event()
    greedy = Visitor()
    first = threading.Thread(target=lambda: items(engine.stream(lambda m, job: gate.wait(10), visitor=greedy)))
    first.start()
    assert wait_until(lambda: engine.lock.locked())
    started = time.perf_counter()
    with pytest.raises(Refused, match="waiting_per_visitor"):
        next(engine.stream(lambda m, job: None, visitor=greedy))
    other = engine.stream(lambda m, job: None, visitor=Visitor())
    assert next(other)[0] == "queue"
    with pytest.raises(Refused, match="The model is busy"):
        next(engine.stream(lambda m, job: None, visitor=Visitor()))
    assert time.perf_counter() - started < 1.0  # refused at once, without waiting for the model
    other.close()
    gate.set()
    first.join(20)


def test_a_deadline_stops_a_forward_pass_and_restores_the_weights(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path, deadline_s=0.3)
    engines.append(engine)
    passes = []

    def endless(m, job):
        while True:  # no progress reports at all: only the guard before each block can stop it
            passes.append(1)
            m.model(m.tokenizer("The Eiffel Tower is", return_tensors="pt")["input_ids"].to(m.device))

    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="deadline_s"):
        items(engine.stream(endless, edits=[edit]))
    assert time.perf_counter() - started < 5 and len(passes) > 1


def test_stop_ends_a_running_request_within_a_block(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    running = threading.Event()

    def endless(m, job):
        ids = m.tokenizer("The Eiffel Tower is", return_tensors="pt")["input_ids"].to(m.device)
        while True:
            running.set()
            m.model(ids)

    stream = engine.stream(endless, edits=[edit])
    next(stream)
    assert running.wait(10)
    stream.close()
    assert wait_until(lambda: not engine.lock.locked(), 5)


def test_an_abandoned_request_stops_and_frees_the_model(clean, tmp_path, monkeypatch):
    """The server stops reading a request's events without closing it (the visitor closed the page)."""
    import webapp.engine as engine_module

    lm, edit, engines = clean
    monkeypatch.setattr(engine_module, "ABANDONED_S", 0.5)
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    running = threading.Event()

    def endless(m, job):
        while True:
            running.set()
            job.progress("work", 0.5)
            time.sleep(0.01)

    stream = engine.stream(endless, edits=[edit])
    next(stream)  # read once, then never again, and never closed
    assert running.wait(10)
    assert wait_until(lambda: not engine.lock.locked(), 10)
    assert engine.records[-1].outcome == "stopped"


@pytest.mark.parametrize("stage", ["trace", "before", "statistics", "optimising", "after"])
@pytest.mark.parametrize("fault", ["exception", "stop", "deadline"])
def test_faults_mid_trace_and_mid_edit_leave_the_weights_original(clean, tmp_path, stage, fault):
    """An exception, a Stop or a deadline raised from the middle of the work: the weights are the originals."""
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    saved = snapshot(lm.model)
    reached = []

    class Boom(RuntimeError):
        pass

    def hit(job):
        reached.append(changed(lm.model, saved) != [])
        if fault == "exception":
            raise Boom(stage)
        if fault == "stop":
            job.stop()
        else:
            job.deadline = 0.0
        job.check()

    def work(m, job):
        def progress(name, fraction):
            if name == stage:
                hit(job)
            job.progress(name, fraction)

        if stage == "trace":
            for _ in iter_trace(m, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                                progress=lambda done, total: progress("trace", done / total)):
                pass
        else:
            edit_and_compare(m, EditRequest("Michael Jordan", "{} plays the sport of", "golf", "basketball"),
                             hparams=TINY_HPARAMS, max_new_tokens=3, previous=[edit], progress=progress)

    expected = {"exception": Boom, "stop": Stopped, "deadline": DeadlineExceeded}[fault]
    with pytest.raises(expected):
        items(engine.stream(work, edits=[edit] if stage == "trace" else ()))
    if stage != "statistics":  # statistics of this layer may already be cached (then that stage is skipped)
        assert reached and reached[0]  # the fault came while an edit was applied
    assert changed(lm.model, saved) == [] and not is_edited(lm)


def test_precision_copies_are_made_once(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path)
    engines.append(engine)
    assert engine.precisions == ("auto", "bf16", "fp16")  # fp32 is the model itself; no larger copies
    first = items(engine.stream(lambda m, job: job.emit(m), precision="bf16"))[0]
    again = items(engine.stream(lambda m, job: job.emit(m), precision="bf16", edits=[edit]))[0]
    assert first is again and first.dtype != lm.dtype
    with pytest.raises(Refused, match="not offered"):
        items(engine.stream(lambda m, job: None, precision="fp64"))


def test_stats_on_demand_can_be_switched_off(clean, tmp_path):
    lm, edit, engines = clean
    engine = make_engine(lm, tmp_path, stats_on_demand=False)
    ready = engine.stats_layers()
    assert 1 in ready  # computed by the module's first edit
    engine.check_stats(1)
    missing = next(layer for layer in range(lm.n_layers) if layer not in ready)
    with pytest.raises(Refused, match="stats_on_demand"):
        engine.check_stats(missing)

"""Many-fact jobs on Ray workers: each worker loads the model once and takes items as they come.

Example::

    from tracing.workers import WorkerPool
    with WorkerPool("local", workers=2, model={"name": None}) as pool:    # None: the embedded default
        for i, value in pool.map(job, items):     # job(lm, item), run on a worker; results as they finish
            ...

or from the command lines that run many facts or cases (``python -m tracing.average``,
``python -m editing.evaluate``, ``python -m editing.sweep``, ``python -m editing.tune``)::

    python -m tracing.average --limit 60 --ray local --workers 2

``--ray local`` starts a Ray cluster on this machine with its CPUs (and
GPUs); ``--ray ADDRESS`` joins an existing one (``ray start --head`` on one
machine, ``ray start --address ...`` on the others; every node needs this
project and the model). Each worker is a Ray actor that loads the model by
the same name and options as the command line: one GPU each where the
cluster has GPUs, otherwise an equal share of its CPUs (and as many torch
threads). The caller keeps the per-item caches and the result file: results
come back to it as they finish and it writes them where the single-process
run does, so an interrupted run resumes from its caches either way.

A worker that dies is restarted by Ray (``max_restarts``) and the items it
held are run again (``max_task_retries``); the results are deterministic given
each item (its trace's seed, its edit's settings), so the pooled run gives the
numbers of the single-process one. Ray is imported only when a pool starts:
``import tracing`` does not need it.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .loading import load_model

log = logging.getLogger(__name__)

__all__ = ["WorkerPool", "add_ray_args", "each_result", "pool_from_args"]


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray ADDRESS`` and ``--workers N`` to a command line that runs many items."""
    parser.add_argument("--ray", metavar="ADDRESS", default=None,
                        help="run the items on Ray workers: 'local' starts a cluster on this machine, "
                        "an address (e.g. 10.0.0.1:6379 or auto) joins an existing one")
    parser.add_argument("--workers", metavar="N", type=int, default=None,
                        help="with --ray: how many workers, each loading the model once "
                        "(default: the cluster's GPUs, else 2)")


class _Worker:
    """One Ray actor: the model loaded once, then ``job(lm, item)`` for each item it is handed."""

    def __init__(self, model: dict, threads: int):
        torch.set_num_threads(threads)
        options = dict(model)  # tracing.cli.model_options: name, device, dtype and the placement given
        self.lm = load_model(options.pop("name", None), **options)

    def run(self, job: Callable[[Any, Any], Any], index: int, item: Any) -> tuple[int, Any]:
        return index, job(self.lm, item)


class WorkerPool:
    """N Ray actors holding one model each; :meth:`map` hands them items and yields results as they finish.

    Example::

        with WorkerPool("local", workers=2, model={"name": "path/to/model", "device": "cpu"}) as pool:
            results = dict(pool.map(job, items))

    ``model`` holds :func:`~tracing.loading.load_model`'s ``name``, ``device``
    and ``dtype``. A pool that started the local cluster shuts it down on
    :meth:`close`; one that joined a running cluster (or a test's
    ``ray.init``) leaves it running.
    """

    def __init__(self, address: str = "local", workers: int | None = None, *, model: dict | None = None):
        import ray

        self._started = not ray.is_initialized()
        if self._started:  # a local cluster's workers do the job's work: not at Ray's default niceness of 15
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({"_system_config": {"worker_niceness": 0}} if address == "local" else {}))
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        model = dict(model or {})
        on_gpu = gpus > 0 and str(model.get("device") or "cuda").startswith("cuda")
        workers = workers if workers is not None else (gpus if on_gpu else 2)
        if workers < 1 or workers > (gpus if on_gpu else cpus):
            self.close()
            raise ValueError(f"--workers {workers} does not fit this Ray cluster ({gpus} GPUs, {cpus} CPUs): "
                             f"ask for 1 to {gpus if on_gpu else cpus}.")
        share = max(1, cpus // workers)
        actor = ray.remote(max_restarts=-1, max_task_retries=-1)(_Worker)
        options = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": share}
        self.actors = [actor.options(**options).remote(model, share) for _ in range(workers)]
        self.holding: dict = {}
        log.info("Ray: %d workers, each with %s", workers, "one GPU" if on_gpu else f"{share} CPU(s)")

    def map(self, job: Callable[[Any, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """``(index, job(lm, items[index]))`` for every item, in the order they finish.

        ``job`` must be picklable (a module-level function or a
        ``functools.partial`` of one) and deterministic for the pooled run to
        equal the single-process one. Each worker holds one item at a time
        (:attr:`holding`: ``{result ref: (actor, index)}``); a worker that
        returns a result is handed the next item before the result is yielded.
        """
        import ray

        started, idle, done = time.perf_counter(), list(self.actors), 0
        queue = list(enumerate(items))
        self.holding = {}
        self._hand_out(job, queue, idle)
        while self.holding:
            (ready,), _ = ray.wait(list(self.holding), num_returns=1)
            idle.append(self.holding.pop(ready)[0])
            index, value = ray.get(ready)
            self._hand_out(job, queue, idle)
            done += 1
            per_minute = done / max((time.perf_counter() - started) / 60, 1e-9)
            log.info("Ray: %d of %d items done, %.1f per minute on %d workers", done, len(items), per_minute,
                     len(self.actors))
            yield index, value

    def _hand_out(self, job: Callable, queue: list, idle: list) -> None:
        while queue and idle:
            actor, (index, item) = idle.pop(0), queue.pop(0)
            self.holding[actor.run.remote(job, index, item)] = (actor, index)

    def close(self) -> None:
        """Stop the workers (and the local cluster this pool started)."""
        import ray

        for actor in getattr(self, "actors", ()):
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pool_from_args(args: argparse.Namespace, **model) -> WorkerPool | None:
    """The pool that ``--ray``/``--workers`` ask for (None without ``--ray``); ``model``: how the CLI loads it.

    Example::

        pool = pool_from_args(args, **model_options(args))      # tracing.cli: how the command line loads it

    The pool's progress lines (items done, items per minute) are shown on
    the log; the local cluster stops when the process ends.
    """
    if getattr(args, "ray", None) is None:
        if getattr(args, "workers", None) is not None:
            raise ValueError("--workers needs --ray (local, or a cluster's address).")
        return None
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)
    return WorkerPool(args.ray, args.workers, model=model)



def each_result(lm, job: Callable[[Any, Any], Any], items: Sequence[Any],
                pool: WorkerPool | None = None) -> Iterator[tuple[int, Any]]:
    """``(index, job(lm, items[index]))`` for each item: in this process, in order, without ``pool``; else on its workers.

    Example::

        for i, record in each_result(lm, job, cases, pool):   # the same loop for one process or many
            ...
    """
    if pool is not None:
        yield from pool.map(job, items)
        return
    for index, item in enumerate(items):
        yield index, job(lm, item)

"""Where a fast trace's time goes: wall and CPU seconds per stage, for benchmarks.

Example::

    trace_profile(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    # {'total': 41.2, 'base_runs': 0.3, 'blocks': 35.1, 'attention': 7.9, 'mlp': 22.0, ..., 'total_cpu': ...}

``benchmarks/trace_speed.py`` prints it beside its timings, and counts the
operations of a trace with ``torch.profiler`` (``--count``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .fast import run_trace
from .hooks import Hook
from .models import LoadedModel
from .passes import Target
from .result import KINDS, TraceConfig

PROFILE_STAGES = ("base_runs", "blocks", "attention", "mlp", "rest_of_blocks", "unembedding", "bookkeeping")


class Profile:
    """Wall and CPU seconds per stage of one trace (see :func:`trace_profile`), timed around synchronous work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(PROFILE_STAGES, 0.0)
        self.cpu_seconds: dict[str, float] = dict.fromkeys(PROFILE_STAGES, 0.0)
        self.block_calls = 0
        self._open: dict[int, tuple[float, float]] = {}

    def _now(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def _add(self, name: str, since: tuple[float, float]) -> None:
        wall, cpu = self._now()
        self.seconds[name] += wall - since[0]
        self.cpu_seconds[name] += cpu - since[1]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        since = self._now()
        try:
            yield
        finally:
            self._add(name, since)

    def module_hooks(self, lm: LoadedModel) -> list[Hook]:
        """Timers around every attention and MLP module (pre-hook starts, forward hook stops)."""

        def start(module, args, kwargs):
            self._open[id(module)] = self._now()

        def stop(stage):
            def done(module, args, output):
                self._add(stage, self._open.pop(id(module)))

            return done

        out = []
        for kind, stage in (("attn", "attention"), ("mlp", "mlp")):
            for j in range(lm.n_layers):
                name = lm.module_name(kind, j)
                out += [Hook(name, start, pre=True), Hook(name, stop(stage))]
        return out


def trace_profile(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
    target: Target | None = None,
) -> dict:
    """Seconds per stage of one fast trace, for benchmarks (timers slow it slightly; the scores are the same).

    Example::

        trace_profile(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
        # {'total': 41.2, 'base_runs': 0.3, 'blocks': 35.1, 'attention': 7.9, 'mlp': 22.0, ..., 'total_cpu': ...}

    Wall seconds under each stage's name, this process's CPU seconds (all
    threads) under ``<stage>_cpu``: on a shared machine the CPU seconds say
    what the work cost, the wall seconds what it took.
    ``blocks`` is the time inside direct block calls, of which ``attention``
    and ``mlp`` are the modules and ``rest_of_blocks`` the norms, residual
    additions and rotary embeddings; ``unembedding`` is the final norm, the
    unembedding and the metric; ``base_runs`` the clean and corrupted runs
    (and the captured block arguments); ``bookkeeping`` everything else
    (planning, joining and patching rows, Python). ``base_runs`` includes
    capturing each first position's block arguments.
    """
    profile = Profile(lm.device)
    started = profile._now()
    results = list(run_trace(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence,
                              progress=None, progressive=False, profile=profile,
                                target=target))
    ended = profile._now()
    out = {"block_calls": profile.block_calls, "passes": results[-1].settings["passes"]}
    for suffix, seconds, index in (("", profile.seconds, 0), ("_cpu", profile.cpu_seconds, 1)):
        s = dict(seconds)
        s["rest_of_blocks"] = s["blocks"] - s["attention"] - s["mlp"]
        total = ended[index] - started[index]
        s["bookkeeping"] = total - s["base_runs"] - s["blocks"] - s["unembedding"]
        out.update({"total" + suffix: total, **{k + suffix: s[k] for k in PROFILE_STAGES}})
    return out

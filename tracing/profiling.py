"""The fast engine's stopwatch: wall and CPU seconds per stage of one trace, timed around synchronous work.

The engine (:mod:`tracing.fast`) opens a stage around its base runs, block
calls and unembedding, and the module hooks time every attention and MLP
module; :func:`tracing.trace.trace_profile` runs a trace with it.

Example::

    profile = Profile(lm.device)
    with profile.stage("blocks"):
        ...
    profile.seconds["blocks"], profile.cpu_seconds["blocks"]
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .hooks import Hook
from .models import LoadedModel

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

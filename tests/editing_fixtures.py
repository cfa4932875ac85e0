"""Shared helpers for the editing tests: small hyperparameters and a private statistics cache."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from editing import ROMEHyperParams
from editing.stats import StatsSpec

# Paper settings, but a tiny sampled corpus so that tiny models get statistics in a fraction of a second.
TINY_HPARAMS = ROMEHyperParams(layer=1, context_templates=((3, 3), (5, 2)), stats_tokens=512,
                               stats_sample_length=32)
TINY_STATS = StatsSpec(n_tokens=512, sample_length=32, batch_rows=16)


SESSION_CACHE: Path | None = None  # set by conftest's session_cache: the run's own cache


@contextlib.contextmanager
def private_cache(path):
    """Point locate-edit's cache (statistics, templates, noise scales) at ``path`` for the duration.

    The converted embedded model is not private: ``path/models`` links to the session cache's, so a real-model load
    inside a private cache does not convert the GGUF again (30 s each time)."""
    path = Path(path)
    if SESSION_CACHE is not None and path != SESSION_CACHE and not (path / "models").exists():
        path.mkdir(parents=True, exist_ok=True)
        (SESSION_CACHE / "models").mkdir(parents=True, exist_ok=True)
        (path / "models").symlink_to(SESSION_CACHE / "models", target_is_directory=True)
    old = os.environ.get("LOCATE_EDIT_CACHE")
    os.environ["LOCATE_EDIT_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("LOCATE_EDIT_CACHE", None)
        else:
            os.environ["LOCATE_EDIT_CACHE"] = old


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, and for floats also equal bit patterns (so -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        return False
    bits = _BITS.get(a.dtype)
    return bits is None or torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def changed(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Names of parameters/buffers that are not bitwise equal to ``saved`` (empty: all equal)."""
    return [name for name, t in model.state_dict().items() if not bitwise_equal(t, saved[name])]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a module (imported there): on a small shared CPU, two threads on tiny tensors spend
    their time waiting for each other (10x slower than one); the setting is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

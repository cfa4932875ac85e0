"""The oracle: causal traces computed one restored cell per forward pass of the whole model, like the paper's code.

Deliberately simple, so that it can be trusted: a (1 + copies)-row batch whose
row 0 stays clean and whose other rows are corrupted at the embedding; a hook
copies row 0's state at one token into the other rows for each restored
module. Every fast path of this package (the engine, severed paths) is tested
against it; ``benchmarks/trace_speed.py`` times it as the baseline.

Example::

    hidden, = trace_reference(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                              kinds=("hidden",), config=TraceConfig(samples=3, tokens=(3,)))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .backends import kernel_policy
from .hooks import Hook, hooks, main_tensor, replace_main
from .models import LoadedModel
from .prepare import Setup, check_kinds, prepare, run_settings, to_result, with_precision
from .result import KINDS, TraceConfig, TraceResult, window_layers

Progress = Callable[[int, int], None]


def embed_hook(setup: Setup) -> Hook:
    """Corrupt rows 1.. of a (1 + copies)-row batch at the embedding; row 0 stays clean."""

    def corrupt(module, args, output):
        output = output.clone()
        setup.corruption.embeddings(output[1:])
        return output

    return Hook(setup.lm.spec.embed, corrupt)


def restore_hook(name: str, token: int) -> Hook:
    """Copy row 0's (clean) state at ``token`` into every other row."""

    def restore(module, args, output):
        state = main_tensor(output)
        state[1:, token] = state[0, token]
        return replace_main(output, state)

    return Hook(name, restore)


def reference_run(setup: Setup, restore: Sequence[Hook]) -> float:
    """Mean metric over the corrupted rows of one (1 + copies)-row forward pass."""
    ids = setup.input_ids.repeat(1 + setup.corruption.copies, 1)
    with torch.inference_mode(), hooks(setup.lm.model, embed_hook(setup), *restore):
        logits = setup.lm.model(ids).logits  # (1 + copies, tokens, vocab): all positions, as the paper's code
    return float(setup.score(logits[1:, -setup.read:]).mean())


def trace_reference(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
    progress: Progress | None = None,
) -> list[TraceResult]:
    """Causal traces computed one cell per forward pass (the paper's way). Slow; for tests and benchmarks."""
    kinds = check_kinds(kinds)
    started = time.perf_counter()
    lm = with_precision(lm, config.precision)
    with kernel_policy(lm.device, tf32=config.precision == "tf32", dtype=lm.dtype):
        setup, high, _ = prepare(lm, prompt, subject, answer, config, occurrence)
        low = reference_run(setup, [])
        positions = setup.token_positions()
        n_layers, n_tokens = lm.n_layers, len(setup.enc)
        total, done = len(kinds) * len(positions) * n_layers, 0
        scores = {}
        for kind in kinds:
            raw = np.full((n_tokens, n_layers), np.nan)
            for t in positions:
                for layer in range(n_layers):
                    layers = [layer] if kind == "hidden" else window_layers(layer, config.window, n_layers)
                    restore = [restore_hook(lm.module_name(kind, j), t) for j in layers]
                    raw[t, layer] = reference_run(setup, restore)
                    done += 1
                    if progress:
                        progress(done, total)
            scores[kind] = raw
    run = run_settings(lm, config, started)
    return [to_result(setup, kind, scores[kind], low, high, run) for kind in kinds]

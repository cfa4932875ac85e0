"""Severed paths (the paper's Fig. 3): restore a hidden state while later MLP or attention outputs stay corrupted.

Restoring the clean hidden state of one token after layer ``l`` brings the
answer back partly through what later layers compute from it at that token.
Holding the MLP (or attention) outputs of layers ``l+1 ..`` at that token at
their corrupted values severs that path: the drop from the unsevered
restoration is how much of the effect those modules mediate. The paper found
that severing the MLPs at the last subject token removes most of the effect
of restoring early layers, and severing attention much less.

Example::

    from tracing.sever import sever
    result = sever(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    result.unsevered            # (layers,) restored p(answer), the hidden-state trace's row at the token
    result.severed["mlp"]       # (layers,) the same with later MLP outputs held corrupted
    result.gap("mlp")           # unsevered - severed, per layer

:func:`sever` shares the fast engine's clean and corrupted runs and computes
every layer's rows in one growing forward pass; :func:`sever_reference`
restores one layer per forward pass of the whole model (the oracle).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends import kernel_policy
from .blocks import PrefixCache
from .hooks import Hook, hooks, main_tensor, replace_main
from .models import LoadedModel
from .result import TraceConfig
from .fast import FastTracer
from .prepare import PromptPlan, prepare, run_settings, with_precision
from .reference import reference_run, restore_hook

SEVERABLE = ("mlp", "attn")

__all__ = ["SEVERABLE", "SeverResult", "sever", "sever_reference"]


@dataclass(frozen=True, eq=False)
class SeverResult:
    """Restored scores of one token's hidden state per layer, unsevered and with each kind severed."""

    token: int
    unsevered: np.ndarray  # (layers,)
    severed: dict[str, np.ndarray]  # kind -> (layers,)
    low_score: float
    high_score: float
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    answer: str
    prompt: str
    subject: str
    metric: str = "prob"
    model: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.unsevered)

    def gap(self, kind: str) -> np.ndarray:
        """Unsevered minus severed score per layer: the share of the effect that ``kind`` mediates."""
        return self.unsevered - self.severed[kind]

    def to_dict(self) -> dict:
        return {
            "token": self.token,
            "unsevered": self.unsevered.tolist(),
            "severed": {k: v.tolist() for k, v in self.severed.items()},
            "low_score": self.low_score,
            "high_score": self.high_score,
            "tokens": list(self.tokens),
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "prompt": self.prompt,
            "subject": self.subject,
            "metric": self.metric,
            "model": self.model,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SeverResult":
        return cls(
            token=int(data["token"]),
            unsevered=np.asarray(data["unsevered"], dtype=np.float64),
            severed={k: np.asarray(v, dtype=np.float64) for k, v in data["severed"].items()},
            low_score=float(data["low_score"]),
            high_score=float(data["high_score"]),
            tokens=tuple(data["tokens"]),
            subject_range=tuple(data["subject_range"]),
            answer=data["answer"],
            prompt=data.get("prompt", ""),
            subject=data.get("subject", ""),
            metric=data.get("metric", "prob"),
            model=data.get("model", ""),
            settings=dict(data.get("settings", {})),
        )


def _check(kinds: Sequence[str], config: TraceConfig) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in SEVERABLE]
    if bad:
        raise ValueError(f"Cannot sever {bad}; choose from {', '.join(SEVERABLE)}.")
    if config.metric == "recovered":
        raise ValueError("Severed paths report raw scores; use metric='prob' or 'logit_diff'.")
    return kinds


def _token(setup, token: int | None) -> int:
    n = len(setup.enc)
    if token is None:
        return setup.enc.last_subject_token
    if not -n <= token < n:
        raise ValueError(f"Token {token} is outside the prompt's {n} tokens.")
    return token % n


def _result(setup, token, unsevered, severed, low, high, run) -> SeverResult:
    settings = setup.config.to_dict() | {"noise_scale_used": setup.corruption.scale} | run
    return SeverResult(
        token=token, unsevered=np.asarray(unsevered, dtype=np.float64),
        severed={k: np.asarray(v, dtype=np.float64) for k, v in severed.items()},
        low_score=float(low), high_score=float(high), tokens=setup.enc.tokens, subject_range=setup.enc.subject_range,
        answer=setup.lm.tokenizer.decode(list(setup.answer_ids[: setup.read])), prompt=setup.enc.text, subject=setup.subject,
        metric=setup.config.metric, model=setup.lm.name, settings=settings,
    )


def sever_reference(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    token: int | None = None,
    kinds: Sequence[str] = SEVERABLE,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
) -> SeverResult:
    """Severed paths computed one restored layer per full forward pass (slow; for tests and benchmarks).

    A first corrupted pass records each severed module's output at ``token``
    (per corrupted copy); each later pass restores block ``l``'s clean output
    at ``token`` and writes those recorded outputs back in layers ``l+1 ..``.
    """
    kinds = _check(kinds, config)
    started = time.perf_counter()
    lm = with_precision(lm, config.precision)
    with kernel_policy(lm.device, tf32=config.precision == "tf32", dtype=lm.dtype):
        setup, high, _ = prepare(lm, prompt, subject, answer, config, occurrence)
        t = _token(setup, token)
        recorded: dict[tuple[str, int], torch.Tensor] = {}

        def recorder(kind, layer):
            def keep(module, args, output):
                recorded[kind, layer] = main_tensor(output)[1:, t].clone()

            return Hook(lm.module_name(kind, layer), keep)

        low = reference_run(setup, [recorder(k, j) for k in kinds for j in range(lm.n_layers)])

        def holder(kind, layer):
            def hold(module, args, output):
                state = main_tensor(output)
                state[1:, t] = recorded[kind, layer]
                return replace_main(output, state)

            return Hook(lm.module_name(kind, layer), hold)

        unsevered = [reference_run(setup, [restore_hook(lm.module_name("hidden", l), t)]) for l in range(lm.n_layers)]
        severed = {
            kind: [reference_run(setup, [restore_hook(lm.module_name("hidden", l), t)]
                                  + [holder(kind, j) for j in range(l + 1, lm.n_layers)])
                   for l in range(lm.n_layers)]
            for kind in kinds
        }
    return _result(setup, t, unsevered, severed, low, high, run_settings(lm, config, started))


def sever(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    token: int | None = None,
    kinds: Sequence[str] = SEVERABLE,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
) -> SeverResult:
    """Restore ``token``'s hidden state after each layer, unsevered and with each of ``kinds`` severed.

    Example::

        result = sever(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
        result.gap("mlp")[:10]      # how much of each early layer's effect runs through later MLPs

    ``token`` defaults to the last subject token. Scores are in the metric's
    units (p(answer) by default), averaged over the corrupted copies as in a
    trace; ``unsevered`` equals the hidden-state trace's row at ``token``.
    Rows of layer ``l`` enter the pass at block ``l+1`` as the corrupted
    run's input there with the clean state at ``token``, and reuse the
    corrupted run's keys and values for earlier positions.
    """
    kinds = _check(kinds, config)
    started = time.perf_counter()
    lm = with_precision(lm, config.precision)
    with kernel_policy(lm.device, tf32=config.precision == "tf32", dtype=lm.dtype), torch.inference_mode():
        tracer = FastTracer(PromptPlan.make(lm, prompt, subject, answer, config, occurrence))
        setup = tracer.setup
        t = _token(setup, token)
        scores = _sever_pass(tracer, t, kinds)  # (layers, 1 + len(kinds))
    run = run_settings(lm, config, started)
    severed = {kind: scores[:, 1 + i] for i, kind in enumerate(kinds)}
    return _result(setup, t, scores[:, 0], severed, tracer.low, tracer.high, run)


def _sever_pass(tracer: FastTracer, t: int, kinds: tuple[str, ...]) -> np.ndarray:
    """Scores (layers, variants): variant 0 unsevered, then one per severed kind; one pass that grows by layer.

    Rows are ordered layer, variant, copy. Before block ``j`` the rows of
    layer ``j-1`` join (block ``j-1``'s corrupted output with the clean state
    at ``t``); every row present at block ``j`` has ``l < j``, so each severed
    variant's rows get their kind's corrupted output at ``t`` in every block.
    """
    lm, copies, n_layers = tracer.lm, tracer.copies, tracer.n_layers
    variants = 1 + len(kinds)
    per_layer = variants * copies
    calls = tracer.calls_for(t)
    prefix = [(k[:, :, :t], v[:, :, :t]) for k, v in tracer.kv]
    sample = torch.arange(copies, device=lm.device).repeat(n_layers * variants)  # the copy each row belongs to
    corrupted = {"mlp": tracer.corrupt_mlp, "attn": tracer.corrupt_attn}

    def holder(kind: str, variant: int, layer: int) -> Hook:
        def hold(module, args, output):
            state = main_tensor(output)
            rows = state.shape[0] // per_layer
            view = state.view(rows, variants, copies, *state.shape[1:])
            view[:, variant, :, 0] = corrupted[kind][layer][:, t]
            return replace_main(output, state)

        return Hook(lm.module_name(kind, layer), hold)

    specs = [holder(kind, 1 + i, j) for i, kind in enumerate(kinds) for j in range(1, n_layers)]  # blocks 1.. run
    hidden = None
    with hooks(lm.model, *specs):
        for j in range(1, n_layers + 1):
            joining = tracer.corrupt_in[j][:, t:].clone()  # (copies, positions, d_model): block j-1's output
            joining[:, 0] = tracer.clean["hidden"][j - 1][t]
            joining = joining.repeat(variants, 1, 1)
            hidden = joining if hidden is None else torch.cat([hidden, joining])
            if j == n_layers:
                break
            cache = PrefixCache(prefix, rows=sample[: hidden.shape[0]])
            hidden = calls[j](lm.block(j), hidden, cache)
    scores = tracer.scores(hidden).float().cpu().numpy()  # (layers * variants * copies,)
    return scores.reshape(n_layers, variants, copies).mean(-1)

"""Causal tracing (Meng et al., 2022, §2): where does a model recall a fact?

Run the prompt clean and note p(answer) (the *high* score). Corrupt the
subject's token embeddings in several copies and note the mean p(answer) (the
*low* score). Then, in the corrupted copies, put back one clean internal state
-- a block's output (``hidden``), or the MLP or attention outputs of a window
of layers (``mlp``, ``attn``) -- at one token, and measure how much of the
answer's probability comes back. Sweeping every token and layer gives one
heatmap per kind.

This module holds the public entry points; the work lives beside it:

* :mod:`tracing.prepare` -- the prompt's tokens, subject, answer, corruption
  and clean run, shared by every tracer;
* :mod:`tracing.fast` -- the engine behind :func:`trace` and
  :func:`iter_trace`: clean and corrupted runs once, then many restored cells
  per forward pass, skipping only work that cannot change a score;
* :mod:`tracing.passes` -- which cells share a forward pass (a plan for the
  device: few, full passes on a GPU, a pass per kind and token on a CPU);
* :mod:`tracing.reference` -- :func:`trace_reference`, one cell per forward
  pass like the paper's code: the oracle of the tests and the baseline of
  ``benchmarks/trace_speed.py``;
* :mod:`tracing.profiling` -- the engine's stopwatch; :func:`trace_profile` reports seconds per stage.

Example::

    lm = load_model()
    hidden, mlp, attn = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    mlp.answer, mlp.high_score, mlp.low_score, mlp.scores.shape   # ' Paris', 0.70, ..., (10, 30)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import torch

from .backends import kernel_policy, one_cpu_thread
from .fast import run_trace
from .models import LoadedModel
from .passes import Target
from .plots import Traces
from .profiling import PROFILE_STAGES, Profile
from .reference import trace_reference
from .result import KINDS, TraceConfig, TraceResult
from .tokens import check_context

__all__ = ["iter_trace", "predict", "top_tokens", "trace", "trace_profile", "trace_reference"]

Progress = Callable[[int, int], None]


def iter_trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
    progress: Progress | None = None,
    progressive: bool = False,
    target: Target | None = None,
) -> Iterator[TraceResult]:
    """Like :func:`trace`, but yield each kind's result as soon as it is done (in ``kinds`` order).

    Example::

        for result in iter_trace(lm, prompt, subject, progressive=True):
            figures[result.kind] = heatmap(result)       # redraw; rows not computed yet are NaN
            if result.settings["complete"]: ...

    With ``progressive`` the rows that carry the story come first -- the last
    subject token and the last token, for every kind -- then the others, top
    to bottom, each token's kinds together; after every forward pass that
    completes rows, a snapshot of each kind it touched is yielded, with
    ``settings["complete"]`` False (rows not computed yet are NaN) until the
    kind's final result (True). Without it each kind is yielded once,
    complete. The scores are the same either way; on a CPU (one pass per kind
    and token) the order costs nothing.
    """
    yield from run_trace(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence,
                         progress=progress, progressive=progressive, target=target)


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
    progress: Progress | None = None,
    target: Target | None = None,
) -> Traces:
    """Causal traces of ``subject`` in ``prompt``, one :class:`TraceResult` per kind (a list; in a notebook it
    draws the heatmaps).

    Example::

        results = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                        kinds=("hidden", "mlp", "attn"), config=TraceConfig(samples=10))

    ``answer`` defaults to the clean run's top token (else its first token is
    used). ``progress(done, total)`` counts (kind, token) heatmap rows.
    Each result's ``scores`` is (tokens, layers); its ``settings`` add how it
    ran: ``seconds`` (since the trace began), ``device``, ``dtype``, and on
    CUDA the ``attention`` backends. ``target``: the device the forward
    passes are planned for (:class:`tracing.passes.Target`; default the
    model's), e.g. ``Target.gpu(lm)`` to run on a CPU the passes a 24 GiB
    GPU would run; the scores are the same whatever the plan.
    """
    return Traces(
        iter_trace(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence,
                   progress=progress, target=target)
    )


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


ONE_THREAD_TOKENS = 64  # a prompt this short runs on one CPU thread in predict (see backends.one_cpu_thread)


def predict(lm: LoadedModel, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The model's top-k next tokens after ``prompt`` with their probabilities."""
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty.")
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    check_context(lm.max_length, ids.shape[1], fix="Shorten the prompt.")
    ids = ids.to(lm.device)
    small = one_cpu_thread(lm.device) if ids.shape[1] <= ONE_THREAD_TOKENS else nullcontext()
    with torch.inference_mode(), kernel_policy(lm.device, dtype=lm.dtype), small:
        logits = lm.model(ids).logits[0, -1]
    return top_tokens(lm, logits, k)


def top_tokens(lm: LoadedModel, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable next tokens of one position's ``logits`` (vocab,), decoded, with probabilities."""
    top = logits.detach().float().softmax(-1).topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]

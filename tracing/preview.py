"""A gradient preview of causal traces (attribution patching): every cell of every kind in one backward pass.

The exact trace restores each clean state in a forward pass of its own. To
first order, restoring a state x at one token changes the metric m by
``(x_clean - x_corrupted) · ∂m/∂x``, the gradient taken in the corrupted run.
One clean forward pass (the clean states), one corrupted forward pass of every
noisy copy and one backward pass (the gradients of every block, MLP and
attention output at every token) therefore estimate all cells of all kinds at
once: a cell's estimate is the low score plus the mean over the copies of its
term, and a windowed (MLP/attention) cell sums the terms of its window's
layers. The noise is the exact trace's (same settings, same seed), so the
estimate approximates the very heatmap the exact engine then computes.

On a CPU that multiplies bf16 matrices in hardware (AMX, AVX-512 BF16) the
blocks of a float32 model run in bf16 for the preview (:func:`block_dtype`):
0.50 s instead of 0.59 s for the Eiffel Tower prompt on one thread, with
estimates that follow the float32 ones closely (median r over 50 known
facts: 0.997 hidden, 0.985 MLP, 0.991 attention) and agree as well with the
exact traces.

It is an estimate: the metric is not linear in the states, least so where the
noise is large (near the embeddings, the early hidden states at the subject).
``benchmarks/preview_quality.py`` measures it against exact traces and writes
``assets/preview_quality.json``; :func:`preview_verdict` reads which kinds
were good enough to show for a model.

Example::

    hidden, mlp, attn = estimate(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    mlp.settings["estimate"], mlp.settings["seconds"]      # True, 0.3
    preview_verdict(lm)                                    # {'hidden': ..., 'mlp': True, 'attn': ...} or None
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .assets import ROOT
from .backends import kernel_policy, native_cpu_bf16, one_cpu_thread
from .hooks import Hook, hooks, main_tensor
from .models import LoadedModel
from .result import KINDS, TraceConfig, TraceResult, window_layers
from .prepare import PromptPlan, check_kinds, run_settings, to_result, with_precision
from .trace import top_tokens

PREVIEW_QUALITY = ROOT / "preview_quality.json"  # written by benchmarks/preview_quality.py --write-verdict
METHOD = "attribution patching"
SPACE = "metric"  # where the first-order step of a probability is taken (see _restored); measured, see below
# Settings that change what a heatmap shows (and so how well it is estimated); samples and seed only redraw the noise.
QUALITY_KEYS = ("noise", "noise_scale", "corruption", "replacement", "window", "metric", "contrast")


def estimate(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
    top_k: int = 0,
    space: str = "auto",
) -> list[TraceResult]:
    """First-order estimates of the causal traces of ``subject`` in ``prompt``, one :class:`TraceResult` per kind.

    Example::

        previews = estimate(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
        previews[1].scores.shape        # (tokens, layers), like trace()

    Same arguments, shapes and fields as :func:`tracing.trace`, with
    ``settings["estimate"] = True`` and ``settings["seconds"]`` (this
    estimate's own time). The answer and ``high_score`` are exactly the
    trace's, and ``low_score`` too unless the blocks ran in bf16
    (:func:`block_dtype`; ``settings["blocks_dtype"]`` says so), when it is
    the corrupted copies' mean computed in bf16. Cells outside
    ``config.tokens`` are NaN. ``top_k``: also the clean run's top
    next tokens, as ``settings["top"]`` = [[token, p], ...] (what
    :func:`tracing.predict` gives, without a run of its own). The weights are
    never modified; gradients are enabled here even if the caller is in
    ``torch.inference_mode``. ``space``: where the first-order step of a
    probability is taken ("metric" or "logit"; "auto": :data:`SPACE` for the
    probability metrics, as measured by ``benchmarks/preview_quality.py``).
    """
    return _estimate(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence,
                     top_k=top_k, space=space)


def _estimate(lm, prompt, subject, *, answer, kinds, config, occurrence, top_k: int = 0,
              space: str = "auto") -> list[TraceResult]:
    """:func:`estimate`, with the space the first-order step is taken in (``space``, see :func:`_restored`)."""
    kinds = check_kinds(kinds)
    started = time.perf_counter()
    lm = with_precision(lm, config.precision)
    dtype = block_dtype(lm, config)
    policy = dict(tf32=config.precision == "tf32", dtype=dtype, backward=True)
    with torch.inference_mode(False), kernel_policy(lm.device, **policy), one_cpu_thread(lm.device):
        plan = PromptPlan.make(lm, prompt, subject, answer, config, occurrence)
        weights = _low_precision_weights(lm, dtype) if dtype != lm.dtype else None
        with torch.enable_grad():
            setup, high, top, terms, rows = _first_order_terms(lm, plan, top_k, weights)
    if space == "auto":
        space = SPACE if config.metric in ("prob", "recovered", "answer_prob") else "metric"
    n_tokens, n_layers = len(setup.enc), lm.n_layers
    positions = setup.token_positions()
    low = float(rows.mean())
    run = run_settings(lm, config, started) | {"estimate": True, "method": METHOD, "space": space}
    if weights is not None:
        run["blocks_dtype"] = str(dtype).removeprefix("torch.")
    if top_k:
        run["top"] = top
    out = []
    for kind in kinds:
        raw = np.full((n_tokens, n_layers), np.nan)
        per_layer = terms[kind][:, :, positions]  # (copies, layers, computed tokens)
        for layer in range(n_layers):
            span = [layer] if kind == "hidden" else list(window_layers(layer, config.window, n_layers))
            raw[positions, layer] = _restored(rows, per_layer[:, span].sum(1), space)
        out.append(to_result(setup, kind, raw, low, high, run))
    return out


def _restored(rows: np.ndarray, steps: np.ndarray, space: str) -> np.ndarray:
    """Estimated scores (tokens,) from each copy's corrupted metric ``rows`` (copies,) and first-order steps
    (copies, tokens) in the metric's units.

    ``metric``: the step is taken in the metric itself, as written in the
    method (mean over copies of metric + step). ``logit``: for probabilities,
    the same step taken in log-odds, log(p / (1 - p)), whose derivative is the
    metric's divided by p (1 - p), then mapped back (the estimate stays a
    probability).
    """
    if space == "metric":
        return (rows[:, None] + steps).mean(0)
    p = np.clip(rows, 1e-12, 1 - 1e-12)[:, None]  # (copies, 1)
    log_odds = np.log(p) - np.log1p(-p) + steps / (p * (1 - p))
    return (1 / (1 + np.exp(-log_odds))).mean(0)


def _first_order_terms(lm: LoadedModel, plan: PromptPlan, top_k: int = 0,
                       weights: dict[str, torch.Tensor] | None = None):
    """One forward pass of the clean row and every noisy copy, one backward pass of the copies' metric.

    Returns the setup (the clean row fixes the answer), the clean score, the
    clean run's top ``top_k`` next tokens as [token, p], per kind (copies,
    layers, tokens) the terms (clean - corrupted state) · ∂metric/∂state of
    each copy, and each copy's corrupted metric (copies,). The clean row rides
    in the corrupted batch: one more row of eleven costs far less than a pass
    of its own (Eiffel Tower, one CPU thread: about 0.03 s against 0.13 s).

    ``weights``: the blocks' parameters in a lower precision (see
    :func:`block_dtype`), used for the batch through the model's own modules
    (and hooks). The answer, the clean score and the top tokens then come from
    a clean pass in the model's precision, so they are exactly the trace's;
    the final norm and the unembedding stay in it too.
    """
    copies = plan.corruption.copies
    ids = plan.input_ids.expand(copies + 1, -1)  # (1 + copies, tokens): row 0 is the clean run
    exact = plan.clean_logits()[0] if weights is not None else None  # (read, vocab)
    with torch.no_grad():
        embedded = lm.embed(ids).clone()  # (1 + copies, tokens, d_model)
        embedded[1:] = plan.corruption.embeddings(embedded[1:])
    if weights is not None:
        embedded = embedded.to(next(iter(weights.values())).dtype)
    embedded.requires_grad_(True)  # a leaf, so that every state downstream is in the graph (weights stay frozen)
    states: dict[str, list[torch.Tensor | None]] = {kind: [None] * lm.n_layers for kind in KINDS}

    def keeper(kind: str, layer: int):
        def keep(module, args, output):
            states[kind][layer] = main_tensor(output)  # (1 + copies, tokens, d_model)

        return keep

    def noisy(module, args, output):
        return embedded

    specs = [Hook(lm.spec.embed, noisy)]
    specs += [Hook(lm.module_name(kind, j), keeper(kind, j)) for kind in KINDS for j in range(lm.n_layers)]
    base = lm.model.base_model
    with hooks(lm.model, *specs):
        if weights is None:
            base(ids, use_cache=False)
        else:
            torch.func.functional_call(base, weights, (ids,), {"use_cache": False}, strict=False)
    last = states["hidden"][-1][:, plan.read_from:]  # (1 + copies, read, d_model): the last block's output
    logits = lm.unembed(lm.final_norm(last.to(lm.dtype)))  # (1 + copies, read, vocab)
    clean = exact if exact is not None else logits[0].detach()
    setup = plan.setup(clean)
    high = float(setup.score(clean[None])[0])
    metric = setup.score(logits[1:])  # (copies,); copies never mix, so one backward gives each its own gradients
    flat = [state for kind in KINDS for state in states[kind]]
    grads = torch.autograd.grad(metric.sum(), flat, allow_unused=True)
    terms = {}
    for k, kind in enumerate(KINDS):
        layers = []
        for j in range(lm.n_layers):
            grad, state = grads[k * lm.n_layers + j], states[kind][j].detach()
            if grad is None:  # the metric does not depend on this state
                layers.append(torch.zeros((copies, state.shape[1]), device=lm.device))
                continue
            delta = state[:1].float() - state[1:].float()  # (copies, tokens, d_model): clean - corrupted
            layers.append((delta * grad[1:].float()).sum(-1).to(lm.device))  # (copies, tokens); one device to stack
        terms[kind] = torch.stack(layers, 1).double().cpu().numpy()  # (copies, layers, tokens)
    top = [list(pair) for pair in top_tokens(lm, clean[0], top_k)] if top_k else []  # after the prompt
    return setup, high, top, terms, metric.detach().double().cpu().numpy()


BF16_MAX_PARAMETERS = 2_000_000_000  # the preview's bf16 copy of the blocks: at most 4 GB


def block_dtype(lm: LoadedModel, config: TraceConfig = TraceConfig()) -> torch.dtype:
    """The precision the preview runs the transformer blocks in.

    Example::

        block_dtype(lm)      # torch.bfloat16 on a CPU with AMX or AVX-512 BF16, else lm.dtype

    bf16 for a float32 model on a CPU that multiplies bf16 matrices in
    hardware, when ``config.precision`` is "auto" and the model has at most
    :data:`BF16_MAX_PARAMETERS` parameters (a bf16 copy of its weights is
    kept beside it, converted on the first call); otherwise the model's own.
    On one thread of such a CPU the Eiffel Tower preview takes 0.50 s instead
    of 0.59 s (a float32 clean pass for the answer is 0.12 s of it), and the
    estimates follow the float32 ones to a median r of 0.985-0.997 per kind
    over 50 known facts (``benchmarks/preview_quality.py``, which compares
    both). ``precision="fp32"`` (``--precision fp32`` on the command line)
    keeps float32, and so does a model with weights offloaded by accelerate
    (on the meta device, loaded for each pass: there is nothing to copy).
    """
    if (config.precision == "auto" and lm.device.type == "cpu" and lm.dtype == torch.float32 and native_cpu_bf16()
            and lm.n_params <= BF16_MAX_PARAMETERS and not lm.offloaded):
        return torch.bfloat16
    return lm.dtype


class _Shadow:
    """A module's parameters in another dtype, kept in step with them.

    A weight changed in place (an edit applied or undone, a loaded state
    dict) has a new version counter; only such weights are converted again
    on the next :meth:`current`, so a call after an edit costs the edited
    matrices, not the model.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.module, self.dtype = module, dtype
        self._held: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def current(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, weight in self.module.named_parameters():
            key = (weight._version, weight.data_ptr())
            held = self._held.get(name)
            if held is None or held[0] != key:
                held = self._held[name] = (key, weight.detach().to(self.dtype))
            out[name] = held[1]
        return out


_SHADOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {dtype: _Shadow}
_SHADOWS_LOCK = threading.Lock()


def _low_precision_weights(lm: LoadedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The blocks' parameters (names under ``lm.model.base_model``) in ``dtype``, as the weights are now."""
    with _SHADOWS_LOCK:
        shadows = _SHADOWS.setdefault(lm.model, {})
        if dtype not in shadows:
            shadows[dtype] = _Shadow(lm.model.base_model, dtype)
        return shadows[dtype].current()


def preview_verdict(lm: LoadedModel, config: TraceConfig = TraceConfig(),
                    path: str | Path = PREVIEW_QUALITY) -> dict[str, bool] | None:
    """Per kind, whether the estimate was measured good enough to show, for this model and these settings.

    Example::

        verdict = preview_verdict(lm)          # {'hidden': False, 'mlp': True, 'attn': True}
        shown = [r for r in estimate(lm, prompt, subject) if verdict and verdict[r.kind]]

    Reads the file ``benchmarks/preview_quality.py --write-verdict`` writes.
    None when it holds no measurement for this model (its fingerprint) or for
    settings that change the maps (noise, corruption, window, metric; the
    number of samples and the seed do not matter), or when it is missing.
    """
    record = quality_record(path)
    if record is None or record.get("fingerprint") != lm.fingerprint:
        return None
    measured = record.get("settings", {})
    asked = config.to_dict()
    if any(measured.get(key) != asked.get(key) for key in QUALITY_KEYS):
        return None
    return {kind: bool(figures["show"]) for kind, figures in record["kinds"].items()}


def quality_record(path: str | Path = PREVIEW_QUALITY) -> dict | None:
    """The measured quality of the preview (per kind: r, peak agreement, whether to show), or None if absent."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kinds"), dict):
        return None
    return data

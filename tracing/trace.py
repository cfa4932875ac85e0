"""Causal tracing (Meng et al., 2022, §2): where does a model recall a fact?

Run the prompt clean and note p(answer) (the *high* score). Corrupt the
subject's token embeddings in several copies and note the mean p(answer) (the
*low* score). Then, in the corrupted copies, put back one clean internal state
-- a block's output (``hidden``), or the MLP or attention outputs of a window
of layers (``mlp``, ``attn``) -- at one token, and measure how much of the
answer's probability comes back. Sweeping every token and layer gives one
heatmap per kind.

Two implementations of the same definitions live here:

* :func:`trace` is the fast engine. It runs the clean and corrupted prompts
  once, then restores many cells per forward pass, calling the blocks directly
  so that each restored row starts at the first layer it changes (layers below
  are the corrupted run's), computes only positions from the restored token on
  (earlier positions keep the corrupted run's keys and values), and unembeds
  only the last position. Positions before the subject are never corrupted, so
  restoring them gives the low score without any work.
* :func:`trace_reference` restores one cell per forward pass of the whole
  model, like the paper's code. It is the oracle for tests and the baseline of
  ``benchmarks/trace_speed.py``.

Example::

    lm = load_model()
    hidden, mlp, attn = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    mlp.answer, mlp.high_score, mlp.low_score, mlp.scores.shape   # ' Paris', 0.70, ..., (10, 30)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .corruption import Corruption, make_corruption
from .blocks import BlockCall, PrefixCache, capture_calls
from .hooks import Hook, StopForward, hooks, main_tensor, replace_main, until_stopped
from .models import LoadedModel, parse_dtype
from .result import KINDS, TraceConfig, TraceResult, window_layers
from .tokens import EncodedPrompt, check_context, continuation_ids, encode_prompt

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------
# Shared preparation


@dataclass(frozen=True, eq=False)
class _Setup:
    """Everything both engines share for one prompt."""

    lm: LoadedModel
    enc: EncodedPrompt
    subject: str
    answer_id: int
    contrast_id: int | None
    corruption: Corruption
    config: TraceConfig

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.enc.ids], device=self.lm.device)  # (1, tokens)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw metric per row from last-position logits (rows, vocab): p(answer) or a logit difference."""
        logits = logits.float()
        if self.config.metric == "logit_diff":
            return logits[:, self.answer_id] - logits[:, self.contrast_id]
        return logits.softmax(-1)[:, self.answer_id]

    def token_positions(self) -> list[int]:
        """Token positions whose cells are computed (config.tokens)."""
        n = len(self.enc)
        spec = self.config.tokens
        if spec == "all":
            return list(range(n))
        if spec == "subject_last":
            return sorted(set(range(self.enc.subject_start, self.enc.subject_end)) | {n - 1})
        bad = [t for t in spec if not -n <= t < n]
        if bad:
            raise ValueError(f"Token positions {bad} are outside the prompt's {n} tokens.")
        return sorted({t % n for t in spec})


def _with_precision(lm: LoadedModel, precision: str) -> LoadedModel:
    """The model in the requested precision (a converted copy if it differs)."""
    if precision == "auto" or parse_dtype(precision) == lm.dtype:
        return lm
    model = copy.deepcopy(lm.model).to(parse_dtype(precision))
    return LoadedModel(model=model, tokenizer=lm.tokenizer, spec=lm.spec, name=lm.name)


def _prepare(
    lm: LoadedModel, prompt: str, subject: str, answer: str | None, config: TraceConfig, occurrence: int
) -> tuple[_Setup, float, int]:
    """Tokenise, find the subject, fix the answer; return the setup, clean score and answer id."""
    enc = encode_prompt(lm.tokenizer, prompt, subject, occurrence=occurrence, max_length=lm.max_length)
    ids = torch.tensor([enc.ids], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(ids).logits[0, -1]
    if answer is None or not str(answer).strip():
        answer_id = int(logits.argmax())
    else:
        answer_id = continuation_ids(lm.tokenizer, prompt, answer)[0]
    contrast_id = None
    if config.metric == "logit_diff":
        contrast_id = continuation_ids(lm.tokenizer, prompt, config.contrast)[0]
    corruption = make_corruption(lm, enc, subject.strip(), config)
    setup = _Setup(lm, enc, subject.strip(), answer_id, contrast_id, corruption, config)
    return setup, float(setup.score(logits[None])[0]), answer_id


def _results(
    setup: _Setup, kind: str, raw: np.ndarray, low: float, high: float
) -> TraceResult:
    """Package raw scores (tokens, layers) of one kind, normalising for metric="recovered"."""
    config = setup.config
    if config.metric == "recovered":
        span = high - low
        raw = (raw - low) / span if span != 0 else np.full_like(raw, np.nan)
        low, high = 0.0, 1.0
    settings = config.to_dict()
    settings["noise_scale_used"] = setup.corruption.scale
    settings["copies"] = setup.corruption.copies
    if setup.corruption.replacement_subjects:
        settings["replacement_subjects"] = list(setup.corruption.replacement_subjects)
    return TraceResult(
        kind=kind,
        scores=raw,
        low_score=float(low),
        high_score=float(high),
        tokens=setup.enc.tokens,
        subject_range=setup.enc.subject_range,
        answer=setup.lm.tokenizer.decode([setup.answer_id]),
        answer_id=setup.answer_id,
        prompt=setup.enc.text,
        subject=setup.subject,
        metric=config.metric,
        model=setup.lm.name,
        settings=settings,
    )


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"Unknown trace kind(s) {bad}; choose from {', '.join(KINDS)}.")
    return kinds


# ---------------------------------------------------------------------------
# The oracle: one restored cell per forward pass


def _embed_hook(setup: _Setup) -> Hook:
    """Corrupt rows 1.. of a (1 + copies)-row batch at the embedding; row 0 stays clean."""

    def corrupt(module, args, output):
        output = output.clone()
        setup.corruption.embeddings(output[1:])
        return output

    return Hook(setup.lm.spec.embed, corrupt)


def _restore_hook(name: str, token: int) -> Hook:
    """Copy row 0's (clean) state at ``token`` into every other row."""

    def restore(module, args, output):
        state = main_tensor(output)
        state[1:, token] = state[0, token]
        return replace_main(output, state)

    return Hook(name, restore)


def _reference_run(setup: _Setup, restore: Sequence[Hook]) -> float:
    """Mean metric over the corrupted rows of one (1 + copies)-row forward pass."""
    ids = setup.input_ids.repeat(1 + setup.corruption.copies, 1)
    with torch.inference_mode(), hooks(setup.lm.model, _embed_hook(setup), *restore):
        logits = setup.lm.model(ids).logits  # (1 + copies, tokens, vocab): all positions, as the paper's code
    return float(setup.score(logits[1:, -1]).mean())


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
    kinds = _check_kinds(kinds)
    lm = _with_precision(lm, config.precision)
    setup, high, _ = _prepare(lm, prompt, subject, answer, config, occurrence)
    low = _reference_run(setup, [])
    positions = setup.token_positions()
    n_layers, n_tokens = lm.n_layers, len(setup.enc)
    total, done = len(kinds) * len(positions) * n_layers, 0
    results = []
    for kind in kinds:
        raw = np.full((n_tokens, n_layers), np.nan)
        for t in positions:
            for layer in range(n_layers):
                layers = [layer] if kind == "hidden" else window_layers(layer, config.window, n_layers)
                raw[t, layer] = _reference_run(setup, [_restore_hook(lm.module_name(kind, j), t) for j in layers])
                done += 1
                if progress:
                    progress(done, total)
        results.append(_results(setup, kind, raw, low, high))
    return results


# ---------------------------------------------------------------------------
# The fast engine


class _FastTracer:
    """Clean and corrupted runs once, then restored rows batched layer by layer."""

    def __init__(self, setup: _Setup):
        self.setup = setup
        lm = setup.lm
        self.lm = lm
        self.n_layers = lm.n_layers
        self.n_tokens = len(setup.enc)
        self.copies = setup.corruption.copies
        self.calls: dict[int, list[BlockCall]] = {}
        with torch.inference_mode():
            self._base_runs()

    def calls_for(self, start: int) -> list[BlockCall]:
        if start not in self.calls:
            self.calls[start] = capture_calls(self.lm, self.setup.enc.ids, start)[0]
        return self.calls[start]

    def _base_runs(self) -> None:
        lm, setup = self.lm, self.setup
        calls, clean_in = capture_calls(lm, setup.enc.ids, 0)
        self.calls[0] = calls

        # Clean run: keep every block output and every MLP / attention output.
        self.clean = {kind: [None] * self.n_layers for kind in KINDS}

        def keeper(kind, layer):
            def keep(module, args, output):
                self.clean[kind][layer] = main_tensor(output)[0]  # (tokens, d_model)

            return keep

        specs = [Hook(lm.module_name(kind, j), keeper(kind, j)) for kind in KINDS for j in range(self.n_layers)]
        with hooks(lm.model, *specs):
            final = self._run_layers(clean_in, 0, 0, PrefixCache())
        self.high = float(setup.score(self._logits(final))[0])

        # Corrupted run: keep every block's input and every layer's keys and values.
        corrupt_in = self._corrupted_input()
        recorder = PrefixCache(record=True)
        self.corrupt_in: list[torch.Tensor] = []  # n_layers + 1 entries of (copies, tokens, d_model)
        final = self._run_layers(corrupt_in, 0, 0, recorder, keep_inputs=self.corrupt_in)
        self.corrupt_in.append(final)
        self.kv = [recorder.recorded[j] for j in range(self.n_layers)]  # (copies, heads, tokens, head_dim) each
        self.low_rows = setup.score(self._logits(final))  # (copies,)
        self.low = float(self.low_rows.mean())

    def _corrupted_input(self) -> torch.Tensor:
        """Block 0's input (copies, tokens, d_model) with the subject's embeddings corrupted."""
        captured: list[torch.Tensor] = []

        def corrupt(module, args, output):
            output = output.expand(self.copies, -1, -1).clone()
            return self.setup.corruption.embeddings(output)

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise StopForward

        ids = self.setup.input_ids
        specs = [Hook(self.lm.spec.embed, corrupt), Hook(self.lm.module_name("hidden", 0), grab, pre=True)]
        with hooks(self.lm.model, *specs):
            until_stopped(self.lm.model.base_model, ids, use_cache=False)
        return captured[0]

    def _run_layers(self, hidden, first_layer: int, start: int, cache: PrefixCache, keep_inputs=None):
        calls = self.calls_for(start)
        for j in range(first_layer, self.n_layers):
            if keep_inputs is not None:
                keep_inputs.append(hidden)
            hidden = calls[j](self.lm.block(j), hidden, cache)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits at the last position only: (rows, vocab)."""
        last = self.lm.final_norm(hidden[:, -1:])  # (rows, 1, d_model)
        return self.lm.unembed(last)[:, -1]

    def _row_budget(self, positions: int) -> int:
        """How many restored rows fit the memory budget, as a multiple of the copies."""
        cfg = self.lm.config
        d_model = self.lm.embed.weight.shape[1]
        d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 16)
        per_row = positions * (10 * d_model + 3 * d_ff + 2 * heads * self.n_tokens) * self.lm.dtype.itemsize
        cells = max(1, int(self.setup.config.memory_mb * 2**20 // (per_row * self.copies)))
        return cells

    def sweep(self, kind: str, token: int) -> np.ndarray:
        """Scores (layers,) of restoring ``kind`` at ``token`` in every layer."""
        n_layers, window = self.n_layers, self.setup.config.window
        if kind == "hidden":
            start_of = {layer: layer + 1 for layer in range(n_layers)}
            restored = {layer: () for layer in range(n_layers)}
        else:
            restored = {layer: window_layers(layer, window, n_layers) for layer in range(n_layers)}
            start_of = {layer: restored[layer].start for layer in range(n_layers)}
        order = sorted(range(n_layers), key=lambda layer: start_of[layer])
        per_chunk = self._row_budget(self.n_tokens - token)
        out = np.empty(n_layers)
        for i in range(0, n_layers, per_chunk):
            chunk = order[i : i + per_chunk]
            scores = self._sweep_chunk(kind, token, chunk, start_of, restored)
            out[chunk] = scores
        return out

    def _sweep_chunk(self, kind, token, cells, start_of, restored) -> np.ndarray:
        """Run one batch of cells (sorted by start layer); return their mean scores."""
        copies = self.copies
        sample = torch.arange(copies, device=self.lm.device)
        calls = self.calls_for(token)
        prefix = [(k[:, :, :token], v[:, :, :token]) for k, v in self.kv]
        hidden = None
        active: list[int] = []  # cells with rows in `hidden`, in row order
        for j in range(start_of[cells[0]], self.n_layers + 1):
            for cell in cells:
                if start_of[cell] != j:
                    continue
                rows = self.corrupt_in[j][:, token:].clone()  # (copies, positions, d_model)
                if kind == "hidden":
                    rows[:, 0] = self.clean["hidden"][cell][token]
                hidden = rows if hidden is None else torch.cat([hidden, rows])
                active.append(cell)
            if j == self.n_layers:
                break
            patch = [n for n, cell in enumerate(active) if j in restored[cell]]
            specs = []
            if patch:
                index = torch.tensor([n * copies + s for n in patch for s in range(copies)], device=self.lm.device)
                specs.append(self._patch_hook(kind, j, token, index))
            cache = PrefixCache(prefix, rows=sample.repeat(len(active)))
            with hooks(self.lm.model, *specs):
                hidden = calls[j](self.lm.block(j), hidden, cache)
        scores = self.setup.score(self._logits(hidden)).reshape(len(active), copies).mean(1)
        out = np.empty(len(cells))
        position = {cell: n for n, cell in enumerate(cells)}
        for n, cell in enumerate(active):
            out[position[cell]] = float(scores[n])
        return out

    def _patch_hook(self, kind: str, layer: int, token: int, index: torch.Tensor) -> Hook:
        clean = self.clean[kind][layer][token]  # (d_model,)

        def restore(module, args, output):
            state = main_tensor(output)
            state[index, 0] = clean
            return replace_main(output, state)

        return Hook(self.lm.module_name(kind, layer), restore)


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
) -> Iterator[TraceResult]:
    """Like :func:`trace`, but yield each kind's result as soon as it is done."""
    kinds = _check_kinds(kinds)
    lm = _with_precision(lm, config.precision)
    setup, _, _ = _prepare(lm, prompt, subject, answer, config, occurrence)
    tracer = _FastTracer(setup)
    positions = setup.token_positions()
    first_corrupted = setup.enc.subject_start
    total = len(kinds) * len(positions)
    done = 0
    for kind in kinds:
        raw = np.full((tracer.n_tokens, tracer.n_layers), np.nan)
        with torch.inference_mode():
            for t in positions:
                if config.skip and t < first_corrupted:
                    raw[t] = tracer.low  # these states are identical in the clean and corrupted runs
                else:
                    raw[t] = tracer.sweep(kind, t)
                done += 1
                if progress:
                    progress(done, total)
        yield _results(setup, kind, raw, tracer.low, tracer.high)


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
) -> list[TraceResult]:
    """Causal traces of ``subject`` in ``prompt``, one :class:`TraceResult` per kind.

    Example::

        results = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                        kinds=("hidden", "mlp", "attn"), config=TraceConfig(samples=10))

    ``answer`` defaults to the clean run's top token (else its first token is
    used). ``progress(done, total)`` is called after each token's sweep.
    Each result's ``scores`` is (tokens, layers).
    """
    return list(
        iter_trace(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence, progress=progress)
    )


def predict(lm: LoadedModel, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The model's top-k next tokens after ``prompt`` with their probabilities."""
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty.")
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    check_context(lm.max_length, ids.shape[1], fix="Shorten the prompt.")
    ids = ids.to(lm.device)
    with torch.inference_mode():
        probs = lm.model(ids).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]

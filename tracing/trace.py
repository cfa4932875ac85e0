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

  Which cells share a forward pass is a plan; it never changes a score. A GPU
  is bound by kernel launches, not arithmetic: there the three kinds run in
  the same passes, and tokens are grouped into a few buckets whose rows start
  at the bucket's first token (the extra positions recompute the corrupted
  run's states). A CPU is bound by arithmetic: there each kind runs on its own
  (its heatmap streams as soon as it is done) and tokens keep their own
  passes. :meth:`_FastTracer.buckets` chooses from a rough cost model
  (arithmetic against passes), so tiny models on a CPU are grouped too;
  ``TraceConfig.batching`` overrides the plan.
* :func:`trace_reference` restores one cell per forward pass of the whole
  model, like the paper's code. It is the oracle for tests and the baseline of
  ``benchmarks/trace_speed.py``.

Example::

    lm = load_model()
    hidden, mlp, attn = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    mlp.answer, mlp.high_score, mlp.low_score, mlp.scores.shape   # ' Paris', 0.70, ..., (10, 30)
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backends import attention_backends, kernel_policy, precision_label, uses_tf32
from .blocks import BlockCall, PrefixCache, capture_calls
from .corruption import Corruption, make_corruption
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


def _run_settings(lm: LoadedModel, config: TraceConfig, started: float) -> dict:
    """How a result was computed: seconds since the trace began, device, precision, attention backends."""
    out = {
        "seconds": round(time.perf_counter() - started, 4),
        "device": str(lm.device),
        "dtype": precision_label(lm.device, lm.dtype, config.precision == "tf32"),
    }
    backends = attention_backends(lm.device)
    if backends:
        out["attention"] = ",".join(backends)
    return out


def _results(
    setup: _Setup, kind: str, raw: np.ndarray, low: float, high: float, run: dict | None = None
) -> TraceResult:
    """Package raw scores (tokens, layers) of one kind, normalising for metric="recovered".

    ``run`` (seconds, device, dtype, ...) is added to the result's settings.
    """
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
    settings.update(run or {})
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
    started = time.perf_counter()
    lm = _with_precision(lm, config.precision)
    with kernel_policy(lm.device, tf32=config.precision == "tf32", dtype=lm.dtype):
        setup, high, _ = _prepare(lm, prompt, subject, answer, config, occurrence)
        low = _reference_run(setup, [])
        positions = setup.token_positions()
        n_layers, n_tokens = lm.n_layers, len(setup.enc)
        total, done = len(kinds) * len(positions) * n_layers, 0
        scores = {}
        for kind in kinds:
            raw = np.full((n_tokens, n_layers), np.nan)
            for t in positions:
                for layer in range(n_layers):
                    layers = [layer] if kind == "hidden" else window_layers(layer, config.window, n_layers)
                    restore = [_restore_hook(lm.module_name(kind, j), t) for j in layers]
                    raw[t, layer] = _reference_run(setup, restore)
                    done += 1
                    if progress:
                        progress(done, total)
            scores[kind] = raw
    run = _run_settings(lm, config, started)
    return [_results(setup, kind, scores[kind], low, high, run) for kind in kinds]


# ---------------------------------------------------------------------------
# The fast engine

_MAX_ROWS = 32768  # rows per forward pass: attention kernels put the batch in a 65,535-wide grid dimension
_BUCKET_SPAN = 64  # tokens one bucket may cover (bounds the planner's work on long prompts)


@dataclass(frozen=True)
class _Cell:
    """One heatmap cell: restore ``kind`` at ``token`` in ``layer``.

    Its rows join the forward pass at block ``start`` (the corrupted run's
    input there, with the clean block output at ``token`` for ``hidden``);
    ``window`` lists the blocks whose ``kind`` output is restored at ``token``.
    """

    kind: str
    token: int
    layer: int
    start: int
    window: range


@dataclass(frozen=True)
class _Speed:
    """Rough device figures that choose how cells are grouped; the scores never depend on them."""

    flops: float  # matrix arithmetic per second
    per_call: float  # seconds one block call costs beyond its arithmetic (Python, kernel launches)


def _speed(device: torch.device, dtype: torch.dtype, tf32: bool) -> _Speed:
    # Orders of magnitude: 2 CPU cores run the default model at ~1e11 FLOP/s with ~0.3 ms per block call;
    # an H200 ran a block call in ~1.3 ms of launches, and matrix products far faster than the CPU.
    if device.type == "cpu":
        return _Speed(flops=1e11, per_call=3e-4)
    if dtype in (torch.bfloat16, torch.float16):
        return _Speed(flops=3e14, per_call=1e-3)
    return _Speed(flops=1e14 if tf32 else 4e13, per_call=1e-3)


class _FastTracer:
    """Clean and corrupted runs once, then restored rows batched layer by layer.

    ``sweep(t0, cells)`` runs one forward pass over many cells whose rows all
    compute positions ``t0..`` (``t0`` at most each cell's token).
    """

    def __init__(self, setup: _Setup):
        self.setup = setup
        lm = setup.lm
        self.lm = lm
        self.n_layers = lm.n_layers
        self.n_tokens = len(setup.enc)
        self.copies = setup.corruption.copies
        self.calls: dict[int, list[BlockCall]] = {}
        self.sweeps = 0  # forward passes run by sweep()
        with torch.inference_mode():
            self._base_runs()
        self.budget = self._budget_bytes()  # after the base runs: what is free for restored rows

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

    # --- the plan ------------------------------------------------------------

    def cells(self, kind: str, token: int) -> list[_Cell]:
        """The cells of one heatmap row, one per layer."""
        n_layers, window = self.n_layers, self.setup.config.window
        if kind == "hidden":
            return [_Cell(kind, token, layer, layer + 1, range(0)) for layer in range(n_layers)]
        out = []
        for layer in range(n_layers):
            restored = window_layers(layer, window, n_layers)
            out.append(_Cell(kind, token, layer, restored.start, restored))
        return out

    def _budget_bytes(self) -> int:
        """Memory for one forward pass of restored rows: config.memory_mb, else 1 GiB (a quarter of a GPU's free memory)."""
        if self.setup.config.memory_mb is not None:
            return int(self.setup.config.memory_mb) * 2**20
        device = self.lm.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(2**30, free // 4)
        return 2**30

    def cells_per_pass(self, positions: int) -> int:
        """How many cells (each ``copies`` rows of ``positions`` positions) fit the memory budget."""
        cfg = self.lm.config
        d_model = self.lm.embed.weight.shape[1]
        d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 16)
        per_row = positions * (10 * d_model + 3 * d_ff + 2 * heads * self.n_tokens) * self.lm.dtype.itemsize
        cells = max(1, int(self.budget // (per_row * self.copies)))
        return min(cells, max(1, _MAX_ROWS // self.copies))

    def flops_per_position(self) -> float:
        """Arithmetic of one block at one position: the weights' products plus attention over the prompt."""
        params = sum(p.numel() for p in self.lm.block(0).parameters())
        d_model = self.lm.embed.weight.shape[1]
        return 2.0 * params + 4.0 * d_model * self.n_tokens

    def buckets(self, kinds: Sequence[str], tokens: Sequence[int]) -> list[tuple[int, ...]]:
        """Split ``tokens`` into runs that share forward passes, minimising estimated seconds.

        A bucket's rows compute every position from its first token on, so
        merging costs arithmetic (padding) and saves passes (launches). The
        choice is a dynamic programme over contiguous runs of sorted tokens.
        """
        tokens = sorted(tokens)
        if not tokens:
            return []
        config = self.setup.config
        speed = _speed(self.lm.device, self.lm.dtype, uses_tf32(self.lm.device, self.lm.dtype, config.precision == "tf32"))
        layers_run = sum(self.n_layers - c.start for kind in kinds for c in self.cells(kind, tokens[0]))
        work = self.copies * layers_run * self.flops_per_position() / speed.flops  # seconds per token and position
        per_pass = self.n_layers * speed.per_call
        cells_per_token = len(kinds) * self.n_layers

        def cost(a: int, b: int) -> float:
            positions, count = self.n_tokens - tokens[a], b - a + 1
            passes = math.ceil(count * cells_per_token / self.cells_per_pass(positions))
            return work * positions * count + passes * per_pass

        best, cut = [0.0] + [math.inf] * len(tokens), [0] * (len(tokens) + 1)
        for b in range(len(tokens)):
            for a in range(max(0, b - _BUCKET_SPAN + 1), b + 1):
                value = best[a] + cost(a, b)
                if value < best[b + 1]:
                    best[b + 1], cut[b + 1] = value, a
        out, b = [], len(tokens)
        while b > 0:
            out.append(tuple(tokens[cut[b] : b]))
            b = cut[b]
        return out[::-1]

    def plan(self, kinds: Sequence[str], tokens: Sequence[int], batching: str) -> list[tuple[int, list[_Cell]]]:
        """Forward passes as (first position, cells sorted by start), in the order they run.

        ``batching``: ``token`` (one pass per kind and token, nothing padded),
        ``kind`` (kinds one after another, tokens bucketed), ``all`` (kinds
        together, tokens bucketed); ``auto`` is ``kind`` on a CPU, else ``all``.
        """
        if batching == "auto":
            batching = "kind" if self.lm.device.type == "cpu" else "all"
        if batching == "token":
            groups = [((kind,), (token,)) for kind in kinds for token in sorted(tokens)]
        else:
            kind_groups = [(kind,) for kind in kinds] if batching == "kind" else [tuple(kinds)]
            groups = [(ks, bucket) for ks in kind_groups for bucket in self.buckets(ks, tokens)]
        passes = []
        for group_kinds, bucket in groups:
            t0 = min(bucket)
            cells = [c for kind in group_kinds for token in bucket for c in self.cells(kind, token)]
            cells.sort(key=lambda c: c.start)  # stable: kind, token, layer order within a start layer
            size = self.cells_per_pass(self.n_tokens - t0)
            passes.extend((t0, cells[i : i + size]) for i in range(0, len(cells), size))
        return passes

    # --- one forward pass ----------------------------------------------------

    def sweep(self, t0: int, cells: Sequence[_Cell]) -> np.ndarray:
        """Mean scores (cells,) of one batch of cells sorted by start; rows compute positions ``t0..``.

        Rows are cell-major (cell i owns rows i*copies ... i*copies + copies - 1,
        copy s reading copy s's prefix). A row of token t > t0 recomputes
        positions t0..t-1 exactly as the corrupted run did.
        """
        lm, copies, n_layers = self.lm, self.copies, self.n_layers
        device = lm.device
        assert all(c.token >= t0 for c in cells) and all(a.start <= b.start for a, b in zip(cells, cells[1:]))
        starts = [c.start for c in cells]
        restore = self._restore_plan(t0, cells)  # (kind, layer) -> (rows, positions, clean states)
        patch = [
            Hook(lm.module_name(kind, j), self._patch_hook(*restore[kind, j]))
            for kind, j in restore
            if kind != "hidden"
        ]
        calls = self.calls_for(t0)
        prefix = [(k[:, :, :t0], v[:, :, :t0]) for k, v in self.kv]
        sample = torch.arange(copies, device=device).repeat(len(cells))  # (rows,) the copy each row belongs to
        hidden, joined = None, 0
        with hooks(lm.model, *patch):
            for j in range(starts[0], n_layers + 1):
                upto = bisect.bisect_right(starts, j)
                if upto > joined:  # cells joining at block j: the corrupted run's input there
                    rows = self.corrupt_in[j][:, t0:].repeat(upto - joined, 1, 1)  # (new rows, positions, d_model)
                    hidden = rows if hidden is None else torch.cat([hidden, rows])
                    joined = upto
                    if ("hidden", j) in restore:
                        index, position, clean = restore["hidden", j]
                        hidden[index, position] = clean
                if j == n_layers:
                    break
                cache = PrefixCache(prefix, rows=sample[: hidden.shape[0]])
                hidden = calls[j](lm.block(j), hidden, cache)
        self.sweeps += 1
        scores = self._scores(hidden)  # (rows,)
        return scores.reshape(len(cells), copies).mean(1).double().cpu().numpy()

    def _restore_plan(self, t0: int, cells: Sequence[_Cell]) -> dict[tuple[str, int], tuple]:
        """(kind, block) -> (row index, position index, clean states) of every restore in one pass.

        ``hidden`` cells are restored in their input when they join (the clean
        output of the block below); ``mlp``/``attn`` cells in that module's
        output in every block of their window. One upload for the whole pass.
        """
        wanted: dict[tuple[str, int], list[int]] = {}
        for i, c in enumerate(cells):
            if c.kind == "hidden":
                if c.start > 0:
                    wanted.setdefault(("hidden", c.start), []).append(i)
            else:
                for j in c.window:
                    wanted.setdefault((c.kind, j), []).append(i)
        if not wanted:
            return {}
        copy = np.arange(self.copies)
        tokens = np.array([c.token for c in cells])
        pieces, bounds = [], {}
        for key, members in wanted.items():
            members = np.array(members)
            rows = (members[:, None] * self.copies + copy).ravel()
            toks = np.repeat(tokens[members], self.copies)
            bounds[key] = (sum(p.shape[1] for p in pieces), rows.size)
            pieces.append(np.stack([rows, toks - t0, toks]))
        flat = torch.from_numpy(np.concatenate(pieces, axis=1)).to(self.lm.device)  # (3, restores)
        out = {}
        for (kind, j), (offset, size) in bounds.items():
            index, position, token = flat[:, offset : offset + size]
            clean = self.clean[kind][j - 1 if kind == "hidden" else j]  # (tokens, d_model)
            out[kind, j] = (index, position, clean[token])
        return out

    @staticmethod
    def _patch_hook(index: torch.Tensor, position: torch.Tensor, clean: torch.Tensor) -> Callable:
        def restore(module, args, output):
            state = main_tensor(output)
            state[index, position] = clean
            return replace_main(output, state)

        return restore

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The metric per row (rows,), unembedding as many rows at a time as the budget allows."""
        vocab = self.lm.unembed.weight.shape[0]
        step = max(1, self.budget // (vocab * 4 * 3))  # logits, their float copy and the softmax
        return torch.cat([self.setup.score(self._logits(hidden[i : i + step])) for i in range(0, hidden.shape[0], step)])


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
    """Like :func:`trace`, but yield each kind's result as soon as it is done (in ``kinds`` order)."""
    kinds = _check_kinds(kinds)
    started = time.perf_counter()
    lm = _with_precision(lm, config.precision)
    policy = dict(tf32=config.precision == "tf32", dtype=lm.dtype)
    with kernel_policy(lm.device, **policy):
        setup, _, _ = _prepare(lm, prompt, subject, answer, config, occurrence)
        tracer = _FastTracer(setup)
    positions = setup.token_positions()
    skipped = [t for t in positions if config.skip and t < setup.enc.subject_start]
    swept = [t for t in positions if t not in skipped]
    passes = tracer.plan(kinds, swept, config.batching)
    raw = {kind: np.full((tracer.n_tokens, tracer.n_layers), np.nan) for kind in kinds}
    for kind in kinds:
        raw[kind][skipped] = tracer.low  # these states are identical in the clean and corrupted runs
    left = {(kind, t): tracer.n_layers for kind in kinds for t in swept}  # cells still to compute
    kinds_left = {kind: len(swept) for kind in kinds}
    total, done = len(kinds) * len(positions), len(kinds) * len(skipped)
    if progress and done:
        progress(done, total)
    batching = config.batching if config.batching != "auto" else ("kind" if lm.device.type == "cpu" else "all")
    pending = list(kinds)
    for item in [None, *passes]:  # None first: a kind with nothing to sweep is ready at once
        if item is not None:
            t0, cells = item
            with torch.inference_mode(), kernel_policy(lm.device, **policy):
                scores = tracer.sweep(t0, cells)
            finished = 0
            for cell, score in zip(cells, scores):
                raw[cell.kind][cell.token, cell.layer] = score
                left[cell.kind, cell.token] -= 1
                if left[cell.kind, cell.token] == 0:
                    kinds_left[cell.kind] -= 1
                    finished += 1
            done += finished
            if progress and finished:
                progress(done, total)
        while pending and kinds_left[pending[0]] == 0:
            kind = pending.pop(0)
            run = _run_settings(lm, config, started) | {"batching": batching, "passes": tracer.sweeps}
            yield _results(setup, kind, raw[kind], tracer.low, tracer.high, run)


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
    used). ``progress(done, total)`` counts (kind, token) heatmap rows.
    Each result's ``scores`` is (tokens, layers); its ``settings`` add how it
    ran: ``seconds`` (since the trace began), ``device``, ``dtype``, and on
    CUDA the ``attention`` backends.
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
    with torch.inference_mode(), kernel_policy(lm.device, dtype=lm.dtype):
        probs = lm.model(ids).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]

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
  restoring them gives the low score without any work. Work that cannot
  change a score is skipped further (:meth:`_FastTracer.entries`): an MLP
  window's first block changes only its token, by the MLP output it adds, so
  its rows join one block later; windows clipped at layer 0 share their rows
  until the shorter one ends; the last block runs its MLP at the last
  position only; a hidden state restored in the last layer before the last
  token changes nothing scored.

  Which cells share a forward pass is a plan; it never changes a score. A GPU
  is bound by kernel launches, not arithmetic: there the three kinds run in
  the same passes, and tokens are grouped into a few buckets whose rows start
  at the bucket's first token (the extra positions recompute the corrupted
  run's states). A CPU is bound by arithmetic: there each kind runs on its own
  (its heatmap streams as soon as it is done) and tokens keep their own
  passes, two (one per torch thread) computed at once in threads of one
  torch thread each (``$LOCATE_EDIT_TRACE_WORKERS`` overrides).
  :meth:`_FastTracer.buckets` chooses from a rough cost model (arithmetic
  against passes), so tiny models on a CPU are grouped too;
  ``TraceConfig.batching`` overrides the plan. ``iter_trace(...,
  progressive=True)`` runs the rows that carry the story first and yields
  every kind's map as its rows arrive; :func:`trace_profile` times the stages.
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
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .backends import attention_backends, kernel_policy, one_cpu_thread, precision_label, uses_tf32
from .blocks import BlockCall, PrefixCache, capture_calls
from .corruption import Corruption, make_corruption
from .hooks import Hook, StopForward, hooks, main_tensor, replace_main, until_stopped
from .models import LoadedModel, parse_dtype
from .result import ANSWER_METRICS, KINDS, TraceConfig, TraceResult, window_layers
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
    answer_ids: tuple[int, ...]  # every token of the answer (the first is scored by the single-token metrics)
    contrast_id: int | None
    corruption: Corruption
    config: TraceConfig

    @property
    def answer_id(self) -> int:
        return self.answer_ids[0]

    @property
    def read(self) -> int:
        """Last positions whose logits the metric reads: the answer's tokens (teacher-forced), else one."""
        return len(self.answer_ids) if self.config.metric in ANSWER_METRICS else 1

    @property
    def ids(self) -> tuple[int, ...]:
        """The run's tokens: the prompt, then all but the last answer token when the metric reads them all."""
        return self.enc.ids + tuple(self.answer_ids[: self.read - 1])

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.ids], device=self.lm.device)  # (1, tokens)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw metric per row from the read positions' logits, (rows, read, vocab) or (rows, vocab) when one.

        p(answer), a logit difference, or for the answer metrics the summed
        log-probability of every answer token (or its exp).
        """
        logits = logits.float()
        if logits.ndim == 2:
            logits = logits[:, None]
        if self.config.metric in ANSWER_METRICS:
            ids = torch.tensor(self.answer_ids, device=logits.device)  # (read,)
            logp = logits.log_softmax(-1).gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1))
            total = logp[..., 0].sum(-1)  # (rows,)
            return total if self.config.metric == "answer_logprob" else total.exp()
        last = logits[:, -1]
        if self.config.metric == "logit_diff":
            return last[:, self.answer_id] - last[:, self.contrast_id]
        return last.softmax(-1)[:, self.answer_id]

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
    lm: LoadedModel, prompt: str, subject: str, answer: str | None, config: TraceConfig, occurrence: int,
    record: Sequence[Hook] = (),
) -> tuple[_Setup, float, int]:
    """Tokenise, find the subject, fix the answer; return the setup, clean score and answer id.

    ``record``: hooks active during the clean run (e.g. to keep its states).
    """
    plan = _Plan.make(lm, prompt, subject, answer, config, occurrence)
    logits = plan.clean_logits(record)
    setup = plan.setup(logits[0])
    return setup, float(setup.score(logits)[0]), setup.answer_id


@dataclass(frozen=True)
class _Plan:
    """A prompt ready to run before its clean run has fixed the answer (when none was given)."""

    lm: LoadedModel
    enc: EncodedPrompt
    subject: str
    answer_ids: tuple[int, ...]  # the given answer's tokens, or () for the model's own top prediction
    contrast_id: int | None
    corruption: Corruption
    config: TraceConfig

    @classmethod
    def make(cls, lm: LoadedModel, prompt: str, subject: str, answer: str | None, config: TraceConfig,
             occurrence: int) -> _Plan:
        enc = encode_prompt(lm.tokenizer, prompt, subject, occurrence=occurrence, max_length=lm.max_length)
        given = answer is not None and str(answer).strip()
        answer_ids = tuple(continuation_ids(lm.tokenizer, prompt, answer)) if given else ()
        if config.metric in ANSWER_METRICS and len(answer_ids) > 1:
            check_context(lm.max_length, len(enc) + len(answer_ids) - 1, fix="Shorten the prompt or the answer.")
        contrast_id = None
        if config.metric == "logit_diff":
            contrast_id = continuation_ids(lm.tokenizer, prompt, config.contrast)[0]
        return cls(lm, enc, subject.strip(), answer_ids, contrast_id, make_corruption(lm, enc, subject.strip(), config),
                   config)

    @property
    def extra(self) -> tuple[int, ...]:
        """The answer's tokens fed after the prompt (all but its last), when the metric reads them all."""
        return self.answer_ids[:-1] if self.config.metric in ANSWER_METRICS else ()

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.enc.ids + self.extra], device=self.lm.device)  # (1, tokens)

    @property
    def read_from(self) -> int:
        """The first position whose logits the metric reads (the prompt's last token)."""
        return len(self.enc) - 1

    def clean_logits(self, record: Sequence[Hook] = ()) -> torch.Tensor:
        """The clean run's logits (1, read, vocab) at the positions the metric reads; ``record``: hooks during it."""
        with torch.inference_mode(), hooks(self.lm.model, *record):
            hidden = self.lm.model.base_model(self.input_ids, use_cache=False).last_hidden_state  # final norm applied
            return self.lm.unembed(hidden[:, self.read_from:])

    def setup(self, logits: torch.Tensor) -> _Setup:
        """The setup, with the clean run's ``logits`` (read, vocab) fixing the answer if none was given."""
        answer_ids = self.answer_ids or (int(logits[-1].argmax()),)  # the model's top prediction (one token)
        return _Setup(self.lm, self.enc, self.subject, answer_ids, self.contrast_id, self.corruption, self.config)


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
    raw = raw[: len(setup.enc)]  # the prompt's rows (an answer's teacher-forced tokens are read, not traced)
    run = dict(run or {})
    if config.metric == "recovered":
        span = high - low
        raw = (raw - low) / span if span != 0 else np.full_like(raw, np.nan)
        low, high = 0.0, 1.0
        if "low_sd" in run:
            run["low_sd"] = run["low_sd"] / abs(span) if span != 0 else float("nan")
    settings = config.to_dict()
    settings["noise_scale_used"] = setup.corruption.scale
    settings["copies"] = setup.corruption.copies
    if setup.corruption.replacement_subjects:
        settings["replacement_subjects"] = list(setup.corruption.replacement_subjects)
    settings.update(run)
    return TraceResult(
        kind=kind,
        scores=raw,
        low_score=float(low),
        high_score=float(high),
        tokens=setup.enc.tokens,
        subject_range=setup.enc.subject_range,
        answer=setup.lm.tokenizer.decode(list(setup.answer_ids[: setup.read])),
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

    Its rows differ from the corrupted run from block ``start`` on (its input
    there is the corrupted run's, with the clean block output at ``token``
    for ``hidden``); ``window`` lists the blocks whose ``kind`` output is
    restored at ``token``.
    """

    kind: str
    token: int
    layer: int
    start: int
    window: range


@dataclass(frozen=True)
class _Entry:
    """Where one cell's rows enter a forward pass, and what they start from (see :meth:`_FastTracer.entries`).

    At block ``join`` the rows are the corrupted run's input there, or, with
    ``parent``, a copy of that cell's rows (identical up to there). ``patch``:
    the input at the cell's token is replaced on entry (``hidden``: the clean
    block output; ``mlp``: the first window block's output with the clean MLP
    output in place of the corrupted one). ``depth`` orders copies after
    their parents.
    """

    join: int
    parent: int | None = None
    patch: bool = False
    depth: int = 0


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


PROFILE_STAGES = ("base_runs", "blocks", "attention", "mlp", "rest_of_blocks", "unembedding", "bookkeeping")


class _Profile:
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


class _FastTracer:
    """Clean and corrupted runs once, then restored rows batched layer by layer.

    ``sweep(t0, cells)`` runs one forward pass over many cells whose rows all
    compute positions ``t0..`` (``t0`` at most each cell's token).
    """

    def __init__(self, setup: _Setup, profile: _Profile | None = None, workers: int = 1):
        self.setup = setup
        lm = setup.lm
        self.lm = lm
        self.profile = profile
        self.workers = workers  # passes computed at once, each in its own thread
        self._local = threading.local()  # the plan of the pass this thread runs (see pass_hooks)
        self.n_layers = lm.n_layers
        self.n_tokens = len(setup.ids)  # the prompt, and for the answer metrics all but the last answer token
        self.read = setup.read
        self.copies = setup.corruption.copies
        self.calls: dict[int, list[BlockCall]] = {}
        with torch.inference_mode(), self._stage("base_runs"):
            self._base_runs()
        self.budget = self._budget_bytes() // workers  # after the base runs: what is free for restored rows

    def _stage(self, name: str):
        return self.profile.stage(name) if self.profile else nullcontext()

    def calls_for(self, start: int) -> list[BlockCall]:
        if start not in self.calls:
            with self._stage("base_runs"):
                self.calls[start] = capture_calls(self.lm, self.setup.ids, start)[0]
        return self.calls[start]

    def _base_runs(self) -> None:
        lm, setup = self.lm, self.setup
        calls, clean_in = capture_calls(lm, setup.ids, 0)
        self.calls[0] = calls

        # Clean run: keep every block output and every MLP / attention output.
        self.clean = {kind: [None] * self.n_layers for kind in KINDS}
        self.corrupt_mlp: list[torch.Tensor | None] = [None] * self.n_layers  # (copies, tokens, d_model) each
        self.corrupt_attn: list[torch.Tensor | None] = [None] * self.n_layers  # the same, for attention outputs

        def keeper(store, layer, row=None):
            def keep(module, args, output):
                state = main_tensor(output)
                store[layer] = state if row is None else state[row]

            return keep

        specs = [Hook(lm.module_name(kind, j), keeper(self.clean[kind], j, 0)) for kind in KINDS
                 for j in range(self.n_layers)]
        with hooks(lm.model, *specs):
            final = self._run_layers(clean_in, 0, 0, PrefixCache())
        self.high = float(setup.score(self._logits(final))[0])

        # Corrupted run: keep every block's input, every MLP and attention output and every layer's keys and values.
        corrupt_in = self._corrupted_input()
        recorder = PrefixCache(record=True)
        self.corrupt_in: list[torch.Tensor] = []  # n_layers + 1 entries of (copies, tokens, d_model)
        specs = [Hook(lm.module_name(kind, j), keeper(store, j)) for kind, store in
                 (("mlp", self.corrupt_mlp), ("attn", self.corrupt_attn)) for j in range(self.n_layers)]
        with hooks(lm.model, *specs):
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
        """Logits at the positions the metric reads only: (rows, read, vocab)."""
        return self.lm.unembed(self.lm.final_norm(hidden[:, -self.read:]))

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

    def entries(self, cells: Sequence[_Cell]) -> list[_Entry | None]:
        """Where each cell's rows enter a pass: only where they first differ from rows already computed.

        * A ``hidden`` cell of the last layer at an earlier token than the
          last changes nothing the score reads: None (its score is the low
          score).
        * An ``mlp`` cell skips the first block of its window: there only its
          token's MLP output changes, and the block adds that output to the
          residual stream, so the next block's input is the corrupted run's
          with (clean - corrupted MLP output) added at the token.
        * Window cells of one kind and token that start at the same block
          (windows clipped at layer 0) restore the same states until the
          shorter window ends: the longer one joins there as a copy of the
          shorter one's rows.
        """
        last_token = self.n_tokens - self.read  # the first position the metric reads
        out: list[_Entry | None] = []
        for c in cells:
            if c.kind == "hidden":
                out.append(None if c.start == self.n_layers and c.token < last_token else _Entry(c.start, patch=True))
            elif c.kind == "mlp":
                out.append(_Entry(c.start + 1, patch=True))
            else:
                out.append(_Entry(c.start))
        same_start: dict[tuple, list[int]] = {}
        for i, c in enumerate(cells):
            if c.kind != "hidden":
                same_start.setdefault((c.kind, c.token, c.start), []).append(i)
        for members in same_start.values():
            members.sort(key=lambda i: cells[i].window.stop)
            for depth, (shorter, longer) in enumerate(zip(members, members[1:]), start=1):
                out[longer] = _Entry(cells[shorter].window.stop, parent=shorter, depth=depth)
        return out

    def sweep(self, t0: int, cells: Sequence[_Cell]) -> np.ndarray:
        """Mean scores (cells,) of one batch of cells; rows compute positions ``t0..``.

        Each cell owns ``copies`` consecutive rows (copy s reading copy s's
        prefix), in the order the cells join (:meth:`entries`). A row of token
        t > t0 recomputes positions t0..t-1 exactly as the corrupted run did.
        """
        lm, copies, n_layers = self.lm, self.copies, self.n_layers
        device = lm.device
        assert all(c.token >= t0 for c in cells)
        entries = self.entries(cells)
        order = sorted((i for i, e in enumerate(entries) if e is not None),
                       key=lambda i: (entries[i].join, entries[i].depth, i))
        slot = {cell: rank for rank, cell in enumerate(order)}  # cell index -> its block of rows
        out = np.full(len(cells), self.low)  # cells without an entry keep the low score
        if not order:
            return out
        restore = self._restore_plan(t0, cells, entries, slot)  # (kind, layer) -> (rows, positions, clean states)
        patches = self._input_patches(t0, cells, entries, slot)  # block -> (rows, positions, states)
        calls = self.calls_for(t0)
        prefix = [(k[:, :, :t0], v[:, :, :t0]) for k, v in self.kv]
        sample = torch.arange(copies, device=device).repeat(len(order))  # (rows,) the copy each row belongs to
        joins = [entries[i].join for i in order]
        hidden, joined = None, 0
        timers = self.profile.module_hooks(lm) if self.profile else []
        self._local.restore, self._local.positions = restore, self.n_tokens - t0  # read by the pass hooks
        try:
            with hooks(lm.model, *timers):
                for j in range(joins[0], n_layers + 1):
                    upto = bisect.bisect_right(joins, j)
                    if upto > joined:
                        hidden = self._join(hidden, t0, j, order[joined:upto], entries, slot, patches.get(j))
                        joined = upto
                    if j == n_layers:
                        break
                    cache = PrefixCache(prefix, rows=sample[: hidden.shape[0]])
                    with self._stage("blocks"):
                        hidden = calls[j](lm.block(j), hidden, cache)
                    if self.profile:
                        self.profile.block_calls += 1
        finally:
            self._local.restore, self._local.positions, self._local.widen = None, 0, None
        with self._stage("unembedding"):
            scores = self._scores(hidden)  # (rows,)
        means = scores.reshape(len(order), copies).mean(1).double().cpu().numpy()
        out[order] = means
        return out

    def _join(self, hidden, t0: int, j: int, joining: Sequence[int], entries, slot, patch) -> torch.Tensor:
        """Rows of the cells joining at block ``j`` appended to ``hidden``: new rows, their patches, then copies."""
        fresh = [i for i in joining if entries[i].parent is None]
        if fresh:
            rows = self.corrupt_in[j][:, t0:].repeat(len(fresh), 1, 1)  # (new rows, positions, d_model)
            hidden = rows if hidden is None else torch.cat([hidden, rows])
        if patch is not None:
            index, position, states = patch
            hidden[index, position] = states
        forks = [i for i in joining if entries[i].parent is not None]
        for depth in sorted({entries[i].depth for i in forks}):  # a parent's rows exist before they are copied
            parents = [slot[entries[i].parent] for i in forks if entries[i].depth == depth]
            index = torch.from_numpy(self._rows_of(parents)).to(hidden.device)
            hidden = torch.cat([hidden, hidden[index]])
        return hidden

    def _rows_of(self, slots: Sequence[int]) -> np.ndarray:
        """Row indices (slots * copies,) of the cells in these row slots."""
        return (np.asarray(slots, dtype=np.int64)[:, None] * self.copies + np.arange(self.copies)).ravel()

    def _rows(self, members: Sequence[int], slot) -> np.ndarray:
        return self._rows_of([slot[i] for i in members])

    def _restore_plan(self, t0: int, cells: Sequence[_Cell], entries, slot) -> dict[tuple[str, int], tuple]:
        """(kind, block) -> (row index, position index, clean states) of every ``mlp``/``attn`` restore in a pass.

        A cell restores its kind's output at its token in every block of its
        window from the block it joins at (a copied cell's earlier blocks were
        restored in its parent's rows). One upload for the whole pass.
        """
        wanted: dict[tuple[str, int], list[int]] = {}
        for i, c in enumerate(cells):
            if c.kind != "hidden" and entries[i] is not None:
                for j in c.window:
                    if j >= entries[i].join:
                        wanted.setdefault((c.kind, j), []).append(i)
        if not wanted:
            return {}
        tokens = np.array([c.token for c in cells])
        pieces, bounds = [], {}
        for key, members in wanted.items():
            rows = self._rows(members, slot)
            toks = np.repeat(tokens[members], self.copies)
            bounds[key] = (sum(p.shape[1] for p in pieces), rows.size)
            pieces.append(np.stack([rows, toks - t0, toks]))
        flat = torch.from_numpy(np.concatenate(pieces, axis=1)).to(self.lm.device)  # (3, restores)
        out = {}
        for (kind, j), (offset, size) in bounds.items():
            index, position, token = flat[:, offset : offset + size]
            out[kind, j] = (index, position, self.clean[kind][j][token])
        return out

    def _input_patches(self, t0: int, cells: Sequence[_Cell], entries, slot) -> dict[int, tuple]:
        """block -> (row index, position index, states) written into joining rows' inputs (see :meth:`entries`)."""
        by_block: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            if e is not None and e.patch:
                by_block.setdefault(e.join, []).append(i)
        out = {}
        device = self.lm.device
        for j, members in by_block.items():
            states = []
            for i in members:
                c = cells[i]
                if c.kind == "hidden":
                    states.append(self.clean["hidden"][j - 1][c.token].expand(self.copies, -1))
                else:  # mlp: block j-1's output with the clean MLP output at the token (computed in float32)
                    before = self.corrupt_in[j][:, c.token].float() - self.corrupt_mlp[j - 1][:, c.token].float()
                    states.append((before + self.clean["mlp"][j - 1][c.token].float()).to(self.lm.dtype))
            rows = torch.from_numpy(self._rows(members, slot)).to(device)
            position = torch.tensor([cells[i].token - t0 for i in members], device=device).repeat_interleave(self.copies)
            out[j] = (rows, position, torch.cat(states))  # states: (rows, d_model)
        return out

    def pass_hooks(self) -> list[Hook]:
        """The hooks every pass needs, registered once around all of a trace's passes.

        Each applies the plan of the pass that its own thread is running
        (thread-local, set by :meth:`sweep`), so that passes may run in
        parallel threads: the restores of MLP and attention outputs, and the
        last block's MLP run at the last position only (the scores read
        nothing else there). Outside a pass they do nothing.
        """
        last = self.lm.module_name("mlp", self.n_layers - 1)
        specs = [Hook(last, self._last_position_only, pre=True), Hook(last, self._widen)]  # before its restore
        for kind in ("mlp", "attn"):
            specs += [Hook(self.lm.module_name(kind, j), self._restorer(kind, j)) for j in range(self.n_layers)]
        return specs

    def _last_position_only(self, module, args, kwargs):
        positions = getattr(self._local, "positions", 0)
        if positions > self.read and args and isinstance(args[0], torch.Tensor) and args[0].ndim == 3 \
                and args[0].shape[1] == positions:
            self._local.widen = positions
            return (args[0][:, -self.read:].contiguous(), *args[1:]), kwargs  # (rows, read, d_model)
        return None

    def _widen(self, module, args, output):
        positions = getattr(self._local, "widen", None)
        if not positions:
            return None
        self._local.widen = None
        state = main_tensor(output)  # (rows, read, d_model)
        full = state.new_zeros(state.shape[0], positions, state.shape[-1])  # earlier positions: never read
        full[:, -self.read:] = state
        return replace_main(output, full)

    def _restorer(self, kind: str, layer: int) -> Callable:
        def restore(module, args, output):
            plan = getattr(self._local, "restore", None)
            if not plan or (kind, layer) not in plan:
                return None
            index, position, clean = plan[kind, layer]
            state = main_tensor(output)
            state[index, position] = clean
            return replace_main(output, state)

        return restore

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The metric per row (rows,), unembedding as many rows at a time as the budget allows."""
        vocab = self.lm.unembed.weight.shape[0]
        step = max(1, self.budget // (vocab * 4 * 3 * self.read))  # logits, their float copy and the softmax
        return torch.cat([self.setup.score(self._logits(hidden[i : i + step])) for i in range(0, hidden.shape[0], step)])


def _story_tokens(setup: _Setup) -> tuple[int, ...]:
    """The rows that carry the story: the last subject token and the last token."""
    return tuple(dict.fromkeys((setup.enc.last_subject_token, len(setup.enc) - 1)))


WORKERS_ENV = "LOCATE_EDIT_TRACE_WORKERS"


def _workers(device: torch.device) -> int:
    """Passes computed at once: on a CPU one per torch thread, each pass single-threaded; elsewhere one.

    Two single-threaded passes keep two cores busier than one pass on two
    threads (whose small matrix products and elementwise steps wait on each
    other), and a busy shared machine cannot stall them at every operation.
    ``$LOCATE_EDIT_TRACE_WORKERS`` overrides (1: one pass at a time on torch's threads).
    """
    if device.type != "cpu":
        return 1
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"${WORKERS_ENV}={value!r} is not a number; set it to the passes to run at once "
                             "(1: one at a time), or unset it.") from None
    return max(1, torch.get_num_threads())


def _iter_fast(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None,
    kinds: Sequence[str],
    config: TraceConfig,
    occurrence: int,
    progress: Progress | None,
    progressive: bool,
    profile: _Profile | None = None,
) -> Iterator[TraceResult]:
    kinds = _check_kinds(kinds)
    started = time.perf_counter()
    lm = _with_precision(lm, config.precision)
    policy = dict(tf32=config.precision == "tf32", dtype=lm.dtype)
    workers = 1 if profile else _workers(lm.device)
    with kernel_policy(lm.device, **policy):
        setup, _, _ = _prepare(lm, prompt, subject, answer, config, occurrence)
        tracer = _FastTracer(setup, profile, workers)
    positions = setup.token_positions()
    skipped = [t for t in positions if config.skip and t < setup.enc.subject_start]
    swept = [t for t in positions if t not in skipped]
    if progressive:  # the story's rows first, then the others top to bottom, each token's kinds together
        story = [t for t in _story_tokens(setup) if t in swept]
        rank = {t: i for i, t in enumerate(story + [t for t in swept if t not in story])}
        passes = []
        for group in (story, [t for t in swept if t not in story]):
            planned = tracer.plan(kinds, group, config.batching)
            passes += sorted(planned, key=lambda p: min(rank[c.token] for c in p[1]))  # stable: kinds in order
    else:
        passes = tracer.plan(kinds, swept, config.batching)
    raw = {kind: np.full((tracer.n_tokens, tracer.n_layers), np.nan) for kind in kinds}
    for kind in kinds:
        raw[kind][skipped] = tracer.low  # these states are identical in the clean and corrupted runs
    left = {(kind, t): tracer.n_layers for kind in kinds for t in swept}  # cells still to compute
    kinds_left = {kind: len(swept) for kind in kinds}
    total, done, swept_passes = len(kinds) * len(positions), len(kinds) * len(skipped), 0
    if progress and done:
        progress(done, total)
    batching = config.batching if config.batching != "auto" else ("kind" if lm.device.type == "cpu" else "all")

    rows = tracer.low_rows.double()
    low_sd = float(rows.std()) if len(rows) > 1 else 0.0  # the corrupted copies' spread (see suggest_edit_layer)

    def result(kind: str) -> TraceResult:
        complete = kinds_left[kind] == 0
        run = _run_settings(lm, config, started) | {"batching": batching, "passes": swept_passes,
                                                     "complete": complete, "low_sd": low_sd}
        return _results(setup, kind, raw[kind] if complete else raw[kind].copy(), tracer.low, tracer.high, run)

    def sweep(t0: int, cells: Sequence[_Cell]) -> np.ndarray:
        with torch.inference_mode(), kernel_policy(lm.device, **policy):  # both are per thread
            return tracer.sweep(t0, cells)

    with ExitStack() as stack:  # spans the yields below: the hooks and threads serve every pass of this trace
        stack.enter_context(hooks(lm.model, *tracer.pass_hooks()))
        if workers > 1 and len(passes) > 1:
            for t0 in dict.fromkeys(t0 for t0, _ in passes):
                tracer.calls_for(t0)  # captured here: capturing runs the model, which the workers then share
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="trace-pass")
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            futures = [pool.submit(sweep, t0, cells) for t0, cells in passes]
            outcomes = (future.result for future in futures)
        else:
            outcomes = (lambda t0=t0, cells=cells: sweep(t0, cells) for t0, cells in passes)
        pending = list(kinds)
        for item, outcome in zip([None, *passes], [None, *outcomes]):  # None first: a kind with nothing to sweep
            changed: list[str] = []  # is ready at once
            if item is not None:
                scores = outcome()
                swept_passes += 1
                finished = 0
                for cell, score in zip(item[1], scores):
                    raw[cell.kind][cell.token, cell.layer] = score
                    left[cell.kind, cell.token] -= 1
                    if left[cell.kind, cell.token] == 0:
                        kinds_left[cell.kind] -= 1
                        finished += 1
                        if cell.kind not in changed:
                            changed.append(cell.kind)
                done += finished
                if progress and finished:
                    progress(done, total)
            if progressive:
                for kind in kinds:
                    if kind in changed and kinds_left[kind] > 0:
                        yield result(kind)
            while pending and kinds_left[pending[0]] == 0:
                yield result(pending.pop(0))


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
    yield from _iter_fast(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence,
                          progress=progress, progressive=progressive)


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


def trace_profile(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    config: TraceConfig = TraceConfig(),
    occurrence: int = 0,
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
    profile = _Profile(lm.device)
    started = profile._now()
    results = list(_iter_fast(lm, prompt, subject, answer=answer, kinds=kinds, config=config, occurrence=occurrence,
                              progress=None, progressive=False, profile=profile))
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

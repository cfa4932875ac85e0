"""The fast engine: exact causal traces with many restored cells per forward pass.

One clean run (the model's own forward pass, which also records what each
block is called with) and one corrupted run (the blocks called directly,
keeping every block's input, every MLP and attention output and every
layer's keys and values). Then the restored cells run in a few forward passes
of direct block calls (:mod:`tracing.blocks`), each row starting at the first
layer it changes (layers below are the corrupted run's), computing only
positions from its pass's first token on (earlier positions keep the
corrupted run's keys and values), and unembedding only the positions the
metric reads. Positions before the subject are never corrupted, so restoring
them gives the low score without any work. Work that cannot change a score
is skipped further (:meth:`tracing.passes.Planner.entries`): an MLP window's
first block changes only its token, by the MLP output it adds, so its rows
join one block later; windows clipped at layer 0 share their rows until the
shorter one ends; the last block runs its MLP at the read positions only; a
hidden state restored in the last layer before the last token changes
nothing scored.

Which cells share a pass is :mod:`tracing.passes`' plan. Whatever the plan, a
pass costs a fixed number of operations per block: its restores are one
indexed write per (kind, block) for all of its rows, and the rows that join
at a block are appended and patched with a few batched operations, never an
operation per cell. On a CPU two passes (one per torch thread) run at once,
each on one torch thread (``$LOCATE_EDIT_TRACE_WORKERS`` overrides).

Example::

    for result in run_trace(lm, prompt, subject, answer=None, kinds=KINDS, config=TraceConfig(),
                            occurrence=0, progress=None, progressive=False):
        ...          # what tracing.iter_trace yields
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext

import numpy as np
import torch

from .backends import kernel_policy
from .blocks import BlockCall, PrefixCache, capture_calls, record_calls
from .hooks import Hook, StopForward, hooks, main_tensor, replace_main, until_stopped
from .models import LoadedModel
from .passes import Cell, Planner, Target, memory_budget
from .prepare import PromptPlan, Setup, check_kinds, run_settings, to_result, with_precision
from .profiling import Profile
from .result import KINDS, TraceConfig, TraceResult

Progress = Callable[[int, int], None]
WORKERS_ENV = "LOCATE_EDIT_TRACE_WORKERS"


def _keeper(store: list, layer: int, row: int | None = None) -> Callable:
    """A forward hook that keeps a module's output (or one row of it) in ``store[layer]``."""

    def keep(module, args, output):
        state = main_tensor(output)
        store[layer] = state if row is None else state[row]

    return keep


class FastTracer:
    """One prompt's clean and corrupted runs, then restored rows batched layer by layer.

    ``sweep(t0, cells)`` runs one forward pass over many cells whose rows all
    compute positions ``t0..`` (``t0`` at most each cell's token);
    ``planner`` says which cells share a pass.
    """

    def __init__(self, plan: PromptPlan, profile: Profile | None = None, workers: int = 1,
                 target: Target | None = None):
        lm = plan.lm
        self.lm = lm
        self.profile = profile
        self.workers = workers  # passes computed at once, each in its own thread
        self._local = threading.local()  # the plan of the pass this thread runs (see pass_hooks)
        self.n_layers = lm.n_layers
        self.calls: dict[int, list[BlockCall]] = {}
        with torch.inference_mode(), self._stage("base_runs"):
            self._base_runs(plan)
        config = self.setup.config
        target = target or Target.of(lm.device, lm.dtype, config.precision == "tf32")
        self.budget = memory_budget(lm.device, config, target) // workers  # after the base runs: what is free
        self.planner = Planner(lm, n_tokens=self.n_tokens, read=self.read, copies=self.copies, config=config,
                               target=target, memory=self.budget)

    def _stage(self, name: str):
        return self.profile.stage(name) if self.profile else nullcontext()

    def calls_for(self, start: int) -> list[BlockCall]:
        """What each block is called with when positions ``start..`` run after a cached prefix."""
        if start not in self.calls:
            with self._stage("base_runs"):
                self.calls[start] = capture_calls(self.lm, self.setup.ids, start)[0]
        return self.calls[start]

    def _base_runs(self, plan: PromptPlan) -> None:
        lm, n_layers = self.lm, self.n_layers

        # Clean run, the model's own: fixes the answer and records each block's call and every clean state.
        self.clean = {kind: [None] * n_layers for kind in KINDS}
        recorders, calls, _ = record_calls(lm)
        keepers = [Hook(lm.module_name(kind, j), _keeper(self.clean[kind], j, 0)) for kind in KINDS
                   for j in range(n_layers)]
        logits = plan.clean_logits([*recorders, *keepers], use_cache=True)
        self.setup = setup = plan.setup(logits[0])
        self.high = float(setup.score(logits)[0])
        self.calls[0] = [calls[j] for j in range(n_layers)]
        self.n_tokens = len(setup.ids)  # the prompt, and for the answer metrics all but the last answer token
        self.read = setup.read
        self.copies = setup.corruption.copies

        # Corrupted run: keep every block's input, every MLP and attention output and every layer's keys and values.
        self.corrupt_mlp: list[torch.Tensor | None] = [None] * n_layers  # (copies, tokens, d_model) each
        self.corrupt_attn: list[torch.Tensor | None] = [None] * n_layers  # the same, for attention outputs
        recorder = PrefixCache(record=True)
        self.corrupt_in: list[torch.Tensor] = []  # n_layers + 1 entries of (copies, tokens, d_model)
        keepers = [Hook(lm.module_name(kind, j), _keeper(store, j)) for kind, store in
                   (("mlp", self.corrupt_mlp), ("attn", self.corrupt_attn)) for j in range(n_layers)]
        with hooks(lm.model, *keepers):
            hidden = self._corrupted_input()
            for j in range(n_layers):
                self.corrupt_in.append(hidden)
                hidden = self.calls[0][j](lm.block(j), hidden, recorder)
        self.corrupt_in.append(hidden)
        self.kv = [recorder.recorded[j] for j in range(n_layers)]  # (copies, kv_heads, tokens, head_dim) each
        self.low_rows = setup.score(self._logits(hidden))  # (copies,)
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

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits at the positions the metric reads only: (rows, read, vocab)."""
        return self.lm.unembed(self.lm.final_norm(hidden[:, -self.read:]))

    def plan(self, kinds: Sequence[str], tokens: Sequence[int], batching: str) -> list[tuple[int, list[Cell]]]:
        """The passes of these kinds and tokens (see :meth:`tracing.passes.Planner.plan`)."""
        return self.planner.plan(kinds, tokens, batching)

    # --- one forward pass ----------------------------------------------------

    def sweep(self, t0: int, cells: Sequence[Cell]) -> np.ndarray:
        """Mean scores (cells,) of one batch of cells; rows compute positions ``t0..``.

        Each cell owns ``copies`` consecutive rows (copy s reading copy s's
        prefix), in the order the cells join (:meth:`Planner.entries`). A row of token
        t > t0 recomputes positions t0..t-1 exactly as the corrupted run did.
        """
        lm, copies, n_layers = self.lm, self.copies, self.n_layers
        device = lm.device
        assert all(c.token >= t0 for c in cells)
        entries = self.planner.entries(cells)
        order = sorted((i for i, e in enumerate(entries) if e is not None),
                       key=lambda i: (entries[i].join, entries[i].depth, i))
        slot = {cell: rank for rank, cell in enumerate(order)}  # cell index -> its block of rows
        out = np.full(len(cells), self.low)  # cells without an entry keep the low score
        if not order:
            return out
        restore, patches = self._indices(t0, cells, entries, slot)  # (kind, layer) / block -> indices and states
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
                        hidden = self._join(hidden, t0, j, order[joined:upto], entries, slot, patches.get(j, ()))
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
            scores = self.scores(hidden)  # (rows,)
        means = scores.reshape(len(order), copies).mean(1).double().cpu().numpy()
        out[order] = means
        return out

    def _join(self, hidden, t0: int, j: int, joining: Sequence[int], entries, slot, patches) -> torch.Tensor:
        """Rows of the cells joining at block ``j`` appended to ``hidden``: new rows, their patches, then copies."""
        fresh = [i for i in joining if entries[i].parent is None]
        if fresh:
            rows = self.corrupt_in[j][:, t0:].repeat(len(fresh), 1, 1)  # (new rows, positions, d_model)
            hidden = rows if hidden is None else torch.cat([hidden, rows])
        for index, position, states in patches:
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

    def _indices(self, t0: int, cells: Sequence[Cell], entries, slot) -> tuple[dict, dict]:
        """Every index a pass writes with, uploaded at once, and the states written.

        Returns ``restore``: (kind, block) -> (row index, position index,
        clean states) for the ``mlp``/``attn`` outputs restored in that block
        (a cell restores its window's blocks from the one it joins at; a
        copied cell's earlier blocks were restored in its parent's rows), and
        ``patches``: block -> [(row index, position index, states), ...]
        written into the inputs of the rows joining there (see
        :meth:`Planner.entries`), one triple per kind.
        """
        groups: dict[tuple, list[int]] = {}  # ("restore", kind, block) or ("patch", kind, block) -> cells
        for i, (c, e) in enumerate(zip(cells, entries)):
            if e is None:
                continue
            if e.patch:
                groups.setdefault(("patch", c.kind, e.join), []).append(i)
            if c.kind != "hidden":
                for j in c.window:
                    if j >= e.join:
                        groups.setdefault(("restore", c.kind, j), []).append(i)
        if not groups:
            return {}, {}
        tokens = np.array([c.token for c in cells])
        copy = np.arange(self.copies)
        pieces, bounds = [], {}
        for key, members in groups.items():
            toks = np.repeat(tokens[members], self.copies)
            bounds[key] = (sum(p.shape[1] for p in pieces), toks.size)
            pieces.append(np.stack([self._rows_of([slot[i] for i in members]), toks - t0, toks,
                                    np.tile(copy, len(members))]))
        flat = torch.from_numpy(np.concatenate(pieces, axis=1)).to(self.lm.device)  # (4, indices): one upload
        on = {flat.device: flat}  # and one copy per other device a sharded model's blocks write on
        restore, patches = {}, {}
        for (what, kind, j), (offset, size) in bounds.items():
            meets = (self.clean[kind][j] if what == "restore" else self.clean["hidden"][j - 1]).device
            if meets not in on:
                on[meets] = flat.to(meets)
            index, position, token, sample = on[meets][:, offset : offset + size]
            if what == "restore":
                restore[kind, j] = (index, position, self.clean[kind][j][token])
            else:
                patches.setdefault(j, []).append((index, position, self._patch_states(kind, j, token, sample)))
        return restore, patches

    def _patch_states(self, kind: str, j: int, token: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """States (rows, d_model) that rows joining at block ``j`` get at their token (one op per term).

        ``hidden``: the clean output of block j-1. ``mlp``: block j-1's
        corrupted output with the clean MLP output in place of the corrupted
        one (computed in float32).
        """
        if kind == "hidden":
            return self.clean["hidden"][j - 1][token]
        before = self.corrupt_in[j][sample, token].float() - self.corrupt_mlp[j - 1][sample, token].float()
        return (before + self.clean["mlp"][j - 1][token].float()).to(self.lm.dtype)

    def pass_hooks(self) -> list[Hook]:
        """The hooks every pass needs, registered once around all of a trace's passes.

        Each applies the plan of the pass that its own thread is running
        (thread-local, set by :meth:`sweep`), so that passes may run in
        parallel threads: the restores of MLP and attention outputs, and the
        last block's MLP run at the read positions only (the scores read
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

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The metric per row (rows,), unembedding as many rows at a time as the budget allows."""
        vocab = self.lm.unembed.weight.shape[0]
        step = max(1, self.budget // (vocab * 4 * 3 * self.read))  # logits, their float copy and the softmax
        return torch.cat([self.setup.score(self._logits(hidden[i : i + step])) for i in range(0, hidden.shape[0], step)])


def story_tokens(setup: Setup) -> tuple[int, ...]:
    """The rows that carry the story: the last subject token and the last token."""
    return tuple(dict.fromkeys((setup.enc.last_subject_token, len(setup.enc) - 1)))


def workers(device: torch.device, target: Target | None = None) -> int:
    """Passes computed at once: on a CPU one per torch thread, each pass single-threaded; elsewhere one.

    Two single-threaded passes keep two cores busier than one pass on two
    threads (whose small matrix products and elementwise steps wait on each
    other), and a busy shared machine cannot stall them at every operation.
    ``$LOCATE_EDIT_TRACE_WORKERS`` overrides (1: one pass at a time on torch's
    threads). A plan made for another device (``target``) runs as it would
    there: one pass at a time on a GPU.
    """
    if device.type != "cpu" or (target is not None and target.device_type != "cpu"):
        return 1
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"${WORKERS_ENV}={value!r} is not a number; set it to the passes to run at once "
                             "(1: one at a time), or unset it.") from None
    return max(1, torch.get_num_threads())


def run_trace(
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
    profile: Profile | None = None,
    target: Target | None = None,
) -> Iterator[TraceResult]:
    """What :func:`tracing.iter_trace` yields; ``profile`` times the stages, ``target`` plans for another device."""
    kinds = check_kinds(kinds)
    started = time.perf_counter()
    lm = with_precision(lm, config.precision)
    policy = dict(tf32=config.precision == "tf32", dtype=lm.dtype)
    # Offloaded weights are loaded into their module for a pass and dropped after it: one pass at a time.
    n_workers = 1 if profile or lm.offloaded else workers(lm.device, target)
    with kernel_policy(lm.device, **policy):
        plan = PromptPlan.make(lm, prompt, subject, answer, config, occurrence)
        tracer = FastTracer(plan, profile, n_workers, target)
    setup = tracer.setup
    positions = setup.token_positions()
    skipped = [t for t in positions if config.skip and t < setup.enc.subject_start]
    swept = [t for t in positions if t not in skipped]
    if progressive:  # the story's rows first, then the others top to bottom, each token's kinds together
        story = [t for t in story_tokens(setup) if t in swept]
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
    batching = config.batching if config.batching != "auto" else tracer.planner.auto_batching

    rows = tracer.low_rows.double()
    low_sd = float(rows.std()) if len(rows) > 1 else 0.0  # the corrupted copies' spread (see suggest_edit_layer)

    def result(kind: str) -> TraceResult:
        complete = kinds_left[kind] == 0
        run = run_settings(lm, config, started) | {"batching": batching, "passes": swept_passes,
                                                   "complete": complete, "low_sd": low_sd}
        return to_result(setup, kind, raw[kind] if complete else raw[kind].copy(), tracer.low, tracer.high, run)

    def sweep(t0: int, cells: Sequence[Cell]) -> np.ndarray:
        with torch.inference_mode(), kernel_policy(lm.device, **policy):  # both are per thread
            return tracer.sweep(t0, cells)

    with ExitStack() as stack:  # spans the yields below: the hooks and threads serve every pass of this trace
        stack.enter_context(hooks(lm.model, *tracer.pass_hooks()))
        if n_workers > 1 and len(passes) > 1:
            for t0 in dict.fromkeys(t0 for t0, _ in passes):
                tracer.calls_for(t0)  # captured here: capturing runs the model, which the workers then share
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1)
            pool = ThreadPoolExecutor(n_workers, thread_name_prefix="trace-pass")
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

"""Which restored cells share a forward pass: the fast engine's plan.

A heatmap cell -- restore one kind of state at one token in one layer -- is
``copies`` rows of a forward pass. The engine (:mod:`tracing.fast`) puts many
cells' rows into one pass; which ones is this module's choice, and it never
changes a score. Two things pull against each other:

* **Launches.** Every block call costs a few dozen kernel launches and some
  Python, whatever the number of rows; a GPU spends most of a small model's
  trace there. Fewer, fuller passes pay them less often.
* **Arithmetic and memory.** A pass's rows compute every position from the
  pass's first token on, so grouping tokens pads the later tokens' rows with
  positions they do not need (they recompute the corrupted run exactly), and
  all of a pass's rows live in memory at once.

A :class:`Target` holds the device figures that decide it: how fast the
device multiplies, what a block call costs beyond that, and the memory one
pass may use (``TraceConfig.memory_mb`` overrides). :class:`Planner` groups
tokens into buckets with a small dynamic programme over those figures and
cuts each bucket's cells into passes that fit the memory. On a CPU
(arithmetic-bound) each kind and token keeps its own pass; on a GPU the three
kinds share passes and a small model's whole trace is one pass.
:meth:`Target.gpu` plans as a GPU with a given memory would, so that a CPU can
count what a GPU would run (``benchmarks/trace_speed.py --count``).

Example::

    planner = Planner(lm, n_tokens=10, read=1, copies=10, config=TraceConfig(), target=Target.gpu(lm))
    passes = planner.plan(KINDS, range(0, 10), "all")      # [(first position, cells sorted by start), ...]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backends import uses_tf32
from .models import LoadedModel
from .result import TraceConfig, window_layers

MAX_ROWS = 32768  # rows per forward pass: attention kernels put the batch in a 65,535-wide grid dimension
BUCKET_SPAN = 64  # tokens one bucket may cover (bounds the planner's work on long prompts)
CPU_MEMORY = 2**30  # bytes of restored rows per pass on a CPU, unless TraceConfig.memory_mb says otherwise
GPU_SHARE = 4  # on a GPU, a pass may use 1/GPU_SHARE of the memory that is free (at least CPU_MEMORY)


@dataclass(frozen=True)
class Cell:
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
class Entry:
    """Where one cell's rows enter a forward pass, and what they start from (see :meth:`Planner.entries`).

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
class Target:
    """The device a trace's passes are planned for; the scores never depend on it.

    ``flops``: matrix arithmetic per second; ``per_call``: seconds one block
    call costs beyond its arithmetic (Python and kernel launches); ``memory``:
    bytes for one pass of restored rows, or None to measure the device when
    the engine starts (1 GiB on a CPU, a quarter of a GPU's free memory).
    ``device_type`` decides what ``batching="auto"`` means: kinds apart on a
    CPU (each heatmap streams as soon as it is done), together elsewhere.
    """

    device_type: str
    flops: float
    per_call: float
    memory: int | None = None

    @classmethod
    def of(cls, device: torch.device | str, dtype: torch.dtype, tf32: bool = False) -> Target:
        """Rough figures for ``device`` (orders of magnitude are enough to choose a plan).

        2 CPU cores run the default model at ~1e11 FLOP/s with ~0.3 ms per
        block call; an H200 ran a block call in ~1 ms of launches, and matrix
        products far faster than the CPU.
        """
        device_type = torch.device(device).type
        if device_type == "cpu":
            return cls("cpu", flops=1e11, per_call=3e-4)
        if dtype in (torch.bfloat16, torch.float16):
            return cls(device_type, flops=3e14, per_call=1e-3)
        return cls(device_type, flops=1e14 if uses_tf32(device, dtype, tf32) else 4e13, per_call=1e-3)

    @classmethod
    def gpu(cls, lm: LoadedModel, memory_gib: float = 24.0, dtype: torch.dtype | None = None,
            tf32: bool = False) -> Target:
        """The plan a CUDA GPU with ``memory_gib`` would run this model with, wherever the model is.

        Example::

            trace(lm, prompt, subject, target=Target.gpu(lm))   # on a CPU: the passes a 24 GiB GPU would run

        Its memory for restored rows is what the engine would take there: a
        quarter of what the weights leave free (at least 1 GiB).
        """
        dtype = dtype or lm.dtype
        weights = sum(p.numel() for p in lm.model.parameters()) * dtype.itemsize
        free = max(0, int(memory_gib * 2**30) - weights)
        speed = cls.of("cuda", dtype, tf32)
        return cls("cuda", flops=speed.flops, per_call=speed.per_call, memory=max(CPU_MEMORY, free // GPU_SHARE))


def memory_budget(device: torch.device, config: TraceConfig, target: Target) -> int:
    """Bytes one pass of restored rows may use: ``config.memory_mb``, else the target's, else measured now."""
    if config.memory_mb is not None:
        return int(config.memory_mb) * 2**20
    if target.memory is not None:
        return target.memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(CPU_MEMORY, free // GPU_SHARE)
    return CPU_MEMORY


class Planner:
    """The passes of one trace: cells, their buckets of tokens, their passes and where their rows enter.

    ``n_tokens``: positions a row may compute (the prompt, and for the
    answer metrics all but the last answer token); ``read``: the last
    positions the metric reads; ``memory``: bytes one pass may use (see
    :func:`memory_budget`).
    """

    def __init__(self, lm: LoadedModel, *, n_tokens: int, read: int, copies: int, config: TraceConfig,
                 target: Target, memory: int):
        self.lm = lm
        self.n_layers = lm.n_layers
        self.n_tokens, self.read, self.copies = n_tokens, read, copies
        self.window = config.window
        self.target = target
        self.memory = memory

    @property
    def auto_batching(self) -> str:
        """What ``batching="auto"`` means on the target: ``kind`` on a CPU, else ``all``."""
        return "kind" if self.target.device_type == "cpu" else "all"

    def cells(self, kind: str, token: int) -> list[Cell]:
        """The cells of one heatmap row, one per layer."""
        n_layers = self.n_layers
        if kind == "hidden":
            return [Cell(kind, token, layer, layer + 1, range(0)) for layer in range(n_layers)]
        out = []
        for layer in range(n_layers):
            restored = window_layers(layer, self.window, n_layers)
            out.append(Cell(kind, token, layer, restored.start, restored))
        return out

    def bytes_per_row(self, positions: int) -> int:
        """Estimated bytes one restored row of ``positions`` positions holds at a block's peak.

        The residual stream and the block's activations (about ten model
        widths and three MLP widths per position) and the attention scores
        over the prompt.
        """
        cfg = self.lm.config
        d_model = self.lm.embed.weight.shape[1]
        d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 16)
        return positions * (10 * d_model + 3 * d_ff + 2 * heads * self.n_tokens) * self.lm.dtype.itemsize

    def cells_per_pass(self, positions: int) -> int:
        """How many cells (each ``copies`` rows of ``positions`` positions) fit the memory of one pass."""
        cells = max(1, int(self.memory // (self.bytes_per_row(positions) * self.copies)))
        return min(cells, max(1, MAX_ROWS // self.copies))

    def flops_per_position(self) -> float:
        """Arithmetic of one block at one position: the weights' products plus attention over the prompt."""
        params = sum(p.numel() for p in self.lm.block(0).parameters())
        d_model = self.lm.embed.weight.shape[1]
        return 2.0 * params + 4.0 * d_model * self.n_tokens

    def buckets(self, kinds: Sequence[str], tokens: Sequence[int]) -> list[tuple[int, ...]]:
        """Split ``tokens`` into runs that share forward passes, minimising estimated seconds.

        A bucket's rows compute every position from its first token on, so
        merging costs arithmetic (padding) and saves passes (launches); a
        bucket that starts after position 0 also pays for the two runs that
        record its block calls (the prefix, then the rest; the clean run
        records position 0's). The choice is a dynamic programme over
        contiguous runs of sorted tokens.
        """
        tokens = sorted(tokens)
        if not tokens:
            return []
        speed = self.target
        layers_run = sum(self.n_layers - c.start for kind in kinds for c in self.cells(kind, tokens[0]))
        work = self.copies * layers_run * self.flops_per_position() / speed.flops  # seconds per token and position
        per_pass = self.n_layers * speed.per_call
        cells_per_token = len(kinds) * self.n_layers

        def cost(a: int, b: int) -> float:
            positions, count = self.n_tokens - tokens[a], b - a + 1
            passes = math.ceil(count * cells_per_token / self.cells_per_pass(positions))
            capture = 2 * per_pass if tokens[a] > 0 else 0.0  # a first position > 0: two runs record the calls
            return work * positions * count + passes * per_pass + capture

        best, cut = [0.0] + [math.inf] * len(tokens), [0] * (len(tokens) + 1)
        for b in range(len(tokens)):
            for a in range(max(0, b - BUCKET_SPAN + 1), b + 1):
                value = best[a] + cost(a, b)
                if value < best[b + 1]:
                    best[b + 1], cut[b + 1] = value, a
        out, b = [], len(tokens)
        while b > 0:
            out.append(tuple(tokens[cut[b] : b]))
            b = cut[b]
        return out[::-1]

    def plan(self, kinds: Sequence[str], tokens: Sequence[int], batching: str) -> list[tuple[int, list[Cell]]]:
        """Forward passes as (first position, cells sorted by start), in the order they run.

        ``batching``: ``token`` (one pass per kind and token, nothing padded),
        ``kind`` (kinds one after another, tokens bucketed), ``all`` (kinds
        together, tokens bucketed); ``auto``: see :attr:`auto_batching`.
        """
        if batching == "auto":
            batching = self.auto_batching
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

    def entries(self, cells: Sequence[Cell]) -> list[Entry | None]:
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
        out: list[Entry | None] = []
        for c in cells:
            if c.kind == "hidden":
                out.append(None if c.start == self.n_layers and c.token < last_token else Entry(c.start, patch=True))
            elif c.kind == "mlp":
                out.append(Entry(c.start + 1, patch=True))
            else:
                out.append(Entry(c.start))
        same_start: dict[tuple, list[int]] = {}
        for i, c in enumerate(cells):
            if c.kind != "hidden":
                same_start.setdefault((c.kind, c.token, c.start), []).append(i)
        for members in same_start.values():
            members.sort(key=lambda i: cells[i].window.stop)
            for depth, (shorter, longer) in enumerate(zip(members, members[1:]), start=1):
                out[longer] = Entry(cells[shorter].window.stop, parent=shorter, depth=depth)
        return out

"""The cost formulas of docs/scaling.md against what the code does: FLOPs and block calls, predicted and counted.

    .venv/bin/python benchmarks/scaling_check.py                 # every check below: 1.5 CPU minutes on one thread
    .venv/bin/python benchmarks/scaling_check.py --only trace    # traces only (or: rome, shape, plan)
    .venv/bin/python benchmarks/scaling_check.py --json out.json

No timing: the machine this runs on may be shared, so only counts are compared.

* **trace**: one causal trace (the Eiffel Tower prompt, three kinds, window 10) of models built from a shape with
  random weights (two tiny ones, then the default model's shape and GPT-2 small with 2 samples), planned as this
  CPU plans it with one pass per kind and token (``batching="token"``) and as an 80 GiB GPU would
  (``Target.gpu``). *Counted*: FLOPs of every matrix product and attention call under
  ``torch.utils.flop_counter.FlopCounterMode`` (CPU attention registered with torch's own SDPA formula) and
  block calls by a forward hook. *Plan*: the same figures summed over the engine's own plan
  (``Planner.plan`` and ``Planner.entries``: which rows enter each pass at which block). *Closed form*: the
  leading-order formula of docs/scaling.md, which assumes one pass per kind and token.
  Stored bytes: what the engine keeps from its clean and corrupted runs, summed over its tensors, against
  ``n T L (3d + 2 d_kv) + 3 L T d`` elements.
* **rome**: one ROME edit (statistics and context templates computed beforehand, 3 optimisation steps, no
  retry), counted the same way, against forward rows x blocks plus a backward that costs one more forward
  from the block above the edited one (no weight gets a gradient).
* **shape**: one forward pass of Llama-3-70B's shape on the meta device (no memory, no arithmetic) under the
  FLOP counter, against 2 x (block parameters) per token plus attention: the per-token formula with
  grouped-query attention.
* **plan**: the 70B shape's plan for the Eiffel Tower prompt and, over the paper's 1,209 known facts, the
  predicted FLOPs of the averages job (trace + severed paths per fact) with the default tokenizer.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import sys
import tempfile
from types import SimpleNamespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
TINY = {
    "tiny-llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 6,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
                   "max_position_embeddings": 512, "tie_word_embeddings": False},
    "tiny-gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 6, "n_head": 4, "vocab_size": 49152,
                  "n_positions": 512},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
}


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# The CPU's attention kernels, counted with torch's own formulas for the GPU's (the counter skips them otherwise).
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


# ---------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the formulas need: layers, widths, heads, vocabulary and a block's matrix parameters."""

    layers: int
    d: int  # model width
    m: int  # MLP width
    vocab: int
    d_kv: int  # width of one layer's keys (kv heads x head dim)
    attn_params: int  # matrix parameters of one block's attention
    mlp_params: int  # and of its MLP

    @classmethod
    def of(cls, lm) -> "Shape":
        block, cfg = lm.block(0), lm.config
        d = lm.embed.weight.shape[1]
        attn = sum(p.numel() for p in lm.module("attn", 0).parameters() if p.ndim == 2)
        mlp = sum(p.numel() for p in lm.module("mlp", 0).parameters() if p.ndim == 2)
        assert attn + mlp == sum(p.numel() for p in block.parameters() if p.ndim == 2)
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        m = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
        return cls(lm.n_layers, d, m, lm.unembed.weight.shape[0], kv * (d // heads), attn, mlp)

    def block(self, positions: int, keys: int, mlp_positions: int | None = None) -> float:
        """FLOPs of one block for one row: its matrix products and attention over ``keys`` positions."""
        mlp_positions = positions if mlp_positions is None else mlp_positions
        return 2.0 * (self.attn_params * positions + self.mlp_params * mlp_positions) + 4.0 * self.d * positions * keys

    def unembed(self, rows: int) -> float:
        return 2.0 * self.d * self.vocab * rows


def build(name: str, device: str = "cpu"):
    """A model of a shape with random weights (fp32), or on the meta device (bf16, no memory, no weights).

    ``name``: a shipped shape (``tracing.shapes.shape_names()``) or one of :data:`TINY`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from tracing.models import LoadedModel, arch_spec
    from tracing.shapes import random_model, shape_path, shipped_tokenizer

    data = TINY.get(name) or json.loads(shape_path(name).read_text(encoding="utf-8"))
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data), dtype=torch.bfloat16)
        return LoadedModel(model=model.eval(), tokenizer=shipped_tokenizer(), spec=arch_spec(data["model_type"]),
                           name=f"{name} (meta)")
    if name not in TINY:
        return random_model(name, device=device, dtype="fp32")
    folder = Path(os.environ.get("LOCATE_EDIT_CACHE") or tempfile.gettempdir()) / "shapes"  # main's temporary cache
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))
    return random_model(folder / f"{name}.json", device=device, dtype="fp32")


def count(fn) -> tuple[float, int, object]:
    """(FLOPs, block calls, fn's result) of ``fn()``: FLOP counter and a forward hook on every block.

    Every pass of a trace runs in this thread, where the counter sees it (``$LOCATE_EDIT_TRACE_WORKERS=1``
    while ``fn`` runs).
    """
    calls = [0]

    def on_block(module, inputs, output):
        if type(module).__name__.endswith(("DecoderLayer", "Block")):
            calls[0] += 1

    workers = os.environ.get("LOCATE_EDIT_TRACE_WORKERS")
    os.environ["LOCATE_EDIT_TRACE_WORKERS"] = "1"
    handle = torch.nn.modules.module.register_module_forward_hook(on_block)
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
            out = fn()
    finally:
        handle.remove()
        if workers is None:
            os.environ.pop("LOCATE_EDIT_TRACE_WORKERS", None)
        else:
            os.environ["LOCATE_EDIT_TRACE_WORKERS"] = workers
    return float(counter.get_total_flops()), calls[0], out


# ---------------------------------------------------------------------------
# A trace


def plan_cost(shape: Shape, planner, passes, n_tokens: int, read: int, copies: int) -> tuple[float, int]:
    """(FLOPs, block calls) of a trace's base runs and passes, from the engine's plan (excluding none)."""
    L, T = shape.layers, n_tokens
    flops = (1 + copies) * (L * shape.block(T, T) + shape.unembed(read))  # clean and corrupted runs
    calls = 2 * L
    for t0 in {t0 for t0, _ in passes if t0 > 0}:  # the runs that record the blocks' calls after a prefix
        flops += L * (shape.block(t0, t0) + shape.block(T - t0, T))
        calls += 2 * L
    for t0, cells in passes:
        joins = sorted(e.join for e in planner.entries(cells) if e is not None)
        if not joins:
            continue
        positions = T - t0
        for j in range(joins[0], L):
            rows = copies * bisect.bisect_right(joins, j)
            last = read if j == L - 1 and positions > read else None  # the last MLP runs at the read positions only
            flops += rows * shape.block(positions, T, last)
        calls += L - joins[0]
        flops += shape.unembed(copies * len(joins) * read)
    return flops, calls


def window_blocks(layers: int, window: int) -> tuple[int, int, int]:
    """Blocks run per restored row, summed over one token's cells: (hidden, mlp, attn).

    hidden: a layer-l row runs blocks l+1..L-1. attn: a row runs from its window's first block; windows clipped at
    layer 0 share rows until the shorter one ends, so the layer-l row (0 < l <= w//2) runs from where layer l-1's
    window ends. mlp: as attn, one block later (the first block changes only the MLP output it adds).
    """
    L, a, b = layers, window // 2, window - window // 2
    clipped = sum(max(0, L - min(L, l - 1 + b)) for l in range(1, min(a, L - 1) + 1))
    attn = L + clipped + sum(L - l + a for l in range(a + 1, L))
    return L * (L - 1) // 2, attn - 1 - max(0, L - 1 - a), attn


def closed_form(shape: Shape, n_tokens: int, first: int, copies: int, window: int, read: int = 1) -> float:
    """docs/scaling.md's formula for a trace with one pass per kind and token (three kinds), from the shape alone.

    Exact when the model has more layers than the window is wide; with fewer (the tiny shapes) it counts rows at
    the last block that the copied windows never reach, a 2 % error there.
    """
    L, T, n = shape.layers, n_tokens, copies
    blocks = sum(window_blocks(L, window))
    flops = (n + 1) * (L * shape.block(T, T) + shape.unembed(read))  # clean and corrupted runs
    for t in range(first, T):
        positions = T - t
        if t > 0:  # the runs that record the blocks' calls after a prefix of t tokens
            flops += L * (shape.block(t, t) + shape.block(positions, T))
        flops += n * blocks * shape.block(positions, T)
        flops -= n * (3 * L - 1) * 2.0 * shape.mlp_params * max(0, positions - read)  # last MLP: read positions
        flops += shape.unembed(n * (3 * L - (t < T - read)) * read)
    return flops


def leading_order(shape: Shape, n_tokens: int, first: int, copies: int, window: int) -> float:
    """The leading-order trace FLOPs of docs/scaling.md: 2 P_b [(n + 1) L T + n (3L²/2 + wL) S] + 2dV 3nL(T - s)."""
    L, T, n = shape.layers, n_tokens, copies
    padded = sum(T - t for t in range(first, T))  # S: positions the restored rows compute, summed over tokens
    per_position = 2.0 * (shape.attn_params + shape.mlp_params)
    blocks = (n + 1) * L * T + n * (1.5 * L * L + window * L) * padded
    return per_position * blocks + shape.unembed(3 * n * L * (T - first))


def stored_bytes(tracer) -> tuple[int, int]:
    """(bytes the engine keeps from its base runs, the formula's n T L (3d + 2 d_kv) + 3 L T d elements)."""
    tensors = [t for kind in tracer.clean.values() for t in kind] + tracer.corrupt_in + tracer.corrupt_mlp
    tensors += tracer.corrupt_attn + [t for kv in tracer.kv for t in kv]
    held = sum(t.numel() * t.element_size() for t in tensors)
    shape = Shape.of(tracer.lm)
    L, T, n = shape.layers, tracer.n_tokens, tracer.copies
    formula = (n * T * L * (3 * shape.d + 2 * shape.d_kv) + n * T * shape.d + 3 * L * T * shape.d)
    return held, formula * tracer.lm.dtype.itemsize


def check_trace(name: str, samples: int, gpu: bool) -> dict:
    """One trace of ``name``: counted against the plan and, for per-token passes, against the closed form."""
    from tracing import TraceConfig, trace
    from tracing.fast import FastTracer
    from tracing.passes import Planner, Target
    from tracing.prepare import PromptPlan

    lm = build(name)
    config = TraceConfig(samples=samples, batching="all" if gpu else "token")
    target = Target.gpu(lm, 80.0) if gpu else None
    flops, calls, results = count(lambda: trace(lm, PROMPT, SUBJECT, config=config, target=target))
    with torch.inference_mode():
        tracer = FastTracer(PromptPlan.make(lm, PROMPT, SUBJECT, None, config, 0), target=target)
    setup, shape = tracer.setup, Shape.of(lm)
    first = setup.enc.subject_start if config.skip else 0
    planner = Planner(lm, n_tokens=tracer.n_tokens, read=tracer.read, copies=tracer.copies, config=config,
                      target=tracer.planner.target, memory=tracer.budget)
    passes = planner.plan(("hidden", "mlp", "attn"), range(first, len(setup.enc)), config.batching)
    planned, planned_calls = plan_cost(shape, planner, passes, tracer.n_tokens, tracer.read, tracer.copies)
    held, formula = stored_bytes(tracer)
    return {"check": "trace", "shape": name, "plan": "80 GiB GPU" if gpu else "CPU, per token", "samples": samples,
            "tokens": tracer.n_tokens, "passes": results[-1].settings["passes"], "flops": flops,
            "flops_plan": planned,
            "flops_closed": None if gpu else closed_form(shape, tracer.n_tokens, first, samples, config.window),
            "flops_leading": None if gpu else leading_order(shape, tracer.n_tokens, first, samples, config.window),
            "block_calls": calls, "block_calls_plan": planned_calls, "stored_bytes": held, "stored_formula": formula}


# ---------------------------------------------------------------------------
# A ROME edit


def rome_prediction(shape: Shape, rows, layer: int, steps: int) -> float:
    """FLOPs of an edit with cached statistics: the rows' full forward, block ``layer``, ``steps`` optimisation
    steps (forward from ``layer``, backward from ``layer + 1``, no weight gradients) and the rewrite check."""
    L = shape.layers
    lengths = [len(r) for r in rows.ids]
    width = max(n - k for n, k in zip(lengths, rows.lookups))  # S: positions from the last subject token on
    keys = max(rows.lookups) + width  # the cached prefix (left-padded to the longest) and the suffix
    n_rows, picked = len(lengths), rows.n_rewrite * len(rows.targets) + 1
    full = n_rows * (L * shape.block(max(lengths), max(lengths)) + shape.unembed(1))  # the runner's first pass
    lookup = n_rows * shape.block(width, keys)  # the lookup's keys and values: block `layer` once
    forward = n_rows * (L - layer) * shape.block(width, keys) + shape.unembed(picked)
    backward = n_rows * (L - layer - 1) * (2.0 * (shape.attn_params + shape.mlp_params) * width
                                           + 10.0 * shape.d * width * keys) + shape.unembed(picked)
    return full + lookup + steps * forward + (steps - 1) * backward


def rewrite_check(lm, shape: Shape, pairs) -> float:
    """FLOPs of the check that an edit took: prompt + object rows right-padded, one pass, the object's logits."""
    from tracing.tokens import continuation_ids

    lengths = [(len(lm.tokenizer(p)["input_ids"]), len(continuation_ids(lm.tokenizer, p, c))) for p, c in pairs]
    width = max(a + b for a, b in lengths)
    return len(pairs) * (shape.layers * shape.block(width, width) + shape.unembed(1)) + shape.unembed(
        sum(b for _, b in lengths))


def check_rome(name: str, steps: int = 3, stats_tokens: int | None = 2048) -> dict:
    """One ROME edit of ``name`` counted, against :func:`rome_prediction` and :func:`rewrite_check`.

    ``stats_tokens``: the key statistics' corpus, sampled before counting; None: no statistics (the plain k*
    direction), the same passes.
    """
    from editing import EditRequest
    from editing.hparams import load_hparams
    from editing.methods.common import build_rows
    from editing.methods.rome import compute_edit
    from editing.stats import StatsSpec, key_stats
    from editing.templates import context_templates

    lm = build(name)
    hp = dataclasses.replace(load_hparams(lm), v_num_grad_steps=steps, early_stop_loss=0.0,
                             mom2_adjustment=stats_tokens is not None, stats_tokens=stats_tokens or 1,
                             stats_sample_length=64)
    layer = hp.edit_layer(lm.n_layers)
    request = EditRequest(SUBJECT, "{} is located in the city of", "Rome", "Paris")
    templates = context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
    if hp.mom2_adjustment:  # computed before counting: a one-time cost per layer (None: the plain k* direction)
        key_stats(lm, layer, StatsSpec.from_hparams(hp))
    flops, calls, edit = count(lambda: compute_edit(lm, request, hparams=hp, retries=0))
    rows = build_rows(lm, request, templates, hp.kl_prompt)
    shape = Shape.of(lm)
    check = rewrite_check(lm, shape, [(request.text, request.target), (request.text, request.target_true)])
    predicted = rome_prediction(shape, rows, layer, edit.info["steps"]) + check
    return {"check": "rome", "shape": name, "layer": layer, "rows": len(rows.ids), "steps": edit.info["steps"],
            "flops": flops, "flops_plan": predicted, "block_calls": calls,
            "block_calls_plan": 2 * shape.layers + edit.info["steps"] * (shape.layers - layer)}


# ---------------------------------------------------------------------------
# 70B on paper


def check_shape(name: str = "llama-3-70b", tokens: int = 10) -> dict:
    """One forward pass of a Llama shape on the meta device, counted, against L (2 P_block T + 4 d T^2) + 2 d V T."""
    lm = build(name, device="meta")
    shape = Shape.of(lm)
    ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")
    positions = torch.arange(tokens, device="meta")[None]
    base = lm.model.base_model

    def forward():  # the model's own loop, without the mask preparation that reads values (none on meta)
        hidden = lm.embed(ids)  # (1, tokens, d)
        rotary = base.rotary_emb(hidden, positions)
        for block in lm.blocks:
            hidden = block(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        return lm.unembed(lm.final_norm(hidden))  # (1, tokens, vocab)

    flops, calls, _ = count(forward)
    predicted = shape.layers * shape.block(tokens, tokens) + shape.unembed(tokens)
    params = sum(p.numel() for p in lm.model.parameters())
    return {"check": "shape", "shape": name, "tokens": tokens, "flops": flops, "flops_plan": predicted,
            "block_calls": calls, "block_calls_plan": shape.layers, "parameters": params,
            "block_parameters": shape.attn_params + shape.mlp_params}


def sever_flops(shape: Shape, n_tokens: int, token: int, copies: int) -> float:
    """Severed paths at ``token``: their own base runs, the recording runs and one pass growing by layer."""
    L, T, n = shape.layers, n_tokens, copies
    flops = (1 + n) * (L * shape.block(T, T) + shape.unembed(1))
    if token > 0:
        flops += L * (shape.block(token, token) + shape.block(T - token, T))
    rows = sum(3 * n * j for j in range(1, L))  # rows of layers 0..j-1 (3 variants) run block j
    return flops + rows * shape.block(T - token, T) + shape.unembed(3 * n * L)


def fact_cost(lm, shape: Shape, target, prompt: str, subject: str, batching: str = "all",
              copies: int = 10) -> tuple[float, float, int]:
    """(trace FLOPs planned as ``target`` plans, severed-path FLOPs, passes) of one fact, from its tokens."""
    from tracing import TraceConfig
    from tracing.passes import Planner
    from tracing.tokens import encode_prompt

    enc = encode_prompt(lm.tokenizer, prompt, subject)
    planner = Planner(lm, n_tokens=len(enc), read=1, copies=copies, config=TraceConfig(), target=target,
                      memory=target.memory)
    passes = planner.plan(("hidden", "mlp", "attn"), range(enc.subject_start, len(enc)), batching)
    flops, _ = plan_cost(shape, planner, passes, len(enc), 1, copies)
    return flops, sever_flops(shape, len(enc), enc.last_subject_token, copies), len(passes)


# The Eiffel Tower -> Rome edit's rows with the default model's 20 context templates: 21 rewrite rows of up to 21
# tokens whose last subject token is at most at 14 (7 positions from it on), the KL row "The Eiffel Tower is a".
EIFFEL_ROWS = SimpleNamespace(ids=((0,) * 21,) * 21 + ((0,) * 6,), lookups=(14,) * 21 + (4,), n_rewrite=21,
                              targets=(0,))


def check_plan(name: str, gpu_gib: float | None = None, pass_gib: float | None = None,
               limit: int | None = 0) -> dict:
    """A shape's plan for the Eiffel Tower prompt (bf16, paper settings), and the averages job over known facts.

    The GPU plan is an H200's (``gpu_gib`` GiB, a quarter of what the weights leave free per pass) or, with
    ``pass_gib``, any GPU's that gives one pass that much memory; the CPU's plan is one pass per kind and token.
    ``limit``: known facts to sum (None: all, 0: none).
    """
    from tracing.assets import known_facts
    from tracing.passes import Target

    lm = build(name, device="meta")
    shape = Shape.of(lm)
    if pass_gib is None:
        target = Target.gpu(lm, gpu_gib, dtype=torch.bfloat16)
    else:
        target = dataclasses.replace(Target.of("cuda", torch.bfloat16), memory=int(pass_gib * 2**30))
    gpu, sever, passes = fact_cost(lm, shape, target, PROMPT, SUBJECT)
    cpu, _, cpu_passes = fact_cost(lm, shape, target, PROMPT, SUBJECT, batching="token")
    row = {"check": "plan", "shape": name, "parameters": sum(p.numel() for p in lm.model.parameters()),
           "pass_gib": target.memory / 2**30, "gpu_flops": gpu, "gpu_passes": passes, "cpu_flops": cpu,
           "cpu_passes": cpu_passes, "sever_flops": sever, "rome_layer": int(0.334 * shape.layers),
           "rome_flops": rome_prediction(shape, EIFFEL_ROWS, int(0.334 * shape.layers), 20)
           + 2 * (shape.layers * shape.block(11, 11) + shape.unembed(2))}
    if limit != 0:
        facts = [f for f in known_facts() if f["prompt"].count(f["subject"]) == 1][:limit]
        costs = [fact_cost(lm, shape, target, f["prompt"], f["subject"]) for f in facts]
        row.update(facts=len(facts), facts_trace_flops=sum(c[0] for c in costs),
                   facts_sever_flops=sum(c[1] for c in costs),
                   mean_tokens=sum(len(lm.tokenizer(f["prompt"])["input_ids"]) for f in facts) / max(1, len(facts)))
    return row


# ---------------------------------------------------------------------------


def show(row: dict) -> None:
    """One check as a line: counted against predicted, and their ratio."""
    def ratio(a, b):
        return f"{a / b:.4f}" if a and b else "-"

    if row["check"] == "plan":
        line = (f"plan  {row['shape']:<14}{row['parameters'] / 1e9:.2f} B parameters, Eiffel Tower trace (bf16): GPU "
                f"plan {row['gpu_flops']:.3e} FLOPs in {row['gpu_passes']} passes ({row['pass_gib']:.1f} GiB per pass),"
                f" one pass per kind and token {row['cpu_flops']:.3e} in {row['cpu_passes']}; severed paths "
                f"{row['sever_flops']:.3e}; a ROME edit at layer {row['rome_layer']} (20 steps) "
                f"{row['rome_flops']:.3e}")
        if "facts" in row:
            line += (f"; {row['facts']} known facts (mean {row['mean_tokens']:.1f} tokens): traces "
                     f"{row['facts_trace_flops']:.3e}, severed paths {row['facts_sever_flops']:.3e} FLOPs")
        print(line, flush=True)
        return
    what = {"trace": lambda r: f"{r['plan']}, {r['samples']} samples, {r['passes']} passes",
            "rome": lambda r: f"layer {r['layer']}, {r['rows']} rows, {r['steps']} steps",
            "shape": lambda r: f"{r['tokens']} tokens, {r['parameters'] / 1e9:.2f} B parameters"}[row["check"]](row)
    line = (f"{row['check']:<6}{row['shape']:<14}{what:<40} FLOPs counted {row['flops']:.4e}, plan "
            f"{row['flops_plan']:.4e} (x{ratio(row['flops'], row['flops_plan'])})")
    if row.get("flops_closed"):
        line += f", closed form {row['flops_closed']:.4e} (x{ratio(row['flops'], row['flops_closed'])})"
    if row.get("flops_leading"):
        line += f", leading order x{ratio(row['flops'], row['flops_leading'])}"
    line += f"; block calls {row['block_calls']} / {row['block_calls_plan']}"
    if "stored_bytes" in row:
        line += f"; stored {row['stored_bytes']:,} B / formula {row['stored_formula']:,} B"
    print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["trace", "rome", "shape", "plan"], default=None)
    p.add_argument("--samples", type=int, default=2, help="corrupted copies in the traces of real shapes")
    p.add_argument("--limit", type=int, default=None, help="known facts in the plan check (default: all)")
    p.add_argument("--pass-memory", type=float, default=3.0,
                   help="GiB per pass in the 70B plan (a quarter of what its weights leave free on two 80 GB GPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", metavar="OUT", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ("trace", "rome", "shape", "plan"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-cache-") as cache:
        os.environ["LOCATE_EDIT_CACHE"] = cache  # random models' noise scales, templates and statistics go here
        jobs = []
        if "trace" in only:
            jobs += [lambda n=n, g=g: check_trace(n, 3, g) for n in ("tiny-llama", "tiny-gpt2") for g in (False, True)]
            jobs += [lambda n=n: check_trace(n, args.samples, False) for n in ("smollm2-135m", "gpt2")]
        if "rome" in only:
            jobs += [lambda n=n: check_rome(n) for n in ("tiny-llama", "tiny-gpt2", "smollm2-135m")]
        if "shape" in only:
            jobs.append(check_shape)
        if "plan" in only:
            jobs += [lambda n=n: check_plan(n, gpu_gib=139.0) for n in ("smollm2-135m", "gpt2-xl", "gpt-j-6b",
                                                                         "llama-3-8b")]
            jobs.append(lambda: check_plan("llama-3-70b", pass_gib=args.pass_memory, limit=args.limit))
        for job in jobs:
            rows.append(job())
            show(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

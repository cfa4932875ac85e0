"""ROME (Meng et al., 2022, §3): a closed-form rank-one edit of one MLP down-projection.

The MLP's output projection W at layer l* is read as a key-value memory: the
input at the subject's last token is a key k, the output Wk (+ bias) a value
that the layers above turn into the fact. To write a new fact:

1. **Key** k*: the down-projection's input at the last subject token,
   averaged over the bare prompt and the prompt after short sampled texts
   (the context templates).
2. **Value** v*: a vector δ is added to the layer's output at the last subject
   token of every templated prompt and optimised (Adam) so that the model
   predicts the new object after each, plus a KL term that keeps the
   distribution after "{subject} is a" close to the unedited one, a decay on
   ‖δ‖, and a clamp of ‖δ‖ to a multiple of the original value's norm;
   v* = W k* + b + δ.
3. **Update** ``W ← W + Λ (C⁻¹k*)ᵀ`` with ``Λ = (v* − W k* − b) / ((C⁻¹k*)ᵀ k*)``
   and C = E[k kᵀ] (:mod:`editing.stats`). The ``"r-rome"`` variant (the
   class default) uses the same averaged k* in the residual and the
   denominator (Gupta et al., 2024, "Rebuilding ROME"); ``"original"``
   reproduces the paper code, whose residual and denominator use the bare
   prompt's key although the direction uses the averaged one — updates that
   can blow up over sequential edits (on the default model, after 100 edits
   in a row, unrelated facts kept 0.51 of their probability, 0.65 with
   r-ROME), yet single edits generalise a little better with it, so its
   tuned settings use it.
   ``"exact"`` makes step 2 honest about step 3: a rank-one update adds
   ``δ (uᵀkᵢ)/(uᵀk₀)`` (u = C⁻¹k*/‖C⁻¹k*‖, k₀ the bare prompt's key) at a
   prompt whose key is kᵢ, not the same δ everywhere, so during the
   optimisation each prompt gets exactly that. δ is the change at the bare
   prompt (the one the user wrote; the clamp and decay refer to it), and what
   is optimised is what the edited model does on every templated prompt.

Speed: the templated prompts share everything before the subject's last token,
which δ cannot change, so their keys and values are computed once; the
optimisation then runs only layers l*..L-1 and only the positions from the last
subject token on, reading the earlier positions from a cache, and unembeds only
the positions the loss reads. No weight gets a gradient. The model's weights
are never modified by :func:`compute_edit`.

Example::

    req = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome")
    edit = compute_edit(lm, req)                 # ~seconds on a CPU once statistics are cached
    edit.layer, edit.norm, edit.timings
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tracing.blocks import BlockCall, PrefixCache, record_calls
from tracing.hooks import Hook, StopForward, hooks, main_tensor, replace_main, until_stopped
from tracing.models import LoadedModel, returned_cache, with_cache
from tracing.tokens import check_context, continuation_ids, encode_prompt

from .edit import Edit, EditRequest, applied
from .hparams import ROMEHyperParams, load_hparams
from .sampling import decode
from .scores import continuation_logprobs
from .templates import context_templates

if TYPE_CHECKING:
    from .stats import StatsSpec

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


# ---------------------------------------------------------------------------
# The rows the optimisation runs


@dataclass(frozen=True)
class _Rows:
    """Token rows of one edit: the templated rewrite prompts (+ target[:-1]) and the KL prompt last.

    ``lookups[r]``: index of the last subject token of row r; ``targets``: the
    new object's token ids; ``target_at[r]``: positions whose logits predict
    the target tokens (rewrite rows); ``kl_at``: the KL row's last position.
    """

    ids: tuple[tuple[int, ...], ...]
    lookups: tuple[int, ...]
    targets: tuple[int, ...]
    target_at: tuple[tuple[int, ...], ...]
    kl_at: int
    templates: tuple[str, ...]

    @property
    def n_rewrite(self) -> int:
        return len(self.target_at)


def _fill(template: str, subject: str) -> tuple[str, int]:
    """The template with the subject in its ``{}``, and the subject's character offset."""
    before, _, after = template.partition("{}")
    return before + subject + after, len(before)


def _locate(lm: LoadedModel, text: str, subject: str, char_start: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the last token of the subject that starts at ``char_start``."""
    occurrence = sum(1 for i in range(char_start) if text.startswith(subject, i))
    enc = encode_prompt(lm.tokenizer, text, subject, occurrence=occurrence, max_length=lm.max_length)
    return list(enc.ids), enc.last_subject_token


def build_rows(lm: LoadedModel, request: EditRequest, templates: Sequence[str], kl_prompt: str) -> _Rows:
    """Tokenise the templated rewrite prompts and the KL prompt (see :class:`_Rows`)."""
    subject = request.subject.strip()
    prompt_text = request.text
    targets = continuation_ids(lm.tokenizer, prompt_text, request.target)
    ids, lookups, target_at = [], [], []
    for template in templates:
        full_template = template.replace("{}", request.prompt, 1)  # context + relation, {} = subject
        text, start = _fill(full_template, subject)
        row, lookup = _locate(lm, text, subject, start)
        first = len(row) - 1  # the prompt's last position predicts the first target token
        ids.append(tuple(row + targets[:-1]))
        lookups.append(lookup)
        target_at.append(tuple(first + t for t in range(len(targets))))
    kl_text, kl_start = _fill(kl_prompt, subject)
    kl_row, kl_lookup = _locate(lm, kl_text, subject, kl_start)
    ids.append(tuple(kl_row))
    lookups.append(kl_lookup)
    check_context(lm.max_length, max(len(r) for r in ids), "The prompt with its context and target",
                  "Shorten the prompt or the target.")
    return _Rows(ids=tuple(ids), lookups=tuple(lookups), targets=tuple(targets), target_at=tuple(target_at),
                 kl_at=len(kl_row) - 1, templates=tuple(templates))


# ---------------------------------------------------------------------------
# Running only the layers and positions δ can change


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (rows, kv_heads, tokens, head_dim) of one layer of a transformers cache."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]


def _stop(module, args, kwargs):
    raise StopForward


def _uniform_layers(lm: LoadedModel) -> bool:
    """Whether every block receives the same call arguments (no per-layer attention types)."""
    types = getattr(lm.config, "layer_types", None)
    return not types or len(set(types)) <= 1


class SuffixRunner:
    """Blocks ``layer``..L-1 over each row's positions from its lookup token on, earlier positions cached.

    Built under ``no_grad``: one pass over the full (right-padded) rows gives
    every layer's keys and values, of which each row keeps those before its
    lookup token (left-padded to a common length and masked), and block
    ``layer``'s input at the suffix positions. A second call of the model on
    the suffixes with that cache records what the blocks receive (positions,
    masks); it stops at the first block when every block gets the same
    arguments. :meth:`run` then calls the blocks directly; hooks on them see
    tensors of shape (rows, S, ·), where suffix index 0 is each row's lookup
    token.
    """

    def __init__(self, lm: LoadedModel, rows: Sequence[Sequence[int]], lookups: Sequence[int], layer: int):
        self.lm, self.layer = lm, layer
        device = lm.device
        n = len(rows)
        lengths = [len(r) for r in rows]
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, max(lengths)), pad, dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, device=device)
        block_in: list[torch.Tensor] = []

        def grab_input(module, args, kwargs):
            block_in.append(args[0] if args else kwargs["hidden_states"])

        with torch.no_grad(), hooks(lm.model, Hook(lm.module_name("hidden", layer), grab_input, pre=True)):
            cache = returned_cache(lm.model(ids, use_cache=True, logits_to_keep=1))  # right padding: causal = exact

        prefix_len = max(lookups)
        self.width = width = max(n_tok - lk for n_tok, lk in zip(lengths, lookups))  # S
        prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        full_prefix = []
        for j in range(lm.n_layers):
            k, v = _layer_kv(cache, j)  # (n, kv_heads, T, head_dim)
            pk = k.new_zeros(n, k.shape[1], prefix_len, k.shape[3])
            pv = v.new_zeros(n, v.shape[1], prefix_len, v.shape[3])
            for r, lk in enumerate(lookups):
                if lk:
                    pk[r, :, prefix_len - lk :] = k[r, :, :lk]
                    pv[r, :, prefix_len - lk :] = v[r, :, :lk]
            full_prefix.append((pk, pv))
            if j >= layer:
                prefix[j] = (pk, pv)
        del cache
        self.prefix = prefix
        # Block `layer`'s input at each row's suffix positions (clamped into the padded row beyond its end).
        gather = torch.tensor(lookups, device=device)[:, None] + torch.arange(width, device=device)
        gather = gather.clamp(max=ids.shape[1] - 1)
        self.hidden_in = block_in[0].gather(1, gather[:, :, None].expand(-1, -1, block_in[0].shape[-1])).detach()

        suffix = torch.full((n, width), pad, dtype=torch.long, device=device)
        for r, (row, lk) in enumerate(zip(rows, lookups)):
            suffix[r, : len(row) - lk] = torch.tensor(row[lk:], device=device)
        mask = torch.ones((n, prefix_len + width), dtype=torch.long, device=device)
        for r, lk in enumerate(lookups):
            mask[r, : prefix_len - lk] = 0
        positions = torch.tensor(lookups, device=device)[:, None] + torch.arange(width, device=device)

        uniform = _uniform_layers(lm)
        first = 0 if uniform else layer
        specs, calls, _ = record_calls(lm, first)
        if uniform:  # block 0's arguments are every block's: stop right after recording them
            specs.append(Hook(lm.module_name("hidden", 0), _stop, pre=True))
        kwargs = {}
        if prefix_len > 0:
            from transformers import DynamicCache

            data = full_prefix if uniform else [(k.clone(), v.clone()) for k, v in full_prefix]  # stopped: unchanged
            kwargs = dict(attention_mask=mask, use_cache=True, **with_cache(lm.model, DynamicCache(ddp_cache_data=data)))
        with torch.no_grad(), hooks(lm.model, *specs):
            until_stopped(lm.model, suffix, position_ids=positions, logits_to_keep=1, **kwargs)
        self.calls: dict[int, BlockCall] = {j: calls[0] if uniform else calls[j] for j in range(layer, lm.n_layers)}
        self.lengths = [n_tok - lk for n_tok, lk in zip(lengths, lookups)]

    def run(self, *extra: Hook) -> torch.Tensor:
        """Final hidden states (rows, S, d_model) before the final norm, with ``extra`` hooks active."""
        cache = PrefixCache(self.prefix)
        hidden = self.hidden_in
        with hooks(self.lm.model, *extra):
            for j in range(self.layer, self.lm.n_layers):
                hidden = self.calls[j](self.lm.block(j), hidden, cache)
        return hidden

    def lookup_io(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The edited down-projection's input and output at each row's lookup token: (rows, d_in), (rows, d_out), float64.

        Runs block ``layer`` only; neither depends on the edit.
        """
        found: dict[str, torch.Tensor] = {}

        def grab(module, args, output):
            found["keys"] = args[0][:, 0].detach().double()
            found["values"] = main_tensor(output)[:, 0].detach().double()
            raise StopForward

        block = self.lm.block(self.layer)
        with torch.no_grad(), hooks(self.lm.model, Hook(self.lm.module_name("down_proj", self.layer), grab)):
            until_stopped(self.calls[self.layer], block, self.hidden_in, PrefixCache(self.prefix))
        return found["keys"], found["values"]

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits (picked, vocab) at suffix ``positions`` of ``rows`` only."""
        picked = hidden[rows, positions]  # (picked, d_model)
        return self.lm.unembed(self.lm.final_norm(picked)).float()


# ---------------------------------------------------------------------------
# v* optimisation


@dataclass
class _Optimised:
    delta: torch.Tensor  # (d_model,) float32
    steps: int
    loss: float
    nll: float
    kl: float
    prob_before: float
    prob_after: float


def _optimise(lm: LoadedModel, runner: SuffixRunner, rows: _Rows, hp: ROMEHyperParams, target_init: torch.Tensor,
              scales: torch.Tensor, progress: Progress | None) -> _Optimised:
    """Find δ by Adam (paper eq. 4 as in the original code: NLL + KL + decay, clamped).

    Row r's lookup output gets ``scales[r] * δ`` (all ones except for the
    "exact" variant); ``target_init`` (d_out,) is the bare prompt's original
    value, which sets the decay's and the clamp's scale.
    """
    device = lm.device
    n_rw = rows.n_rewrite
    # Gather indices: every (row, target position) of the rewrite rows, then the KL row's last position.
    pick_rows, pick_pos, pick_tok = [], [], []
    for r in range(n_rw):
        for t, pos in enumerate(rows.target_at[r]):
            pick_rows.append(r)
            pick_pos.append(pos - rows.lookups[r])
            pick_tok.append(rows.targets[t])
    kl_row = len(rows.ids) - 1
    pick_rows.append(kl_row)
    pick_pos.append(rows.kl_at - rows.lookups[kl_row])
    pick_rows_t = torch.tensor(pick_rows, device=device)
    pick_pos_t = torch.tensor(pick_pos, device=device)
    tok_t = torch.tensor(pick_tok, device=device)
    row_of = torch.tensor(pick_rows[:-1], device=device)
    n_target = len(rows.targets)

    d_model = runner.hidden_in.shape[-1]
    delta = torch.zeros(d_model, device=device, dtype=torch.float32, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    scales = scales.to(device=device, dtype=torch.float32)[:, None, None]  # (rows, 1, 1)
    target_init = target_init.float()

    def add_delta(module, args, output):
        out = main_tensor(output)  # (rows, S, d_model)
        first = out[:, :1] + (scales * delta).to(out.dtype)
        return replace_main(output, torch.cat([first, out[:, 1:]], dim=1))

    hook = Hook(lm.module_name("down_proj", runner.layer), add_delta)
    kl_init = None
    steps = hp.v_num_grad_steps
    prob_before = prob_after = float("nan")
    loss_value = nll_value = kl_value = float("nan")
    step = 0
    for step in range(steps):
        optimiser.zero_grad()
        hidden = runner.run(hook)
        logp = torch.log_softmax(runner.logits(hidden, pick_rows_t, pick_pos_t), dim=-1)  # (picked, vocab)
        token_logp = logp[:-1].gather(1, tok_t[:, None])[:, 0]  # (rewrite rows * target tokens,)
        per_row = torch.zeros(n_rw, device=device).index_add(0, row_of, token_logp) / n_target
        nll = -per_row.mean()
        kl_logp = logp[-1:]
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        kl = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        decay = hp.v_weight_decay * (delta.norm() / target_init.norm() ** 2)
        loss = nll + kl + decay
        prob = float(per_row.detach().exp().mean())
        if step == 0:
            prob_before = prob
        prob_after = prob
        loss_value, nll_value, kl_value = float(loss.detach()), float(nll.detach()), float(kl.detach())
        log.debug("step %d: loss %.4f = nll %.4f + kl %.4f + decay %.4f; p(target) %.3f",
                  step, loss_value, nll_value, kl_value, float(decay.detach()), prob)
        if progress:
            progress("optimising", (step + 1) / steps)
        if loss_value < hp.early_stop_loss or nll_value < hp.early_stop_nll or step == steps - 1:
            break
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * target_init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return _Optimised(delta=delta.detach().clone(), steps=step + 1,
                      loss=loss_value, nll=nll_value, kl=kl_value, prob_before=prob_before, prob_after=prob_after)


# ---------------------------------------------------------------------------
# Public API


def _first_phrase(text: str) -> str:
    """The model's answer as a short phrase: up to the first punctuation mark, at most four words."""
    phrase = re.split(r"[,.;:!?\n()\"]", text.strip(), maxsplit=1)[0]
    return " ".join(phrase.split()[:4])


def model_answer(lm: LoadedModel, prompt: str, max_new_tokens: int = 6) -> str:
    """The model's own short greedy answer to ``prompt`` (used as the old object when none is given)."""
    ids = lm.tokenizer(prompt)["input_ids"]
    check_context(lm.max_length, len(ids) + max_new_tokens, "The rewrite prompt with its answer", "Shorten the prompt.")
    new = decode(lm, [ids], max_new_tokens)[0]
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    return _first_phrase(text) or " ".join(text.split()[:1])


def check_layer(lm: LoadedModel, layer: int) -> int:
    """``layer`` as an int if the model has it, else a ValueError that gives the range."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"The edit layer must be an integer, not {layer!r}.")
    if not 0 <= int(layer) < lm.n_layers:
        raise ValueError(f"Layer {layer} is out of range: {lm.name} has layers 0 to {lm.n_layers - 1}.")
    return int(layer)


def compute_edit(
    lm: LoadedModel,
    request: EditRequest,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    progress: Progress | None = None,
    *,
    stats_spec: StatsSpec | None = None,
    retries: int = 1,
) -> Edit:
    """Compute the ROME edit that makes the model complete ``request`` with its new target.

    Example::

        edit = compute_edit(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"),
                            progress=lambda stage, fraction: print(stage, fraction))

    ``layer`` defaults to the hyperparameters' edit layer; ``progress(stage,
    fraction)`` is called with stages "templates", "statistics", "keys",
    "optimising" and "update". The model's weights are never modified (apply
    the result with :func:`applied` or :class:`EditStack`). The request comes
    back in ``edit.request`` with ``target_true`` set to the model's own
    answer if it was missing. Raises ValueError for invalid input, before any
    work. The other editors (FT, FT+L, KN) share this interface through
    :func:`editing.methods.compute`.

    Whether the edit took is checked, not assumed: after the update the
    rewrite prompt must prefer the new object to the old one (mean token
    log-probability, as CounterFact's efficacy). When it does not, the
    optimisation is run again up to ``retries`` times with twice the steps and
    1.5 times the clamp; ``edit.info`` says ``took``, the rewrite prompt's
    ``p_new``/``p_old``, whether the optimisation ``reached_target``, any
    ``retried`` settings, and a ``warning`` to show when the edit did not take.
    """
    from .stats import StatsSpec, key_stats  # here, so that `python -m editing.stats` runs cleanly

    if not isinstance(request, EditRequest):
        raise ValueError("compute_edit needs an EditRequest(subject, prompt, target).")
    request.validate()
    hp = hparams if hparams is not None else load_hparams(lm)
    if not isinstance(hp, ROMEHyperParams):
        raise ValueError(f"ROME takes ROMEHyperParams, not {type(hp).__name__}; other methods: editing.methods.compute.")
    layer = hp.edit_layer(lm.n_layers) if layer is None else check_layer(lm, layer)
    spec = stats_spec if stats_spec is not None else StatsSpec.from_hparams(hp)
    # Validate tokenisation (subject, target, length) before any expensive work.
    continuation_ids(lm.tokenizer, request.text, request.target)
    build_rows(lm, request, ["{}"], hp.kl_prompt)

    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 4)  # a retry adds to its stage
        clock = now

    def report(stage: str, fraction: float) -> None:
        if progress:
            progress(stage, float(fraction))

    _ = lm.fingerprint  # the model's identity for caches, taken before anything else
    with torch.inference_mode(False):
        if request.target_true is None:
            request = EditRequest(request.subject, request.prompt, request.target, model_answer(lm, request.text) or None)
            lap("answer")
        report("templates", 0.0)
        templates = context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
        lap("templates")
        stats = None
        if hp.mom2_adjustment:
            report("statistics", 0.0)
            stats = key_stats(lm, layer, spec, progress=report)
            lap("statistics")
        report("keys", 0.0)
        rows = build_rows(lm, request, templates, hp.kl_prompt)
        runner = SuffixRunner(lm, rows.ids, rows.lookups, layer)
        keys, values = runner.lookup_io()  # (rows, d_in), (rows, d_out) float64; the KL row is last
        n_rw = rows.n_rewrite
        k_star = keys[:n_rw].mean(0)  # (d_in,): k*, averaged over the templates
        v_base = values[:n_rw].mean(0)  # W k* + b (the layer is affine)
        if hp.variant in ("original", "exact"):
            k_ref, v_base = keys[0], values[0]  # the bare prompt's key (the paper's code; exact: δ is its change)
        else:
            k_ref = k_star
        direction = stats.solve(k_star, ridge=hp.stats_ridge) if stats is not None else k_star.clone()
        u = direction / direction.norm()  # (d_in,) unit
        denominator = float(u @ k_ref)
        if not np.isfinite(denominator) or abs(denominator) < 1e-12:
            raise ValueError(
                "The key k* is (nearly) orthogonal to C⁻¹k*, so no rank-one update can write this fact at layer "
                f"{layer}; try another layer."
            )
        # What the update will add at each row's lookup token, per unit of δ (exact variant), else 1 everywhere.
        scales = (keys @ u) / denominator if hp.variant == "exact" else torch.ones(len(rows.ids), dtype=torch.float64)
        lap("keys")
        result = _optimise(lm, runner, rows, hp, values[0], scales, report)
        lap("optimise")

        def build(result: _Optimised, hp_used: ROMEHyperParams) -> Edit:
            report("update", 0.0)
            delta = result.delta.double()
            v = delta / denominator  # ΔW k_ref = v (u·k_ref) = δ
            info = {
                "steps": result.steps, "loss": result.loss, "nll": result.nll, "kl": result.kl,
                "target_prob_before": result.prob_before, "target_prob_after": result.prob_after,
                "reached_target": result.loss < hp_used.early_stop_loss or result.nll < hp_used.early_stop_nll,
                "delta_norm": float(delta.norm()), "value_norm": float(values[0].norm()),
                "key_norm": float(k_star.norm()), "denominator": denominator, "templates": len(templates),
                "stats_tokens": stats.count if stats is not None else 0,
                "bare_scale": float((keys[0] @ u) / denominator),  # the update's effect on the bare prompt, per unit δ
            }
            return Edit(
                request=request, layer=layer, module=lm.module_name("down_proj", layer),
                u=u.float().cpu().numpy(), v=v.float().cpu().numpy(),
                key=k_ref.float().cpu().numpy(), value=(v_base + delta).float().cpu().numpy(),
                variant=hp_used.variant, model=lm.name, fingerprint=lm.fingerprint, timings=timings, info=info,
                hparams=hp_used.to_dict(),
            )

        edit = build(result, hp)
        lap("update")
        check = _rewrite_preference(lm, edit)
        tried = hp
        for _ in range(max(0, retries)):
            if check[0] > check[1]:
                break
            tried = replace(tried, v_num_grad_steps=tried.v_num_grad_steps * 2,
                            clamp_norm_factor=tried.clamp_norm_factor * 1.5)
            log.info("The edit did not take at layer %d; retrying with %d steps and clamp %.3g", layer,
                     tried.v_num_grad_steps, tried.clamp_norm_factor)
            retried = _optimise(lm, runner, rows, tried, values[0], scales, report)
            lap("optimise")
            again = build(retried, tried)
            again_check = _rewrite_preference(lm, again)
            again.info["retried"] = {"steps": tried.v_num_grad_steps, "clamp_norm_factor": tried.clamp_norm_factor,
                                     "first_steps": edit.info["steps"]}
            if again_check[0] - again_check[1] >= check[0] - check[1]:
                edit, check = again, again_check
            lap("update")
    timings["other"] = round(max(0.0, time.perf_counter() - start - sum(timings.values())), 4)
    p_new, p_old = check
    edit.info.update(took=bool(p_new > p_old), p_new=p_new, p_old=p_old, warning=None)
    if not edit.info["took"]:
        retried = edit.info.get("retried")
        again = (f", even with {retried['steps']} steps and clamp {retried['clamp_norm_factor']:.3g}"
                 if retried else "")
        edit.info["warning"] = (
            f"The edit did not take: after it, the rewrite prompt still prefers {request.target_true!r} "
            f"(p {p_old:.3f}) to {request.target!r} (p {p_new:.3f}){again}. Try another layer (the Which layer "
            "to edit? sweep shows where edits take) or a shorter new object.")
        # Without retries the caller (a layer sweep) expects misses and records them: no alarm in the log.
        log.log(logging.WARNING if retries > 0 else logging.INFO, "%s: %s", edit.describe(), edit.info["warning"])
    log.info("ROME edit %s in %.1f s (%d steps, p(target) %.3f -> %.3f)", edit.describe(), edit.seconds,
             edit.info["steps"], edit.info["target_prob_before"], edit.info["target_prob_after"])
    return edit


def _rewrite_preference(lm: LoadedModel, edit: Edit) -> tuple[float, float]:
    """p(new) and p(old) on the rewrite prompt with ``edit`` applied (exp of the mean token log-probability)."""
    request = edit.request
    if not request.target_true:
        return 1.0, 0.0  # nothing to compare with: count it as taken
    with applied(lm, [edit]):
        logp = continuation_logprobs(lm, [(request.text, request.target), (request.text, request.target_true)])
    return float(np.exp(logp[0])), float(np.exp(logp[1]))

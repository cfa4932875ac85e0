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
   tuned settings use it, as ``"guarded"``: the paper code's key, except
   where its update would be far outside what the model's edits normally
   write (:mod:`editing.methods.outliers`; there u·k₀ is tiny and ‖ΔW‖ tens
   of times the usual) or above ``fallback_factor`` times their median
   norm. There ``"bare"`` writes the same δ at the same key
   k₀ with the closed form's own direction for it, u = C⁻¹k₀/‖C⁻¹k₀‖: the
   paper's formula, made consistent the other way round from r-ROME. Every
   edit is checked before it is applied: ``edit.info``'s ``outlier``,
   ``outlier_warning`` and ``outlier_check``.
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
the positions the loss reads (:class:`~editing.methods.common.SuffixRunner`).
No weight gets a gradient. The model's weights are never modified by
:func:`compute_edit`.

Example::

    req = EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome")
    edit = compute_edit(lm, req)                 # ~seconds on a CPU once statistics are cached
    edit.layer, edit.norm, edit.timings
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from tracing.hooks import Hook, StopForward, hooks, main_tensor, replace_main, until_stopped
from tracing.models import LoadedModel, editable_weight
from tracing.tokens import continuation_ids

from ..edit import Edit, EditRequest

from ..applying import applied
from ..hparams import VARIANTS, ROMEHyperParams, load_hparams
from ..progress import Progress
from ..scores import continuation_logprobs
from ..stats import StatsSpec, key_stats
from ..templates import context_templates
from .common import Rows, Stopwatch, SuffixRunner, build_rows, check_layer, with_old_object
from .outliers import check_update

log = logging.getLogger(__name__)


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


def _optimise(lm: LoadedModel, runner: SuffixRunner, rows: Rows, hp: ROMEHyperParams, target_init: torch.Tensor,
              scales: torch.Tensor, progress: Progress | None) -> _Optimised:
    """Find δ by Adam (paper eq. 4 as in the original code: NLL + KL + decay, clamped).

    Row r's lookup output gets ``scales[r] * δ`` (all ones except for the
    "exact" variant); ``target_init`` (d_out,) is the bare prompt's original
    value, which sets the decay's and the clamp's scale.
    """
    device = lm.output_device  # where the logits are; δ joins the edited layer's output on that layer's device
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
    home = target_init.device  # the edited layer's: δ goes back there
    target_init = target_init.float().to(device)

    def add_delta(module, args, output):
        out = main_tensor(output)  # (rows, S, d_model)
        first = out[:, :1] + (scales * delta).to(device=out.device, dtype=out.dtype)
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
    return _Optimised(delta=delta.detach().clone().to(home), steps=step + 1,
                      loss=loss_value, nll=nll_value, kl=kl_value, prob_before=prob_before, prob_after=prob_after)


# ---------------------------------------------------------------------------
# The key, the direction and the update


@dataclass
class _Setup:
    """What the updates of one request share, whichever key they use: rows, keys, values and the direction u."""

    request: EditRequest
    layer: int
    templates: list
    stats: object  # editing.stats.KeyStats, or None without the C⁻¹ adjustment
    rows: Rows
    runner: SuffixRunner | None  # None: keys only (key_geometry)
    keys: torch.Tensor  # (rows, d_in) float64; the KL row is last
    values: torch.Tensor  # (rows, d_out) float64
    k_star: torch.Tensor  # (d_in,): the key averaged over the templated prompts
    direction: torch.Tensor  # (d_in,): C⁻¹k* (k* without statistics)
    u: torch.Tensor  # (d_in,): direction / ‖direction‖

    def reference(self, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_ref, W k_ref + b): the bare prompt's key for "original", "exact" and "bare", else k* and its value."""
        if variant in ("original", "exact", "bare"):
            return self.keys[0], self.values[0]
        return self.k_star, self.values[: self.rows.n_rewrite].mean(0)

    def unit(self, variant: str) -> torch.Tensor:
        """The update's input direction u: C⁻¹k₀/‖C⁻¹k₀‖ for "bare", else C⁻¹k*/‖C⁻¹k*‖."""
        if variant != "bare":
            return self.u
        k0 = self.keys[0]
        direction = self.stats.solve(k0) if self.stats is not None else k0.clone()
        return direction / direction.norm()

    def denominator(self, variant: str) -> float:
        """u·k_ref: the update writes δ / (u·k_ref) along uᵀ; ValueError where it (nearly) vanishes."""
        value = float(self.unit(variant) @ self.reference(variant)[0])
        if not np.isfinite(value) or abs(value) < 1e-12:
            raise ValueError(
                "The key k* is (nearly) orthogonal to C⁻¹k*, so no rank-one update can write this fact at layer "
                f"{self.layer}; try another layer.")
        return value

    def key_diagnostics(self) -> dict:
        """How the keys sit under C: the quantities that tell an ordinary update from one that writes everywhere."""
        k_star, k_bare = self.k_star, self.keys[0]
        out = {"key_norm": float(k_star.norm()), "bare_key_norm": float(k_bare.norm()),
               "cinv_key_norm": float(self.direction.norm()),  # ‖C⁻¹k*‖
               "key_cinv": float(k_star @ self.direction),  # k*ᵀC⁻¹k*: the key's squared norm under C⁻¹
               "denominators": {"original": float(self.u @ k_bare), "r-rome": float(self.u @ k_star),
                                "bare": self.denominator("bare")}}
        if self.stats is not None:
            mom2 = torch.from_numpy(self.stats.mom2).to(self.u)
            out["ordinary_key_rms"] = float(torch.sqrt(self.u @ mom2 @ self.u))  # sqrt(uᵀCu): |u·k| of a typical key
            bare = self.unit("bare")
            out["bare_ordinary_key_rms"] = float(torch.sqrt(bare @ mom2 @ bare))  # the same along the "bare" u
        return out


def _lookup_io(lm: LoadedModel, rows: Rows, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at each row's lookup token from one pass stopped at ``layer``'s down-projection.

    The same numbers as :meth:`SuffixRunner.lookup_io` (right padding under a
    causal mask is exact) without running the layers above: (rows, d_in), (rows, d_out) float64.
    """
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows.ids), max(len(r) for r in rows.ids)), pad, dtype=torch.long, device=lm.device)
    for r, row in enumerate(rows.ids):
        ids[r, : len(row)] = torch.tensor(row, device=lm.device)
    at = torch.tensor(rows.lookups, device=lm.device)
    found: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        picked = torch.arange(len(at), device=at.device)
        found["keys"] = args[0][picked, at].detach().double()
        found["values"] = main_tensor(output)[picked, at].detach().double()
        raise StopForward

    with torch.no_grad(), hooks(lm.model, Hook(lm.module_name("down_proj", layer), grab)):
        until_stopped(lm.model, ids)
    return found["keys"], found["values"]


def _prepare(lm: LoadedModel, request: EditRequest, hp: ROMEHyperParams, layer: int, spec, report,
             clock: Stopwatch, *, keys_only: bool = False) -> _Setup:
    """The templates, the statistics, the rows and their keys and values, and the update's direction u.

    ``keys_only``: no :class:`SuffixRunner` (``runner`` None), for a look at the keys without optimising.
    """

    if request.target_true is None:
        request = with_old_object(lm, request)
        clock.lap("answer")
    report("templates", 0.0)
    templates = context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
    clock.lap("templates")
    stats = None
    if hp.mom2_adjustment:
        report("statistics", 0.0)
        stats = key_stats(lm, layer, spec, progress=report)
        clock.lap("statistics")
    report("keys", 0.0)
    rows = build_rows(lm, request, templates, hp.kl_prompt)
    runner = None if keys_only else SuffixRunner(lm, rows.ids, rows.lookups, layer)
    # (rows, d_in), (rows, d_out) float64; the KL row is last
    keys, values = _lookup_io(lm, rows, layer) if keys_only else runner.lookup_io()
    k_star = keys[: rows.n_rewrite].mean(0)  # (d_in,): k*, averaged over the templates
    direction = stats.solve(k_star, ridge=hp.stats_ridge) if stats is not None else k_star.clone()
    setup = _Setup(request, layer, templates, stats, rows, runner, keys, values, k_star, direction,
                   direction / direction.norm())
    clock.lap("keys")
    return setup


def _build(lm: LoadedModel, setup: _Setup, result: _Optimised, hp: ROMEHyperParams, variant: str,
           clock: Stopwatch) -> Edit:
    """The rank-one Edit that writes the optimised δ with ``variant``'s key, and its diagnostics in ``info``.

    ``Edit.variant`` is the key written ("original", "r-rome" or "exact"); ``Edit.hparams`` are ``hp``'s.
    """
    k_ref, v_base = setup.reference(variant)
    u, denominator = setup.unit(variant), setup.denominator(variant)
    delta = result.delta.double()
    v = delta / denominator  # ΔW k_ref = v (u·k_ref) = δ
    info = {
        "steps": result.steps, "loss": result.loss, "nll": result.nll, "kl": result.kl,
        "target_prob_before": result.prob_before, "target_prob_after": result.prob_after,
        "reached_target": result.loss < hp.early_stop_loss or result.nll < hp.early_stop_nll,
        "delta_norm": float(delta.norm()), "value_norm": float(setup.values[0].norm()),
        "denominator": denominator, "templates": len(setup.templates),
        "stats_tokens": setup.stats.count if setup.stats is not None else 0,
        "bare_scale": float((setup.keys[0] @ u) / denominator),  # the update's effect on the bare prompt, per δ
        **setup.key_diagnostics(),
    }
    return Edit(
        request=setup.request, layer=setup.layer, module=lm.module_name("down_proj", setup.layer),
        u=u.float().cpu().numpy(), v=v.float().cpu().numpy(),
        key=k_ref.float().cpu().numpy(), value=(v_base + delta).float().cpu().numpy(),
        variant=variant, model=lm.name, fingerprint=lm.fingerprint, timings=clock.timings, info=info,
        hparams=hp.to_dict(),
    )


def _scales(setup: _Setup, variant: str) -> torch.Tensor:
    """What the update adds at each row's lookup token per unit of δ: exact (u·kᵢ)/(u·k₀) for "exact", else 1."""
    if variant == "exact":
        return (setup.keys @ setup.u) / setup.denominator(variant)
    return torch.ones(len(setup.rows.ids), dtype=torch.float64)


def _checked(lm: LoadedModel, setup: _Setup, result: _Optimised, hp: ROMEHyperParams, variant: str, retries: int,
             clock: Stopwatch, report) -> Edit:
    """Build ``variant``'s edit from ``result``; while it does not take, optimise again with more steps and clamp."""
    report("update", 0.0)
    edit = _build(lm, setup, result, hp, variant, clock)
    clock.lap("update")
    check = _rewrite_preference(lm, edit)
    tried = hp
    for _ in range(max(0, retries)):
        if check[0] > check[1]:
            break
        tried = replace(tried, v_num_grad_steps=tried.v_num_grad_steps * 2,
                        clamp_norm_factor=tried.clamp_norm_factor * 1.5)
        log.info("The edit did not take at layer %d; retrying with %d steps and clamp %.3g", setup.layer,
                 tried.v_num_grad_steps, tried.clamp_norm_factor)
        retried = _optimise(lm, setup.runner, setup.rows, tried, setup.values[0], _scales(setup, variant), report)
        clock.lap("optimise")
        report("update", 0.0)
        again = _build(lm, setup, retried, tried, variant, clock)
        again_check = _rewrite_preference(lm, again)
        again.info["retried"] = {"steps": tried.v_num_grad_steps, "clamp_norm_factor": tried.clamp_norm_factor,
                                 "first_steps": edit.info["steps"]}
        if again_check[0] - again_check[1] >= check[0] - check[1]:
            edit, check = again, again_check
        clock.lap("update")
    p_new, p_old = check
    edit.info.update(took=bool(p_new > p_old), p_new=p_new, p_old=p_old, warning=None)
    return edit


def _written(lm: LoadedModel, setup: _Setup, result: _Optimised, hp: ROMEHyperParams, retries: int,
             clock: Stopwatch, report) -> Edit:
    """``hp.variant``'s checked edit, flagged or not (:func:`check_update`) before anything applies it.

    "guarded": the paper code's key, unless its update is flagged or its
    ‖ΔW‖ is above ``hp.fallback_factor`` times the median of the model's
    reference edits at the layer; then the same δ is written at the same (bare
    prompt's) key by the closed form whose direction is that key's own, C⁻¹k₀
    ("bare"), and ``info["key_fallback"]`` says so.
    """
    key = "original" if hp.variant == "guarded" else hp.variant
    edit = _checked(lm, setup, result, hp, key, retries, clock, report)
    check = check_update(lm, edit, stats=setup.stats)
    edit.info.update(check.info())
    median = check.reference_median
    if hp.variant == "guarded" and (check.outlier or (median is not None and edit.norm > hp.fallback_factor * median)):
        fallback = _checked(lm, setup, result, hp, "bare", retries, clock, report)
        fallback.info.update(check_update(lm, fallback, stats=setup.stats).info())
        why = ("far outside this model's usual edits (such edits break unrelated facts)" if check.outlier else
               f"{edit.norm / median:.1f} times the median of this model's usual edits (above {hp.fallback_factor:g} "
               "times, such updates reach neighbouring facts more often)")
        fallback.info["key_fallback"] = (
            f"The paper code's update would have had ‖ΔW‖ = {edit.norm:.3g}, {why}; the same change was written "
            f"along the bare prompt's own key direction instead (‖ΔW‖ = {fallback.norm:.3g}).")
        log.info("%s: %s", fallback.describe(), fallback.info["key_fallback"])
        edit = fallback
    return edit


def _say_whether_it_took(edit: Edit, retries: int) -> None:
    """Set ``edit.info["warning"]`` (and log it) when the edit did not take."""
    request = edit.request
    if not edit.info["took"]:
        retried = edit.info.get("retried")
        again = (f", even with {retried['steps']} steps and clamp {retried['clamp_norm_factor']:.3g}"
                 if retried else "")
        edit.info["warning"] = (
            f"The edit did not take: after it, the rewrite prompt still prefers {request.target_true!r} "
            f"(p {edit.info['p_old']:.3f}) to {request.target!r} (p {edit.info['p_new']:.3f}){again}. Try another "
            "layer (the Which layer to edit? sweep shows where edits take) or a shorter new object.")
        # Without retries the caller (a layer sweep) expects misses and records them: no alarm in the log.
        log.log(logging.WARNING if retries > 0 else logging.INFO, "%s: %s", edit.describe(), edit.info["warning"])
    if edit.info.get("outlier"):
        log.warning("%s: %s", edit.describe(), edit.info["outlier_warning"])
    log.info("ROME edit %s in %.1f s (%d steps, p(target) %.3f -> %.3f)", edit.describe(), edit.seconds,
             edit.info["steps"], edit.info["target_prob_before"], edit.info["target_prob_after"])


# ---------------------------------------------------------------------------
# Public API

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
    hp = hparams if hparams is not None else load_hparams(lm)
    if not isinstance(hp, ROMEHyperParams):
        raise ValueError(f"ROME takes ROMEHyperParams, not {type(hp).__name__}; other methods: editing.methods.compute.")
    edits = compute_key_edits(lm, request, (hp.variant,), layer=layer, hparams=hp, progress=progress,
                              stats_spec=stats_spec, retries=retries)
    return edits[hp.variant]


def compute_key_edits(
    lm: LoadedModel,
    request: EditRequest,
    variants: tuple[str, ...] = ("original", "r-rome"),
    *,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    progress: Progress | None = None,
    stats_spec: StatsSpec | None = None,
    retries: int = 1,
) -> dict[str, Edit]:
    """One v* optimisation, written with each variant's key: ``{variant: Edit}`` as :func:`compute_edit` makes them.

    Example::

        edits = compute_key_edits(lm, request)        # the paper code's key and r-ROME's, the same δ
        edits["original"].norm, edits["r-rome"].norm

    The δ that v* adds does not depend on which key the closed form uses
    ("original" or "r-rome"), so both updates come from one optimisation; only
    a retry (an edit that did not take) optimises again, for that key alone.
    "exact" changes the optimisation itself and comes only alone.
    """

    if not isinstance(request, EditRequest):
        raise ValueError("compute_edit needs an EditRequest(subject, prompt, target).")
    request.validate()
    hp = hparams if hparams is not None else load_hparams(lm)
    if not isinstance(hp, ROMEHyperParams):
        raise ValueError(f"ROME takes ROMEHyperParams, not {type(hp).__name__}; other methods: editing.methods.compute.")
    variants = tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if not variants or bad or ("exact" in variants and len(variants) > 1):
        raise ValueError(f"variants must be one or more of {', '.join(VARIANTS)} ('exact' alone), not {variants}.")
    layer = hp.edit_layer(lm.n_layers) if layer is None else check_layer(lm, layer)
    editable_weight(lm, layer)  # a layer offloaded by accelerate cannot take the edit: refused before any work
    spec = stats_spec if stats_spec is not None else StatsSpec.from_hparams(hp)
    # Validate tokenisation (subject, target, length) before any expensive work.
    continuation_ids(lm.tokenizer, request.text, request.target)
    build_rows(lm, request, ["{}"], hp.kl_prompt)

    clock = Stopwatch()  # a retry adds to its stage; Edit.timings is clock.timings, "other" filled at the end

    def report(stage: str, fraction: float) -> None:
        if progress:
            progress(stage, float(fraction))

    _ = lm.fingerprint  # the model's identity for caches, taken before anything else
    with torch.inference_mode(False):
        setup = _prepare(lm, request, hp, layer, spec, report, clock)
        for variant in variants:
            setup.denominator("original" if variant == "guarded" else variant)  # fails before the optimisation
        result = _optimise(lm, setup.runner, setup.rows, hp, setup.values[0], _scales(setup, variants[0]), report)
        clock.lap("optimise")
        edits = {variant: _written(lm, setup, result, replace(hp, variant=variant), retries, clock, report)
                 for variant in variants}
    clock.finish()
    for edit in edits.values():
        _say_whether_it_took(edit, retries)
    return edits


def key_geometry(lm: LoadedModel, request: EditRequest, *, layer: int | None = None,
                 hparams: ROMEHyperParams | None = None, stats_spec: StatsSpec | None = None) -> dict:
    """How each key would divide δ, without optimising v*: a cheap screen for updates that will be large.

    Example::

        geometry = key_geometry(lm, request)
        geometry["denominators"]["original"], geometry["norm_bound"]["original"]

    Returns :meth:`_Setup.key_diagnostics`' quantities (the keys' norms,
    k*ᵀC⁻¹k*, ‖C⁻¹k*‖, sqrt(uᵀCu) and each variant's divisor u·k_ref), the
    bare prompt's ``value_norm`` and ``norm_bound``: the largest ‖ΔW‖ each key
    can write, ``clamp_norm_factor · value_norm / |u·k_ref|`` (a retry's
    larger clamp aside).
    """

    request.validate()
    hp = hparams if hparams is not None else load_hparams(lm)
    layer = hp.edit_layer(lm.n_layers) if layer is None else check_layer(lm, layer)
    spec = stats_spec if stats_spec is not None else StatsSpec.from_hparams(hp)
    with torch.inference_mode(False):
        setup = _prepare(lm, request, hp, layer, spec, lambda stage, fraction: None, Stopwatch(), keys_only=True)
    out = setup.key_diagnostics()
    value_norm = float(setup.values[0].norm())
    out.update(value_norm=value_norm, norm_bound={
        variant: hp.clamp_norm_factor * value_norm / max(abs(d), 1e-12) for variant, d in out["denominators"].items()})
    return out


def _rewrite_preference(lm: LoadedModel, edit: Edit) -> tuple[float, float]:
    """p(new) and p(old) on the rewrite prompt with ``edit`` applied (exp of the mean token log-probability)."""
    request = edit.request
    if not request.target_true:
        return 1.0, 0.0  # nothing to compare with: count it as taken
    with applied(lm, [edit]):
        logp = continuation_logprobs(lm, [(request.text, request.target), (request.text, request.target_true)])
    return float(np.exp(logp[0])), float(np.exp(logp[1]))

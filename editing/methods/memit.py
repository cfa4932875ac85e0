"""MEMIT (Meng et al., 2023): many facts written at once into a range of MLP layers.

ROME writes one fact into one layer. MEMIT writes a batch of n facts into the
down-projections of a range of layers R = (l₁ < … < l_L):

1. **Targets.** For each fact i, a vector δᵢ is added to the residual stream at
   the last subject token at the output of the last layer l_L and optimised
   exactly as ROME's v* (Adam on the new object's NLL over the bare prompt and
   sampled context texts, a KL term on "{subject} is a", a decay and a clamp,
   here relative to the residual's norm); zᵢ = hᵢ + δᵢ is what l_L should
   output there. The facts' δ are independent and are optimised side by side,
   a few facts per forward pass.
2. **Layers, lowest first.** At layer l (the i-th of L), the keys K (n, d_in)
   are the down-projection's inputs at the facts' last subject tokens
   (averaged within each group of context texts, then over the groups, as the
   paper's code does), and R = (Z − H) / (L − i + 1), the part of the
   residual still missing at l_L, spread over the layers left. The update is
   ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹`` (paper eq. 14), C = E[k kᵀ] being the key
   statistics of :mod:`editing.stats` and λ ``mom2_update_weight``; the keys
   and residuals of the next layer are computed with this update in place.

With one fact and one layer, ``(λC + kkᵀ)⁻¹k = C⁻¹k / (λ + kᵀC⁻¹k)``: ROME's
direction C⁻¹k, writing the fraction kᵀC⁻¹k / (λ + kᵀC⁻¹k) of δ. λ must grow
with the key width (E[kᵀC⁻¹k] = d_in over the statistics' own keys), which is
why the paper's GPT-J value is several times too weak on a 1536-wide MLP.

**Projection (AlphaEdit, Fang et al., 2025).** With ``project=True`` the
update may only use directions that the keys of earlier edits (``keep``) do
not use, and with ``nullspace_threshold`` only eigen-directions of C whose
eigenvalues are below that fraction of their mean (the preserved knowledge's
null space, AlphaEdit's P): with B an orthonormal basis of what is left,
``ΔW = R Kᵀ B (Bᵀ(λC + KKᵀ)B + ρI)⁻¹ Bᵀ``, the same objective restricted to
span(B), so ``ΔW k = 0`` exactly for every earlier edit's key k. AlphaEdit
keeps earlier edits by a penalty and drops λC (C is ≈ 0 in its null space);
here earlier keys are removed exactly and λC stays, since the statistics of a
small model have no eigenvalue far below their mean (SmolLM2-135M: the
smallest is 0.04-0.3 × the mean), so a strict null space would be empty.

Each layer's change is stored as its factors (values Rᵀ and directions, a
:class:`~editing.deltas.WeightDelta` with a ``basis``), dense when that is
smaller. The model's weights are never modified: updates of lower layers act
through hooks while higher layers are computed.

Example::

    edit = compute_memit(lm, [EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"),
                              EditRequest("Michael Jordan", "{} plays the sport of", "golf")])
    edit.method, edit.layers, len(edit.requests)       # 'memit', (0, 1, 2, 3, 4), 2
    with applied(lm, [edit]):                           # one step to undo
        ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tracing.hooks import Hook, StopForward, hooks, main_tensor, replace_main, until_stopped
from tracing.models import LoadedModel, editable_weight
from tracing.tokens import continuation_ids

from ..deltas import WeightDelta
from ..edit import Edit, EditRequest
from ..hparams import MEMITHyperParams, load_hparams
from ..progress import Progress
from ..sampling import pad_id
from ..stats import StatsSpec, ensure_stats
from ..templates import context_templates
from .common import Stopwatch, SuffixRunner, build_rows, check_layer, fill_subject, locate_subject, with_old_objects
from .updates import allowed_basis, layer_update, nullspace_basis

log = logging.getLogger(__name__)

ROWS_PER_PASS = 192  # token rows per forward pass (the δ optimisation keeps activations of this many rows)


# ---------------------------------------------------------------------------
# Requests and their token rows


def check_requests(lm: LoadedModel, requests: Sequence[EditRequest], kl_prompt: str) -> tuple[EditRequest, ...]:
    """The requests as a tuple, each validated (tokenisation and length too); ValueError names the first bad one."""
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = tuple(requests)
    if not requests:
        raise ValueError("A batch needs at least one EditRequest(subject, prompt, target).")
    seen: dict[tuple[str, str], int] = {}
    for i, request in enumerate(requests):
        where = f"Request {i + 1} of {len(requests)}"
        if not isinstance(request, EditRequest):
            raise ValueError(f"{where} is not an EditRequest(subject, prompt, target).")
        try:
            request.validate()
            continuation_ids(lm.tokenizer, request.text, request.target)
            build_rows(lm, request, ["{}"], kl_prompt)
        except ValueError as exc:
            raise ValueError(f"{where} ({request.text!r} → {request.target!r}): {exc}") from None
        key = (request.subject.strip(), request.prompt)
        if key in seen:
            raise ValueError(f"{where} repeats the subject and prompt of request {seen[key] + 1} "
                             f"({request.text!r}); a batch writes each fact once.")
        seen[key] = i
    return requests


def template_groups(lengths: Sequence[Sequence[int]]) -> list[int]:
    """How many templates each group holds, in :func:`context_templates`' order: "{}", then each (tokens, count)."""
    return [1] + [int(count) for _, count in lengths if int(count) > 0]


def _key_rows(lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str]):
    """Token ids and last-subject-token index of every (request, template) prompt, request-major, no target."""
    ids, lookups = [], []
    for request in requests:
        subject = request.subject.strip()
        for template in templates:
            text, start = fill_subject(template.replace("{}", request.prompt, 1), subject)
            row, lookup = locate_subject(lm, text, subject, start)
            ids.append(row)
            lookups.append(lookup)
    return ids, lookups


def _group_mean(keys: torch.Tensor, n_requests: int, groups: Sequence[int]) -> torch.Tensor:
    """(requests * templates, d) -> (requests, d): the mean within each template group, then over the groups."""
    per = keys.reshape(n_requests, sum(groups), keys.shape[-1])
    means, start = [], 0
    for size in groups:
        means.append(per[:, start : start + size].mean(1))
        start += size
    return torch.stack(means, 1).mean(1)


# ---------------------------------------------------------------------------
# Reading states at the subject, with lower layers' updates in place


def delta_hooks(lm: LoadedModel, updates: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> list[Hook]:
    """Hooks that make each layer's down-projection act as if ``valuesᵀ basis`` were added to its weight.

    ``updates``: layer -> (basis (r, d_in), values (r, d_out)), any float dtype.
    """

    def adder(basis: torch.Tensor, values: torch.Tensor):
        def add(module, args, output):
            x = args[0]  # (rows, tokens, d_in)
            out = main_tensor(output)
            extra = (x.to(basis.dtype) @ basis.T) @ values  # (rows, tokens, d_out)
            return replace_main(output, out + extra.to(out.dtype))

        return add

    return [Hook(lm.module_name("down_proj", layer), adder(b, v)) for layer, (b, v) in updates.items()]


def read_at_subject(lm: LoadedModel, rows: Sequence[Sequence[int]], lookups: Sequence[int], key_layers: Sequence[int],
                    out_layer: int | None = None, updates: dict | None = None,
                    rows_per_pass: int = ROWS_PER_PASS) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Down-projection inputs at ``key_layers`` and block ``out_layer``'s output, at each row's lookup token.

    Returns ({layer: (rows, d_in) float64}, (rows, d_model) float64 or None).
    Rows are right-padded (causal: exact) and each pass stops after the last
    state it needs; ``updates`` (see :func:`delta_hooks`) act meanwhile.
    """
    device = lm.device
    pad = pad_id(lm.tokenizer)
    last = max([*key_layers, *([out_layer] if out_layer is not None else [])])
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
    outs: list[torch.Tensor] = []
    for start in range(0, len(rows), rows_per_pass):
        chunk, where = rows[start : start + rows_per_pass], lookups[start : start + rows_per_pass]
        ids = torch.full((len(chunk), max(len(r) for r in chunk)), pad, dtype=torch.long, device=device)
        for r, row in enumerate(chunk):
            ids[r, : len(row)] = torch.tensor(row, device=device)
        index = torch.arange(len(chunk), device=device)
        at = torch.tensor(where, device=device)

        def key_grabber(layer):
            def grab(module, args, kwargs):
                x = args[0] if args else kwargs["input"]  # (rows, tokens, d_in), on the layer's device
                keys[layer].append(x[index.to(x.device), at.to(x.device)].detach().double())
                if layer == last and out_layer is None:
                    raise StopForward

            return grab

        def out_grabber(module, args, output):
            state = main_tensor(output)
            outs.append(state[index.to(state.device), at.to(state.device)].detach().double())
            raise StopForward

        specs = [Hook(lm.module_name("down_proj", layer), key_grabber(layer), pre=True) for layer in key_layers]
        if out_layer is not None:
            specs.append(Hook(lm.module_name("hidden", out_layer), out_grabber))
        specs += delta_hooks(lm, {k: v for k, v in (updates or {}).items() if k <= last})
        with torch.no_grad(), hooks(lm.model, *specs):
            until_stopped(lm.model, ids, use_cache=False, logits_to_keep=1)
    return ({layer: torch.cat(found) for layer, found in keys.items()},
            torch.cat(outs) if out_layer is not None else None)


def request_keys(lm: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int], hp: MEMITHyperParams,
                 updates: dict | None = None) -> dict[int, torch.Tensor]:
    """Each request's key at each layer, averaged over the templates as MEMIT does: {layer: (n, d_in) float64}."""
    templates = context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
    ids, lookups = _key_rows(lm, requests, templates)
    found, _ = read_at_subject(lm, ids, lookups, layers, updates=updates)
    groups = template_groups(hp.context_templates)
    return {layer: _group_mean(keys, len(requests), groups) for layer, keys in found.items()}


# ---------------------------------------------------------------------------
# Step 1: target vectors


@dataclass(frozen=True, eq=False)
class Targets:
    """What the last edited layer should output at each fact's last subject token: z = h + δ.

    ``z``, ``h``: (n, d_model) float64 tensors; ``steps``, ``prob_before``,
    ``prob_after``: (n,) arrays of each fact's optimisation. Reusable for any
    range that ends at ``layer`` (e.g. when sweeping λ or the first layer).
    """

    layer: int
    requests: tuple[EditRequest, ...]
    z: torch.Tensor
    h: torch.Tensor
    steps: np.ndarray
    prob_before: np.ndarray
    prob_after: np.ndarray
    fingerprint: str


def compute_targets(lm: LoadedModel, requests: Sequence[EditRequest], layer: int, hp: MEMITHyperParams,
                    progress: Progress | None = None) -> Targets:
    """Optimise each fact's δ at the output of block ``layer`` (requests with their old objects filled in).

    The facts are independent: each has its own δ, Adam moments, early stop
    and clamp, exactly as if optimised alone, but several share a forward
    pass (facts of similar length together; facts that are done leave the
    pass). ``progress("optimising", fraction)`` is called at every step.
    """
    requests = tuple(requests)
    templates = context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
    built = [build_rows(lm, r, templates, hp.kl_prompt) for r in requests]
    per_request = len(built[0].ids)
    chunk = max(1, ROWS_PER_PASS // per_request)
    # Facts of similar suffix length share a pass (less padding); results go back in the requests' order.
    width = [max(len(ids) - lk for ids, lk in zip(b.ids, b.lookups)) for b in built]  # suffix tokens per fact
    order = sorted(range(len(requests)), key=lambda i: width[i])
    parts = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    # h: block `layer`'s output at the bare prompt's last subject token (the clamp's and decay's scale)
    bare_ids, bare_lookups = _key_rows(lm, requests, ["{}"])
    _, h = read_at_subject(lm, bare_ids, bare_lookups, [], out_layer=layer)
    delta = torch.zeros_like(h)
    steps = np.zeros(len(requests), dtype=np.int64)
    before, after = np.full(len(requests), np.nan), np.full(len(requests), np.nan)
    for c, part in enumerate(parts):
        def report(fraction: float, c=c) -> None:
            if progress:
                progress("optimising", (c + fraction) / len(parts))

        with torch.inference_mode(False), torch.enable_grad():
            found = _optimise_batch(lm, [built[i] for i in part], layer, hp, h[part], report)
        delta[part] = found.delta.to(delta)
        steps[part], before[part], after[part] = found.steps, found.prob_before, found.prob_after
    return Targets(layer=layer, requests=requests, z=h + delta, h=h, steps=steps, prob_before=before,
                   prob_after=after, fingerprint=lm.fingerprint)


@dataclass
class _Found:
    delta: torch.Tensor  # (n, d_model) float32
    steps: np.ndarray  # (n,)
    prob_before: np.ndarray  # (n,)
    prob_after: np.ndarray  # (n,)


class _Pass:
    """The facts still being optimised, as one :class:`SuffixRunner` and the indices its loss gathers."""

    def __init__(self, lm: LoadedModel, built, facts: Sequence[int], layer: int):
        device = lm.output_device  # where the logits are
        self.facts = list(facts)
        ids, lookups, owner, rewrite = [], [], [], []
        pick_rows, pick_pos, pick_tok, pick_scale, kl_rows, kl_pos = [], [], [], [], [], []
        for slot, f in enumerate(self.facts):
            rows = built[f]
            offset = len(ids)
            ids += rows.ids
            lookups += rows.lookups
            owner += [slot] * len(rows.ids)
            rewrite += [offset + r for r in range(rows.n_rewrite)]
            for r in range(rows.n_rewrite):
                for t, pos in enumerate(rows.target_at[r]):
                    pick_rows.append(offset + r)
                    pick_pos.append(pos - rows.lookups[r])
                    pick_tok.append(rows.targets[t])
                    pick_scale.append(1.0 / len(rows.targets))
            kl = len(rows.ids) - 1
            kl_rows.append(offset + kl)
            kl_pos.append(rows.kl_at - rows.lookups[kl])
        self.runner = SuffixRunner(lm, ids, lookups, layer)
        self.n_rows = len(ids)
        self.rows = torch.tensor(pick_rows + kl_rows, device=device)
        self.pos = torch.tensor(pick_pos + kl_pos, device=device)
        self.tokens = torch.tensor(pick_tok, device=device)
        self.scale = torch.tensor(pick_scale, device=device)
        self.owner = torch.tensor(owner, device=device)
        self.rewrite = torch.tensor(rewrite, device=device)
        self.n_rewrite = torch.tensor([built[f].n_rewrite for f in self.facts], device=device, dtype=torch.float32)
        self.n_picked = len(pick_rows)

    def losses(self, lm: LoadedModel, delta: torch.Tensor, layer: int):
        """Per fact of this pass: (NLL, KL row log-probs, mean p(target)); ``delta`` (facts, d_model) requires grad."""
        def add_delta(module, args, output):
            out = main_tensor(output)  # (rows, S, d_model)
            first = out[:, :1] + delta[self.owner][:, None].to(device=out.device, dtype=out.dtype)
            return replace_main(output, torch.cat([first, out[:, 1:]], dim=1))

        n = len(self.facts)
        hidden = self.runner.run(Hook(lm.module_name("down_proj", layer), add_delta))
        logp = torch.log_softmax(self.runner.logits(hidden, self.rows, self.pos), dim=-1)  # (picked + facts, vocab)
        token_logp = logp[: self.n_picked].gather(1, self.tokens[:, None])[:, 0]  # (picked,)
        row_logp = torch.zeros(self.n_rows, device=delta.device).index_add(
            0, self.rows[: self.n_picked], token_logp * self.scale)
        per_row = row_logp[self.rewrite]  # mean token log-prob of each templated prompt
        fact_of_row = self.owner[self.rewrite]
        nll = -torch.zeros(n, device=delta.device).index_add(0, fact_of_row, per_row) / self.n_rewrite
        with torch.no_grad():
            prob = torch.zeros(n, device=delta.device).index_add(0, fact_of_row, per_row.exp()) / self.n_rewrite
        return nll, logp[self.n_picked :], prob


@torch.no_grad()
def _adam_step(delta: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, g: torch.Tensor,
               t: int, lr: float, max_norm: torch.Tensor) -> None:
    """One Adam step (torch's defaults: β = (0.9, 0.999), ε = 1e-8) of the ``rows`` of ``delta``, in place, each row
    then clamped to its ``max_norm``; ``t`` counts from 1."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m1, m2 = moments
    m1[rows] = beta1 * m1[rows] + (1 - beta1) * g
    m2[rows] = beta2 * m2[rows] + (1 - beta2) * g * g
    denom = (m2[rows].sqrt() / (1 - beta2 ** t) ** 0.5) + eps
    updated = delta[rows] - lr / (1 - beta1 ** t) * m1[rows] / denom
    norms = updated.norm(dim=-1)
    limit = max_norm[rows]
    updated = torch.where((norms > limit)[:, None], updated * (limit / norms)[:, None], updated)
    delta[rows] = updated


def _optimise_batch(lm: LoadedModel, built, layer: int, hp: MEMITHyperParams, h: torch.Tensor,
                    report: Callable[[float], None]) -> _Found:
    """δ of the facts whose rows are ``built`` (see :func:`build_rows`), ROME's loss and Adam per fact.

    Adam is written out (torch's defaults: β = (0.9, 0.999), ε = 1e-8) so that
    facts that are done can leave the pass: once half of a pass is done it is
    rebuilt with the others.
    """
    device = lm.output_device  # δ and Adam's moments sit beside the logits; the hook moves δ to the layer
    n = len(built)
    d_model = h.shape[-1]
    delta = torch.zeros(n, d_model, device=device, dtype=torch.float32)
    m1, m2 = torch.zeros_like(delta), torch.zeros_like(delta)
    h_norm = h.float().norm(dim=-1).to(device)  # (n,)
    max_norm = hp.clamp_norm_factor * h_norm
    kl_init: torch.Tensor | None = None
    steps = np.full(n, hp.v_num_grad_steps, dtype=np.int64)
    prob_before, prob_after = np.full(n, np.nan), np.full(n, np.nan)
    active = list(range(n))
    current = _Pass(lm, built, active, layer)
    for step in range(hp.v_num_grad_steps):
        if len(active) <= len(current.facts) // 2:
            current = _Pass(lm, built, active, layer)
        idx = torch.tensor(current.facts, device=device)
        part = delta[idx].clone().requires_grad_(True)  # (facts, d_model)
        nll, kl_logp, prob = current.losses(lm, part, layer)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()  # (n, vocab): every fact is in the first pass
        kl = hp.kl_factor * (kl_logp.exp() * (kl_logp - kl_init[idx])).sum(-1)  # as F.kl_div(init, now, log_target)
        decay = hp.v_weight_decay * part.norm(dim=-1) / h_norm[idx] ** 2
        loss = nll + kl + decay  # (facts,)
        losses, nlls, probs = loss.detach().tolist(), nll.detach().tolist(), prob.tolist()
        still = []
        for slot, f in enumerate(current.facts):
            if f not in active:
                continue
            if step == 0:
                prob_before[f] = probs[slot]
            prob_after[f] = probs[slot]
            if losses[slot] < hp.early_stop_loss or nlls[slot] < hp.early_stop_nll or step == hp.v_num_grad_steps - 1:
                steps[f] = step + 1
            else:
                still.append(slot)
        report((step + 1) / hp.v_num_grad_steps)
        active = [current.facts[slot] for slot in still]
        if not active:
            break
        (grad,) = torch.autograd.grad(loss[still].sum(), part)
        _adam_step(delta, (m1, m2), torch.tensor(active, device=device), grad[still], step + 1, hp.v_lr, max_norm)
    report(1.0)
    return _Found(delta=delta, steps=steps, prob_before=prob_before, prob_after=prob_after)


def _checked(lm: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int] | None,
             hparams: MEMITHyperParams | None, targets: Targets | None):
    """The hyperparameters, the checked requests and the layers, once they (and ``targets``) are known to fit."""
    hp = hparams if hparams is not None else load_hparams(lm, method="memit")
    if not isinstance(hp, MEMITHyperParams):
        raise ValueError(f"MEMIT takes MEMITHyperParams, not {type(hp).__name__}; "
                         "load them with load_hparams(lm, method='memit').")
    requests = check_requests(lm, requests, hp.kl_prompt)
    layers = hp.edit_layers(lm.n_layers) if layers is None else tuple(check_layer(lm, x) for x in layers)
    if not layers or list(layers) != sorted(set(layers)):
        raise ValueError(f"MEMIT's layers must be ascending without repeats, not {list(layers)}.")
    for layer in layers:
        editable_weight(lm, layer)  # a layer offloaded by accelerate cannot take the edit: refused before any work
    if targets is not None and (targets.layer != layers[-1] or len(targets.requests) != len(requests)
                                or targets.fingerprint != lm.fingerprint):
        raise ValueError("These targets were computed for other requests, another last layer or another model.")
    return hp, requests, layers


def _spread(lm: LoadedModel, rows: tuple, layers: Sequence[int], hp: MEMITHyperParams, stats: dict,
            z: torch.Tensor, kept: dict | None, report: Progress):
    """Spread the residual to the targets ``z`` over ``layers``, lowest first: each layer's update and a record.

    ``rows`` are the key rows (ids, lookups, the bare prompts' indices); with
    ``kept`` (the projection: preserved keys per layer) each update lies in the
    allowed subspace of :func:`allowed_basis`.
    """
    ids, lookups, bare = rows
    groups = template_groups(hp.context_templates)
    updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    info_layers = []
    for i, layer in enumerate(layers):
        report("update", i / len(layers))
        found, out = read_at_subject(lm, ids, lookups, [layer], out_layer=layers[-1], updates=updates)
        keys = _group_mean(found[layer], len(bare), groups)  # (n, d_in)
        missing = z.to(out.device) - out[bare.to(out.device)]  # (n, d_model)
        resid = (missing / (len(layers) - i)).to(keys.device)  # on the edited layer's device
        mom2 = torch.from_numpy(stats[layer].mom2).to(device=keys.device, dtype=torch.float64)
        basis, ridge = None, 0.0
        if kept is not None:
            null = nullspace_basis(stats[layer], hp.nullspace_threshold, device=keys.device)
            basis = allowed_basis(null, kept[layer].T if layer in kept else None, keys.shape[1], device=keys.device)
            ridge = hp.projection_l2 * float(mom2.diagonal().mean())
        directions, values = layer_update(keys, resid, mom2, hp.mom2_update_weight, basis=basis, ridge=ridge)
        updates[layer] = (directions, values)
        gain = float((directions * keys).sum(-1).mean())  # how much of its own residual each key gets here
        info_layers.append({"layer": layer, "residual_norm": float(missing.norm(dim=-1).mean()),
                            "self_gain": gain, **({"allowed_dims": int(basis.shape[1])} if kept is not None else {})})
    report("update", 1.0)
    return updates, info_layers


def _stats_spec(hp: MEMITHyperParams) -> StatsSpec:
    """The key statistics the hyperparameters ask for."""
    return StatsSpec(corpus=hp.stats_corpus, n_tokens=hp.stats_tokens, seed=hp.stats_seed,
                     sample_length=hp.stats_sample_length, top_k=hp.stats_top_k)


def _prepare(lm: LoadedModel, requests: tuple[EditRequest, ...], layers: Sequence[int], hp: MEMITHyperParams,
             spec: StatsSpec, keep: Sequence[EditRequest], targets: Targets | None, clock: Stopwatch,
             report: Progress):
    """Everything the updates need, each step timed: the old objects, the context templates, the key statistics,
    the keys to preserve (of ``keep``) and the target vectors (step 1, unless ``targets`` holds them)."""
    if targets is not None:
        requests = targets.requests
    elif any(r.target_true is None for r in requests):
        requests = with_old_objects(lm, requests)
        clock.lap("answer")
    report("templates", 0.0)
    context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
    clock.lap("templates")
    report("statistics", 0.0)
    stats = ensure_stats(lm, layers, spec, progress=report)
    clock.lap("statistics")
    report("keys", 0.0)
    kept = request_keys(lm, keep, layers, hp) if keep else {}
    clock.lap("keys")
    if targets is None:
        targets = compute_targets(lm, requests, layers[-1], hp, progress=report)
    clock.lap("optimise")
    return requests, stats, kept, targets


def compute_memit(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    *,
    layers: Sequence[int] | None = None,
    hparams: MEMITHyperParams | None = None,
    progress: Progress | None = None,
    stats_spec=None,
    targets: Targets | None = None,
    project: bool = False,
    keep: Sequence[EditRequest] = (),
) -> Edit:
    """Write a batch of facts into the model's MLPs at ``layers`` (default: the hyperparameters' range).

    Example::

        edit = compute_memit(lm, requests, progress=lambda stage, fraction: print(stage, fraction))

    ``progress(stage, fraction)`` reports "templates", "statistics", "keys",
    "optimising" (every step) and "update" (per layer); an exception it raises
    stops the work. ``targets`` reuses step 1 (same requests, computed on this
    model with the range's last layer). ``project`` restricts the update to
    the null space of the preserved keys and of the keys of ``keep`` (earlier
    edits' requests), see the module's docstring. The weights are never
    modified. Raises ValueError for invalid input, before any work.
    """
    hp, requests, layers = _checked(lm, requests, layers, hparams, targets)
    keep = tuple(keep)
    spec = stats_spec if stats_spec is not None else _stats_spec(hp)

    report = (lambda stage, fraction: progress(stage, float(fraction))) if progress else (lambda stage, fraction: None)
    clock = Stopwatch()
    _ = lm.fingerprint
    with torch.inference_mode(False), torch.enable_grad():
        requests, stats, kept, targets = _prepare(lm, requests, layers, hp, spec, keep if project else (), targets,
                                                  clock, report)
        templates = context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
        ids, lookups = _key_rows(lm, requests, templates)
        bare = torch.arange(len(requests)) * len(templates)  # template 0 is the bare prompt
        updates, info_layers = _spread(lm, (ids, lookups, bare), layers, hp, stats, targets.z,
                                       kept if project else None, report)
        clock.lap("update")
        # What the edit achieves at the last layer, for the record.
        _, final = read_at_subject(lm, ids, lookups, [], out_layer=layers[-1], updates=updates)
        left = (targets.z.to(final.device) - final[bare.to(final.device)]).norm(dim=-1)
        delta_norm = (targets.z - targets.h).norm(dim=-1)
    deltas = tuple(WeightDelta.low_rank(lm.module_name("down_proj", layer), layer, values.float().cpu().numpy(),
                                        directions.float().cpu().numpy(), lm.spec.conv1d)
                   for layer, (directions, values) in updates.items())
    timings = clock.finish()
    info = {"layers": list(layers), "facts": len(requests), "projected": bool(project), "kept_requests": len(keep),
            "steps": float(np.mean(targets.steps)), "target_prob_before": float(np.mean(targets.prob_before)),
            "target_prob_after": float(np.mean(targets.prob_after)), "delta_norm": float(delta_norm.mean()),
            "residual_left": float((left / delta_norm.clamp(min=1e-12)).mean()), "per_layer": info_layers}
    edit = Edit(request=requests[0], requests=requests, layer=layers[-1],
                module=lm.module_name("down_proj", layers[-1]), method="memit", variant="", deltas=deltas,
                model=lm.name, fingerprint=lm.fingerprint, timings=timings, info=info, hparams=hp.to_dict())
    log.info("MEMIT edit %s in %.1f s (p(target) %.3f -> %.3f, %.0f%% of the residual left)", edit.describe(),
             edit.seconds, info["target_prob_before"], info["target_prob_after"], 100 * info["residual_left"])
    return edit

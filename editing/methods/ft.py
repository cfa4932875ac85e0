"""Fine-tuning baselines of the ROME paper: FT and FT+L (constrained fine-tuning, Zhu et al., 2020).

FT minimises the new object's negative log-likelihood after the rewrite prompt
by Adam on one layer's MLP down-projection W, and stops once the loss is
below ``early_stop_loss`` (the new object then wins by far) or after
``num_steps``. FT+L does the same under the paper's constraint
``‖ΔW‖∞ ≤ ε``: after every step each element of ΔW is clamped to [−ε, ε].
Both train on the one rewrite prompt and nothing keeps other subjects
unchanged, which is the paper's point: FT generalises and spills over onto
neighbours, FT+L stays specific but hardly generalises.

What is optimised is ΔW itself, added to the layer's output by a hook
(``x ΔWᵀ``), so the model's weights are never modified; the edit carries ΔW
as a dense :class:`~editing.deltas.WeightDelta`. The loss is the mean per-token
NLL of the new object, teacher-forced (the paper's code scored every target
token at the prompt's last position; for one-token objects the two agree).

Example::

    edit = compute_ft(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"), method="ft-l")
    edit.deltas[0].delta.shape, float(abs(edit.deltas[0].delta).max())   # (576, 1536), <= ε
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from tracing.hooks import Hook, hooks, main_tensor, replace_main
from tracing.models import LoadedModel, editable_weight
from tracing.tokens import check_context, continuation_ids

from ..deltas import WeightDelta
from ..edit import Edit, EditRequest
from ..hparams import FTHyperParams, load_hparams
from ..progress import Progress
from .common import Stopwatch, check_layer, with_old_object

log = logging.getLogger(__name__)


def delta_hook(lm: LoadedModel, layer: int, delta: torch.Tensor) -> Hook:
    """A hook that makes layer ``layer``'s down-projection act as if its weight were W + ``delta`` (weight layout)."""

    def add(module, args, output):
        x = args[0]  # (rows, tokens, d_in)
        extra = x.float() @ delta if lm.spec.conv1d else F.linear(x.float(), delta)  # (rows, tokens, d_out)
        out = main_tensor(output)
        return replace_main(output, out + extra.to(out.dtype))

    return Hook(lm.module_name("down_proj", layer), add)


def _rows(lm: LoadedModel, request: EditRequest) -> tuple[list[int], list[int]]:
    """Token ids of the rewrite prompt and of the new object after it (as the scores tokenise them)."""
    head = lm.tokenizer(request.text)["input_ids"]
    tail = continuation_ids(lm.tokenizer, request.text, request.target)
    check_context(lm.max_length, len(head) + len(tail), "The prompt with its target", "Shorten the prompt or the target.")
    return head, tail


def _checked(lm: LoadedModel, request: EditRequest, method: str, layer: int | None,
             hparams: FTHyperParams | None) -> tuple[FTHyperParams, int]:
    """The hyperparameters of ``method`` and the layer, once the request (its length too) and they are known to
    fit; ValueError otherwise."""
    if method not in ("ft", "ft-l"):
        raise ValueError(f"compute_ft computes 'ft' or 'ft-l' edits, not {method!r}.")
    if not isinstance(request, EditRequest):
        raise ValueError("compute_ft needs an EditRequest(subject, prompt, target).")
    request.validate()
    hp = hparams if hparams is not None else load_hparams(lm, method=method)
    if not isinstance(hp, FTHyperParams):
        raise ValueError(f"FT takes FTHyperParams, not {type(hp).__name__}.")
    if (method == "ft-l") != (hp.norm_constraint is not None):
        raise ValueError("FT+L ('ft-l') needs a norm_constraint and FT ('ft') has none; "
                         f"these hyperparameters have norm_constraint={hp.norm_constraint}.")
    layer = hp.edit_layer(lm.n_layers) if layer is None else check_layer(lm, layer)
    _rows(lm, request)  # tokenisation and length, before any work
    return hp, layer


def _descend(nll, delta: torch.Tensor, optimiser, hp: FTHyperParams, progress: Progress | None) -> tuple[int, float, float]:
    """Adam steps on ``delta`` until the loss is under ``early_stop_loss`` (FT+L: clamped to the norm constraint).

    Returns the steps taken, p(target) before the first step and the last loss computed.
    """
    steps, prob_before, loss_value = 0, float("nan"), float("nan")
    for step in range(hp.num_steps):
        loss = nll()
        loss_value = float(loss.detach())
        if step == 0:
            prob_before = float(np.exp(-loss_value))
        if progress:
            progress("optimising", (step + 1) / hp.num_steps)
        if loss_value < hp.early_stop_loss:
            break
        (delta.grad,) = torch.autograd.grad(loss, delta)
        optimiser.step()
        steps = step + 1
        if hp.norm_constraint is not None:
            with torch.no_grad():
                delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
    return steps, prob_before, loss_value


def compute_ft(
    lm: LoadedModel,
    request: EditRequest,
    *,
    method: str = "ft",
    layer: int | None = None,
    hparams: FTHyperParams | None = None,
    progress: Progress | None = None,
) -> Edit:
    """Fine-tune one down-projection until the model completes ``request`` with its new target (FT or FT+L).

    Example::

        edit = compute_ft(lm, request, method="ft", progress=lambda stage, fraction: None)

    ``method`` is ``"ft"`` (hyperparameters without a norm constraint) or
    ``"ft-l"`` (with one); ``progress("optimising", fraction)`` is called at
    every step, then ``progress("update", 0)``. The weights are never
    modified. Raises ValueError for invalid input, before any work.
    """
    hp, layer = _checked(lm, request, method, layer, hparams)
    weight = editable_weight(lm, layer)  # on its own device; a layer offloaded by accelerate is refused

    clock = Stopwatch()
    _ = lm.fingerprint
    with torch.inference_mode(False), torch.enable_grad():
        if request.target_true is None:
            request = with_old_object(lm, request)
            clock.lap("answer")
        head, tail = _rows(lm, request)
        ids = torch.tensor([head + tail[:-1]], device=lm.device)  # (1, tokens)
        targets = torch.tensor(tail, device=lm.device)  # (target tokens,)
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=hp.lr)
        hook = delta_hook(lm, layer, delta)

        def nll() -> torch.Tensor:
            with hooks(lm.model, hook):
                logits = lm.model(ids, logits_to_keep=len(tail)).logits[0].float()  # (target tokens, vocab)
            return -torch.log_softmax(logits, -1).gather(1, targets[:, None]).mean()

        steps, prob_before, loss_value = _descend(nll, delta, optimiser, hp, progress)
        clock.lap("optimise")
        if progress:
            progress("update", 0.0)
        with torch.no_grad():
            loss_after = float(nll()) if steps else loss_value
        change = delta.detach().cpu().numpy().astype(np.float32)
    clock.lap("update")
    timings = clock.finish()
    info = {"steps": steps, "loss": loss_after, "target_prob_before": prob_before,
            "target_prob_after": float(np.exp(-loss_after)), "max_abs_delta": float(np.abs(change).max()),
            "weight_mean_abs": float(weight.detach().float().abs().mean())}
    module = lm.module_name("down_proj", layer)
    edit = Edit(request=request, layer=layer, module=module, method=method, variant="",
                deltas=(WeightDelta(module, layer, change),), model=lm.name, fingerprint=lm.fingerprint,
                timings=timings, info=info, hparams=hp.to_dict())
    log.info("%s edit %s in %.1f s (%d steps, p(target) %.3f -> %.3f)", method, edit.describe(), edit.seconds,
             steps, prob_before, info["target_prob_after"])
    return edit

"""Knowledge Neurons (Dai et al., 2022) as the ROME paper compared against it.

Dai et al. read each MLP hidden unit ("neuron") as a key whose value vector
(its column of the down-projection) is added to the residual stream when it
fires. To edit a fact they

1. **attribute**: for every neuron at the prompt's last token, integrate the
   gradient of p(old object) while the neuron's activation is scaled from 0
   to its actual value (integrated gradients, ``steps`` points), times that
   activation;
2. **select** the neurons scoring above ``adaptive_threshold`` × the top
   score (with one prompt nothing is refined across prompts, as in the ROME
   paper's runs);
3. **rewrite** each selected neuron's value vector: minus ``erase_scale`` ×
   the input embedding of the model's predicted first token, plus
   ``write_scale`` × the embeddings of the new object's tokens (the
   knowledge-neurons library's 2 and 1, which the ROME paper used).

Differences from that library, on purpose: the activation is the
down-projection's input (the coefficient of the value vector, Dai et al.'s
definition; the library hooked GPT-2's pre-GELU ``c_fc`` output); an old
object of several tokens is scored teacher-forced (the library scored every
token at the prompt's last position); the new object keeps its leading space
(" Rome", the token the model would say); and at least the top neuron is
always kept.

Speed: the scaled copies of one layer run as one batch through
:class:`~editing.methods.common.SuffixRunner`, which recomputes only the positions from
the prompt's last token on. The weights are never modified: the edit carries
the new value vectors' changes as :class:`~editing.deltas.WeightDelta` rows.

Example::

    edit = compute_kn(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"))
    edit.info["neurons"], edit.layers          # 7, (22, 25, 29)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from tracing.hooks import Hook, hooks
from tracing.models import LoadedModel, editable_weight, stored_value
from tracing.tokens import check_context, continuation_ids

from ..deltas import WeightDelta
from ..edit import Edit, EditRequest
from ..hparams import KNHyperParams, load_hparams
from ..progress import Progress
from .common import Stopwatch, SuffixRunner, check_layer, with_old_object

log = logging.getLogger(__name__)


def _activations(lm: LoadedModel, ids: list[int], position: int, layers: tuple[int, ...]):
    """Every searched layer's neuron activations at ``position`` (layer -> (d_ff,)) and the predicted next token there."""
    found: dict[int, torch.Tensor] = {}

    def grab(layer):
        def fn(module, args, output):
            found[layer] = args[0][0, position].detach().float()

        return fn

    specs = [Hook(lm.module_name("down_proj", layer), grab(layer)) for layer in layers]
    with torch.no_grad(), hooks(lm.model, *specs):
        logits = lm.model(torch.tensor([ids[: position + 1]], device=lm.device), logits_to_keep=1).logits
    return found, int(logits[0, -1].argmax())


def attribution_scores(lm: LoadedModel, runner: SuffixRunner, layer: int, activation: torch.Tensor,
                       old_ids: list[int], hp: KNHyperParams, progress=None) -> torch.Tensor:
    """Integrated-gradient attribution (d_ff,) of p(old object) to each neuron of ``layer`` at the lookup token.

    ``runner`` holds ``hp.batch_size`` copies of the prompt + old object[:-1]
    (lookup: the prompt's last token); its row r gets the activation scaled
    by the r-th point of the current chunk of ``linspace(0, 1, steps)``.
    """
    device = activation.device
    n_old = len(old_ids)
    rows = torch.arange(hp.batch_size, device=device).repeat_interleave(n_old)  # (rows * old tokens,)
    positions = torch.arange(n_old, device=device).repeat(hp.batch_size)  # suffix index t predicts old token t
    tokens = torch.tensor(old_ids, device=lm.output_device).repeat(hp.batch_size)  # where the logits are
    alphas = torch.linspace(0.0, 1.0, hp.steps, device=device)
    total = torch.zeros_like(activation)
    for chunk in alphas.split(hp.batch_size):
        scaled = (chunk[:, None] * activation[None]).requires_grad_(True)  # (batch, d_ff)

        def replace(module, args, kwargs):
            x = args[0]  # (batch, S, d_ff); suffix index 0 is the prompt's last token
            return (torch.cat([scaled[:, None].to(x.dtype), x[:, 1:]], dim=1), *args[1:]), kwargs

        hidden = runner.run(Hook(lm.module_name("down_proj", layer), replace, pre=True))
        probs = torch.softmax(runner.logits(hidden, rows, positions), dim=-1)  # (rows * old tokens, vocab)
        p_old = probs.gather(1, tokens[:, None])[:, 0].view(hp.batch_size, n_old).mean(1)  # (batch,)
        (grad,) = torch.autograd.grad(p_old.sum(), scaled)
        total += grad.sum(0).float()
        if progress:
            progress()
    return activation * total / hp.steps


def _checked(lm: LoadedModel, request: EditRequest, layer: int | None,
             hparams: KNHyperParams | None) -> tuple[KNHyperParams, tuple[int, ...]]:
    """The hyperparameters and the layers to search, once the request and they are known to fit."""
    if not isinstance(request, EditRequest):
        raise ValueError("compute_kn needs an EditRequest(subject, prompt, target).")
    request.validate()
    hp = hparams if hparams is not None else load_hparams(lm, method="kn")
    if not isinstance(hp, KNHyperParams):
        raise ValueError(f"KN takes KNHyperParams, not {type(hp).__name__}.")
    return hp, ((check_layer(lm, layer),) if layer is not None else hp.search_layers(lm.n_layers))


def _neuron_deltas(lm: LoadedModel, chosen: list, layers: Sequence[int], hp: KNHyperParams, new_ids: list[int],
                   predicted: int) -> tuple[dict[int, list[int]], tuple[WeightDelta, ...]]:
    """The chosen neurons per layer, and their value vectors' change: toward the new object, away from the old."""
    embed = stored_value(lm.model, f"{lm.spec.embed}.weight", lm.embed.weight).detach().float()  # offloaded too
    change = hp.write_scale * embed[new_ids].sum(0) - hp.erase_scale * embed[predicted]  # (d_model,)
    change = change.cpu().numpy().astype(np.float32)
    by_layer: dict[int, list[int]] = {}
    for i, neuron in chosen:
        by_layer.setdefault(layers[i], []).append(int(neuron))
    for j in by_layer:
        editable_weight(lm, j)  # the chosen neurons' layers must be in memory to be written
    deltas = tuple(
        WeightDelta(lm.module_name("down_proj", j), j, np.tile(change, (len(ns), 1)), np.array(sorted(ns), np.int64))
        for j, ns in sorted(by_layer.items()))
    return by_layer, deltas


def _attribute(lm: LoadedModel, row: list[int], lookup: int, layers: Sequence[int], old_ids: list[int],
               hp: KNHyperParams, progress: Progress | None) -> tuple[torch.Tensor, int]:
    """Every searched neuron's attribution (layers searched, d_ff), and the token the model predicts now."""
    if progress:
        progress("attributing", 0.0)
    activations, predicted = _activations(lm, row, lookup, layers)
    runner = SuffixRunner(lm, [row] * hp.batch_size, [lookup] * hp.batch_size, layers[0])
    chunks, done = len(layers) * (hp.steps // hp.batch_size), 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress("attributing", done / chunks)

    scores = torch.stack([attribution_scores(lm, runner, j, activations[j], old_ids, hp, tick).to(lm.device)
                          for j in layers])  # each layer's scores come from its own device
    return scores, predicted


def compute_kn(
    lm: LoadedModel,
    request: EditRequest,
    *,
    layer: int | None = None,
    hparams: KNHyperParams | None = None,
    progress: Progress | None = None,
) -> Edit:
    """Find the knowledge neurons of the old fact and rewrite their value vectors toward the new object.

    Example::

        edit = compute_kn(lm, request, progress=lambda stage, fraction: None)

    ``layer`` restricts the search to one layer (default: the
    hyperparameters' layers, every layer in the paper). ``progress`` is
    called with ``"attributing"`` after every batch of scaled copies, then
    ``"update"``. The weights are never modified. Raises ValueError for
    invalid input, before any work.
    """
    hp, layers = _checked(lm, request, layer, hparams)
    head = lm.tokenizer(request.text)["input_ids"]
    new_ids = continuation_ids(lm.tokenizer, request.text, request.target)
    check_context(lm.max_length, len(head) + len(new_ids), "The prompt with its target", "Shorten the prompt or the target.")

    clock = Stopwatch()
    _ = lm.fingerprint
    with torch.inference_mode(False), torch.enable_grad():
        if request.target_true is None:
            request = with_old_object(lm, request)
            clock.lap("answer")
        if request.target_true is None:
            raise ValueError("The model gives no answer to the rewrite prompt; enter the old object yourself.")
        old_ids = continuation_ids(lm.tokenizer, request.text, request.target_true)
        check_context(lm.max_length, len(head) + len(old_ids), "The prompt with its old object", "Shorten the prompt.")
        row = head + old_ids[:-1]
        lookup = len(head) - 1
        scores, predicted = _attribute(lm, row, lookup, layers, old_ids, hp, progress)  # (layers searched, d_ff)
        clock.lap("attribute")
        if progress:
            progress("update", 0.0)
        top = float(scores.max())
        threshold = hp.adaptive_threshold * top
        chosen = (scores > threshold).nonzero().tolist()  # [[layer index, neuron], ...]
        if not chosen:  # no positive attribution at all: keep the top neuron
            chosen = [list(np.unravel_index(int(scores.argmax()), tuple(scores.shape)))]
        by_layer, deltas = _neuron_deltas(lm, chosen, layers, hp, new_ids, predicted)
        flat = int(scores.argmax())
        main = layers[flat // scores.shape[1]]
    clock.lap("update")
    timings = clock.finish()
    info = {"neurons": len(chosen), "neurons_by_layer": {str(j): len(ns) for j, ns in sorted(by_layer.items())},
            "top_score": top, "threshold": threshold, "top_neuron": [main, flat % scores.shape[1]],
            "erased_token": lm.tokenizer.decode([predicted]), "erased_token_id": predicted,
            "layers_searched": len(layers)}
    edit = Edit(request=request, layer=main, module=lm.module_name("down_proj", main), method="kn", variant="",
                deltas=deltas, model=lm.name, fingerprint=lm.fingerprint, timings=timings, info=info,
                hparams=hp.to_dict())
    log.info("KN edit %s in %.1f s", edit.describe(), edit.seconds)
    return edit

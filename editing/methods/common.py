"""What every editor uses: a stopwatch, the old object, layer checks, token rows, the suffix runner.

The editors (:mod:`editing.methods.rome`, :mod:`~editing.methods.memit`,
:mod:`~editing.methods.ft`, :mod:`~editing.methods.kn`) import from here and
never from each other (the progress callback they take is
:data:`editing.progress.Progress`):

* :class:`Stopwatch`: seconds per stage of one computation (``Edit.timings``);
* :func:`model_answer`, :func:`with_old_object`, :func:`with_old_objects`: a
  request's old object, when missing, is the model's own short answer;
* :func:`check_layer`: a layer number the model has, or a ValueError;
* :func:`fill_subject`, :func:`locate_subject`, :func:`build_rows`
  (:class:`Rows`): the token rows of templated prompts and where their
  subject ends;
* :class:`SuffixRunner`: blocks ``layer``..L-1 over the positions from each
  row's lookup token on, the earlier positions cached (ROME's and MEMIT's
  optimisation, KN's attribution).

Example::

    request = with_old_object(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"))
    rows = build_rows(lm, request, ["{}"], "{} is a")
    runner = SuffixRunner(lm, rows.ids, rows.lookups, check_layer(lm, 3))
    hidden = runner.run()                     # (rows, S, d_model)
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tracing.blocks import BlockCall, PrefixCache, record_calls
from tracing.hooks import Hook, StopForward, hooks, main_tensor, until_stopped
from tracing.models import LoadedModel, returned_cache, with_cache
from tracing.tokens import check_context, continuation_ids, encode_prompt

from ..edit import EditRequest
from ..sampling import decode, pad_id


class Stopwatch:
    """Seconds per stage of one computation; the stages add up to the total (``other`` takes the rest).

    Example::

        clock = Stopwatch(); ...; clock.lap("optimise"); ...; timings = clock.finish()

    A stage lapped twice (a retry) adds to its time.
    """

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._clock, 4)
        self._clock = now

    def finish(self) -> dict[str, float]:
        total = time.perf_counter() - self._start
        self.timings["other"] = round(max(0.0, total - sum(self.timings.values())), 4)
        return dict(self.timings)


# ---------------------------------------------------------------------------
# The old object and the layer


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


def with_old_object(lm: LoadedModel, request: EditRequest) -> EditRequest:
    """``request`` with ``target_true`` set to the model's own short answer when it is missing."""
    if request.target_true is not None:
        return request
    return EditRequest(request.subject, request.prompt, request.target, model_answer(lm, request.text) or None)


def with_old_objects(lm: LoadedModel, requests: Sequence[EditRequest]) -> tuple[EditRequest, ...]:
    """The requests with ``target_true`` set to the model's own short answer where it is missing."""
    return tuple(with_old_object(lm, r) for r in requests)


# ---------------------------------------------------------------------------
# The rows the optimisation runs


@dataclass(frozen=True)
class Rows:
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


def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """The template with the subject in its ``{}``, and the subject's character offset."""
    before, _, after = template.partition("{}")
    return before + subject + after, len(before)


def locate_subject(lm: LoadedModel, text: str, subject: str, char_start: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the last token of the subject that starts at ``char_start``."""
    occurrence = sum(1 for i in range(char_start) if text.startswith(subject, i))
    enc = encode_prompt(lm.tokenizer, text, subject, occurrence=occurrence, max_length=lm.max_length)
    return list(enc.ids), enc.last_subject_token


def build_rows(lm: LoadedModel, request: EditRequest, templates: Sequence[str], kl_prompt: str) -> Rows:
    """Tokenise the templated rewrite prompts and the KL prompt (see :class:`Rows`)."""
    subject = request.subject.strip()
    prompt_text = request.text
    targets = continuation_ids(lm.tokenizer, prompt_text, request.target)
    ids, lookups, target_at = [], [], []
    for template in templates:
        full_template = template.replace("{}", request.prompt, 1)  # context + relation, {} = subject
        text, start = fill_subject(full_template, subject)
        row, lookup = locate_subject(lm, text, subject, start)
        first = len(row) - 1  # the prompt's last position predicts the first target token
        ids.append(tuple(row + targets[:-1]))
        lookups.append(lookup)
        target_at.append(tuple(first + t for t in range(len(targets))))
    kl_text, kl_start = fill_subject(kl_prompt, subject)
    kl_row, kl_lookup = locate_subject(lm, kl_text, subject, kl_start)
    ids.append(tuple(kl_row))
    lookups.append(kl_lookup)
    check_context(lm.max_length, max(len(r) for r in ids), "The prompt with its context and target",
                  "Shorten the prompt or the target.")
    return Rows(ids=tuple(ids), lookups=tuple(lookups), targets=tuple(targets), target_at=tuple(target_at),
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


def _left_padded_prefixes(cache, n_layers: int, lookups: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values before each row's lookup token, left-padded to the longest prefix."""
    n, prefix_len = len(lookups), max(lookups)
    out = []
    for j in range(n_layers):
        k, v = _layer_kv(cache, j)  # (n, kv_heads, T, head_dim)
        pk = k.new_zeros(n, k.shape[1], prefix_len, k.shape[3])  # (n, kv_heads, P, head_dim)
        pv = v.new_zeros(n, v.shape[1], prefix_len, v.shape[3])
        for r, lk in enumerate(lookups):
            if lk:
                pk[r, :, prefix_len - lk :] = k[r, :, :lk]
                pv[r, :, prefix_len - lk :] = v[r, :, :lk]
        out.append((pk, pv))
    return out


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
        pad = pad_id(lm.tokenizer)
        ids = torch.full((n, max(lengths)), pad, dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, device=device)
        block_in: list[torch.Tensor] = []

        def grab_input(module, args, kwargs):
            block_in.append(args[0] if args else kwargs["hidden_states"])

        with torch.no_grad(), hooks(lm.model, Hook(lm.module_name("hidden", layer), grab_input, pre=True)):
            cache = returned_cache(lm.model(ids, use_cache=True, logits_to_keep=1))  # right padding: causal = exact

        self.width = width = max(n_tok - lk for n_tok, lk in zip(lengths, lookups))  # S
        full_prefix = _left_padded_prefixes(cache, lm.n_layers, lookups)
        del cache
        self.prefix = {j: full_prefix[j] for j in range(layer, lm.n_layers)}
        # Block `layer`'s input at each row's suffix positions (clamped into the padded row beyond its end).
        at = block_in[0].device  # the block's input: on the device before it, when the model is sharded
        gather = torch.tensor(lookups, device=at)[:, None] + torch.arange(width, device=at)
        gather = gather.clamp(max=ids.shape[1] - 1)
        self.hidden_in = block_in[0].gather(1, gather[:, :, None].expand(-1, -1, block_in[0].shape[-1])).detach()
        self.calls = self._block_calls(rows, lookups, pad, full_prefix)
        self.lengths = [n_tok - lk for n_tok, lk in zip(lengths, lookups)]

    def _block_calls(self, rows: Sequence[Sequence[int]], lookups: Sequence[int], pad: int,
                     full_prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, BlockCall]:
        """What blocks ``layer``.. receive on the suffixes (positions, masks), from one pass with the prefix cache."""
        lm, layer, width, device = self.lm, self.layer, self.width, self.lm.device
        n, prefix_len = len(rows), max(lookups)
        suffix = torch.full((n, width), pad, dtype=torch.long, device=device)
        for r, (row, lk) in enumerate(zip(rows, lookups)):
            suffix[r, : len(row) - lk] = torch.tensor(row[lk:], device=device)
        mask = torch.ones((n, prefix_len + width), dtype=torch.long, device=device)
        for r, lk in enumerate(lookups):
            mask[r, : prefix_len - lk] = 0
        positions = torch.tensor(lookups, device=device)[:, None] + torch.arange(width, device=device)
        uniform = _uniform_layers(lm)
        specs, calls, _ = record_calls(lm, 0 if uniform else layer)
        if uniform:  # block 0's arguments are every block's: stop right after recording them
            specs.append(Hook(lm.module_name("hidden", 0), _stop, pre=True))
        kwargs = {}
        if prefix_len > 0:
            from transformers import DynamicCache  # here: `import editing` does not load transformers

            data = full_prefix if uniform else [(k.clone(), v.clone()) for k, v in full_prefix]  # stopped: unchanged
            kwargs = dict(attention_mask=mask, use_cache=True, **with_cache(lm.model, DynamicCache(ddp_cache_data=data)))
        with torch.no_grad(), hooks(lm.model, *specs):
            until_stopped(lm.model, suffix, position_ids=positions, logits_to_keep=1, **kwargs)
        return {j: calls[0] if uniform else calls[j] for j in range(layer, lm.n_layers)}

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
        """Float32 logits (picked, vocab) at suffix ``positions`` of ``rows`` only, on the unembedding's device."""
        picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]  # (picked, d_model)
        return self.lm.unembed(self.lm.final_norm(picked)).float()


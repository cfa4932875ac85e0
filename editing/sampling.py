"""Batched text generation with a key-value cache: greedy or seeded sampling.

One decoding loop serves three callers: :func:`generate` (before/after
continuations in the app and the CLIs), the context templates of an edit
(:mod:`editing.templates`) and the sampled statistics corpus
(:mod:`editing.stats`). Prompts of different lengths are left-padded with an
attention mask and explicit positions, so every row sees exactly its own text.
Randomness only comes from the ``torch.Generator`` passed in.

Example::

    generate(lm, ["The Eiffel Tower is located in", "Paris is the capital of"], max_new_tokens=10)
    # [' the heart of Paris, France. It is', ' France. ...']
    decode(lm, [[0]] * 4, 8, generator=torch.Generator().manual_seed(1), top_k=5)   # 4 lists of 8 token ids
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from tracing.models import LoadedModel, returned_cache, with_cache
from tracing.tokens import check_context

log = logging.getLogger(__name__)


def pad_id(tokenizer) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS, else UNK, else 0.

    Right-padded causal rows never read their padding; left-padded rows mask it.
    """
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def start_token_id(tokenizer) -> int:
    """The token that starts a fresh document: ``<|endoftext|>`` if the vocabulary has it, else BOS, else EOS."""
    vocab_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(vocab_id, int) and vocab_id != getattr(tokenizer, "unk_token_id", None):
        return vocab_id
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("The tokenizer has no <|endoftext|>, BOS or EOS token to start sampling from.")


def _choose(logits: torch.Tensor, generator: torch.Generator | None, top_k: int, temperature: float) -> torch.Tensor:
    """Next token per row from last-position logits (rows, vocab): argmax, or a seeded (top-k) sample."""
    if generator is None:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)  # (rows, k)
        probs = values.softmax(-1)
        pick = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(logits.device)
        return indices.gather(-1, pick)[:, 0]
    probs = logits.softmax(-1)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(logits.device)


def decode(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    temperature: float = 1.0,
    stop_ids: Sequence[int] = (),
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens; greedy unless a generator is given.

    Returns the new token ids per row, each cut after the first of ``stop_ids``
    (which is kept). ``on_step(step, max_new_tokens)`` reports progress.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token.")
    device = lm.device
    rows, width = len(prompts), max(len(p) for p in prompts)
    pad = pad_id(lm.tokenizer)
    ids = torch.full((rows, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[r, width - len(p):] = 1
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (rows, width)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out = torch.empty((rows, 0), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos = ids, positions
    with torch.inference_mode():
        for step in range(max_new_tokens):
            kwargs = {"attention_mask": mask} if padded else {}
            result = lm.model(
                step_ids, position_ids=step_pos, use_cache=True, logits_to_keep=1, **with_cache(lm.model, past), **kwargs
            )
            past = returned_cache(result)
            nxt = _choose(result.logits[:, -1], generator, top_k, temperature)  # (rows,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, stops)
            if on_step:
                on_step(step + 1, max_new_tokens)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
    result_ids = []
    for r in range(rows):
        row = out[r].tolist()
        stop_at = next((i for i, t in enumerate(row) if t in set(stop_ids)), None)
        result_ids.append(row[: stop_at + 1] if stop_at is not None else row)
    return result_ids


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    sample: bool = False,
    seed: int = 0,
    *,
    top_k: int = 0,
    temperature: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Continuations (new text only) of each prompt: greedy, or seeded sampling with ``sample=True``.

    Example::

        generate(lm, ["The Eiffel Tower is located in the city of"], max_new_tokens=5)   # [' Paris, France.']
        with applied(lm, [edit]):
            generate(lm, ["The Eiffel Tower is located in the city of"], max_new_tokens=5)   # [' Rome, Italy.']

    Generation stops early for a row at the tokenizer's EOS token. The same
    ``seed`` gives the same samples for the same model and prompts.
    ``progress(step, max_new_tokens)`` is called after every decoding step.
    """
    if isinstance(prompts, str):
        raise ValueError("generate() takes a list of prompts; wrap a single prompt in a list.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    encoded = []
    for prompt in prompts:
        if not prompt or not prompt.strip():
            raise ValueError("A generation prompt is empty; remove it or enter some text.")
        ids = lm.tokenizer(prompt)["input_ids"]
        check_context(lm.max_length, len(ids) + max_new_tokens, f"The prompt {prompt[:40]!r} with {max_new_tokens} new tokens",
                      "Shorten it or ask for fewer tokens.")
        encoded.append(ids)
    if not encoded:
        return []
    generator = torch.Generator(device=lm.device).manual_seed(int(seed)) if sample else None
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    new_ids = decode(
        lm, encoded, max_new_tokens, generator=generator, top_k=top_k, temperature=temperature,
        stop_ids=[eos] if isinstance(eos, int) else [], on_step=progress,
    )
    return [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]

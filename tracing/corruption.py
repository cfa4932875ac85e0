"""Corrupting the subject: noise on its token embeddings, or another subject.

The paper adds Gaussian noise ε ~ N(0, ν²) to the embeddings of the subject's
tokens, with ν three times the standard deviation of the model's token
embeddings over the subjects of the known-facts set. :func:`noise_scale`
computes that figure once per model and caches it on disk.

Example::

    corrupt = make_corruption(lm, enc, TraceConfig(samples=10, seed=1))
    corrupt.embeddings(clean_embeddings)   # (10, tokens, d_model), subject rows changed
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .assets import known_facts
from .models import LoadedModel, cache_dir, read_json_cache, write_json_cache
from .result import TraceConfig
from .tokens import EncodedPrompt, encode_prompt

log = logging.getLogger(__name__)

_STD_CACHE: dict[str, float] = {}


def embedding_std(lm: LoadedModel) -> float:
    """Standard deviation of the token embeddings of all known-fact subjects (cached per model)."""
    key = lm.fingerprint
    if key in _STD_CACHE:
        return _STD_CACHE[key]
    path = cache_dir() / "noise" / f"{key}.json"
    cached = read_json_cache(path)
    if cached and "embedding_std" in cached:
        _STD_CACHE[key] = float(cached["embedding_std"])
        return _STD_CACHE[key]
    subjects = sorted({fact["subject"] for fact in known_facts()})
    ids = [i for s in subjects for i in lm.tokenizer(s, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        emb = lm.embed(torch.tensor(ids, device=lm.device)).float()  # (all subject tokens, d_model)
    std = float(emb.std())
    _STD_CACHE[key] = std
    write_json_cache(path, {"model": lm.name, "embedding_std": std, "subjects": len(subjects)})
    log.info("Embedding std over %d subjects of %s: %.5f", len(subjects), lm.name, std)
    return std


def noise_scale(lm: LoadedModel, config: TraceConfig) -> float:
    """The absolute noise scale ν: config.noise_scale, else config.noise × the embedding std."""
    if config.noise_scale is not None:
        return float(config.noise_scale)
    return float(config.noise) * embedding_std(lm)


@dataclass(frozen=True, eq=False)
class Corruption:
    """What replaces the subject's embeddings in each corrupted copy.

    ``delta`` (additive noise) or ``replacement`` (embeddings that replace the
    subject's), each of shape (copies, subject tokens, d_model), on the CPU in
    fp32 so that a seed gives the same numbers on every device.
    """

    start: int
    end: int
    delta: torch.Tensor | None = None
    replacement: torch.Tensor | None = None
    scale: float = 0.0
    replacement_subjects: tuple[str, ...] = ()

    @property
    def copies(self) -> int:
        return (self.delta if self.delta is not None else self.replacement).shape[0]

    def embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """Corrupt token embeddings (copies, tokens, d_model) in place and return them."""
        rows = emb[:, self.start : self.end]
        if self.delta is not None:
            rows += self.delta.to(device=emb.device, dtype=emb.dtype)
        else:
            rows.copy_(self.replacement.to(device=emb.device, dtype=emb.dtype))
        return emb


def _replacement_ids(lm: LoadedModel, enc: EncodedPrompt, subject: str, other: str) -> list[int] | None:
    """Token ids of ``other`` in place of ``subject`` if it has the same token count in context."""
    start = enc.text.find(subject)
    swapped = enc.text[:start] + other + enc.text[start + len(subject):]
    try:
        new = encode_prompt(lm.tokenizer, swapped, other)
    except ValueError:
        return None
    if len(new) != len(enc) or new.subject_range != enc.subject_range:
        return None
    return list(new.ids[new.subject_start : new.subject_end])


def make_corruption(lm: LoadedModel, enc: EncodedPrompt, subject: str, config: TraceConfig) -> Corruption:
    """Draw the corruption of every copy from a generator seeded with ``config.seed``."""
    n_tok = enc.subject_end - enc.subject_start
    d_model = lm.embed.weight.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    if config.corruption in ("gaussian", "uniform"):
        scale = noise_scale(lm, config)
        if config.corruption == "gaussian":
            delta = torch.randn(config.samples, n_tok, d_model, generator=gen) * scale
        else:
            delta = (torch.rand(config.samples, n_tok, d_model, generator=gen) * 2 - 1) * scale
        return Corruption(enc.subject_start, enc.subject_end, delta=delta, scale=scale)

    if config.replacement:
        ids = _replacement_ids(lm, enc, subject, config.replacement.strip())
        if ids is None:
            raise ValueError(
                f"The replacement subject {config.replacement!r} must have the same number of tokens as "
                f"{subject!r} ({n_tok}) in this prompt; choose another replacement."
            )
        chosen = [(config.replacement.strip(), ids)]
    else:
        candidates = sorted({fact["subject"] for fact in known_facts()} - {subject})
        order = torch.randperm(len(candidates), generator=gen).tolist()
        chosen = []
        for index in order:
            ids = _replacement_ids(lm, enc, subject, candidates[index])
            if ids is not None:
                chosen.append((candidates[index], ids))
            if len(chosen) == config.samples:
                break
        if not chosen:
            raise ValueError(f"No known subject has {n_tok} tokens like {subject!r}; pass a replacement subject.")
    with torch.no_grad():
        ids = torch.tensor([c[1] for c in chosen], device=lm.device)
        replacement = lm.embed(ids).float().cpu()  # (copies, subject tokens, d_model)
    return Corruption(
        enc.subject_start, enc.subject_end, replacement=replacement,
        replacement_subjects=tuple(c[0] for c in chosen),
    )

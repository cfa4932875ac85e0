"""Context templates: short texts sampled from the model, put in front of the edit prompt.

ROME optimises v* and averages the key k* over the bare prompt and the same
prompt after a few short random texts, so that the edit holds in varied
contexts. The texts are sampled from the model itself (top-k, seeded) starting
from a fresh document, once per model and setting, and cached on disk.

Example::

    context_templates(lm, ((5, 10), (10, 10)))
    # ('{}', 'The first step is. {}', ..., 'In this article, we will explore how to. {}')   21 templates
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata

import torch

from tracing.models import LoadedModel, cache_dir, read_json_cache, write_json_cache

from .applying import original_weights
from .sampling import decode, start_token_id

log = logging.getLogger(__name__)

_MEMORY: dict[tuple, tuple[str, ...]] = {}


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("{", " ").replace("}", " ")
    return " ".join(text.split())


def context_templates(
    lm: LoadedModel, lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10)), *, top_k: int = 5, seed: int = 0
) -> tuple[str, ...]:
    """The bare template ``"{}"`` followed by ``count`` sampled texts of ``tokens`` tokens per (tokens, count) pair.

    Each sampled template is ``"<text>. {}"``. Cached in memory and on disk
    by (model fingerprint, lengths, top_k, seed), and always sampled from the
    unedited weights (:func:`editing.applying.original_weights`), so an edit
    applied while the cache is cold never leaks into it.
    """
    lengths = tuple((int(n), int(c)) for n, c in lengths)
    key = (lm.fingerprint, lengths, int(top_k), int(seed))
    if key in _MEMORY:
        return _MEMORY[key]
    digest = hashlib.sha256(json.dumps([lengths, top_k, seed]).encode()).hexdigest()[:12]
    path = cache_dir() / "templates" / f"{lm.fingerprint}-{digest}.json"
    cached = read_json_cache(path)
    if cached and isinstance(cached.get("templates"), list) and cached["templates"][:1] == ["{}"]:
        templates = tuple(cached["templates"])
    else:
        generator = torch.Generator(device=lm.device).manual_seed(int(seed))
        start = start_token_id(lm.tokenizer)
        templates = ["{}"]
        with original_weights(lm):  # sampled from the model's own weights, even while edits are applied
            for tokens, count in lengths:
                if count == 0:
                    continue
                rows = decode(lm, [[start]] * count, tokens, generator=generator, top_k=top_k)
                for ids in rows:
                    text = _clean(lm.tokenizer.decode(ids, skip_special_tokens=True))
                    templates.append(f"{text}. {{}}" if text else "{}")
        templates = tuple(templates)
        write_json_cache(path, {"model": lm.name, "lengths": lengths, "top_k": top_k, "seed": seed,
                                "templates": list(templates)})
        log.info("Sampled %d context templates for %s", len(templates) - 1, lm.name)
    _MEMORY[key] = templates
    return templates

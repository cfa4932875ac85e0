"""Which facts a model recalls: batched next-token probabilities of known answers.

Example::

    from tracing.recall import answer_probabilities, recalled_facts
    probs, top = answer_probabilities(lm, ["The capital of Egypt is"], ["Cairo"])
    facts = recalled_facts(lm)      # the paper's known facts whose answer is the model's top next token

A fact counts as recalled, as in the paper's filter, when the first token of
its attribute is the model's top next-token prediction after its prompt.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch

from .assets import known_facts
from .models import LoadedModel
from .tokens import continuation_ids


def equal_length_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``ids`` grouped into batches of equal token length (no padding, so batched = single runs)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(ids):
        by_length[len(row)].append(i)
    return [group[s : s + batch_size] for group in by_length.values() for s in range(0, len(group), batch_size)]


def answer_probabilities(
    lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> tuple[list[float], list[bool]]:
    """p(first token of each answer | its prompt) and whether that token is the model's top prediction.

    Example::

        probs, top = answer_probabilities(lm, ["The capital of Egypt is"], ["Cairo"])

    Prompts of equal token length are batched together (no padding, so the
    numbers equal single-prompt runs). Returns two lists of length len(prompts).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt.")
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    targets = [continuation_ids(lm.tokenizer, p, a)[0] for p, a in zip(prompts, answers)]
    probs, top = [0.0] * len(prompts), [False] * len(prompts)
    with torch.inference_mode():
        for chunk in equal_length_batches(ids, batch_size):
            logits = lm.model(torch.tensor([ids[i] for i in chunk], device=lm.device)).logits[:, -1].float()
            p, best = logits.softmax(-1), logits.argmax(-1)  # (rows, vocab), (rows,)
            for row, i in enumerate(chunk):
                probs[i] = float(p[row, targets[i]])
                top[i] = int(best[row]) == targets[i]
    return probs, top


def recalled_facts(lm: LoadedModel, facts: Iterable[dict] | None = None, *, one_per_subject: bool = True) -> list[dict]:
    """The facts whose answer is the model's top next token, relations taking turns in ``known_id`` order.

    Example::

        facts = recalled_facts(lm)          # about 280 of the paper's 1,209 on the default model
        first_50 = facts[:50]               # every relation is represented early in the list

    Facts whose prompt holds the subject more than once are left out (the
    subject to corrupt would be ambiguous); with ``one_per_subject`` only a
    subject's first recalled fact is kept. The order interleaves relations
    (each round takes every relation's next fact in ``known_id`` order), so any prefix of the list is a fair sample across relations.
    """
    facts = [f for f in (known_facts() if facts is None else facts) if f["prompt"].count(f["subject"]) == 1]
    if not facts:
        return []
    _, top = answer_probabilities(lm, [f["prompt"] for f in facts], [f["attribute"] for f in facts])
    by_relation: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for fact, ok in sorted(zip(facts, top), key=lambda ft: ft[0].get("known_id", 0)):
        if ok and not (one_per_subject and fact["subject"] in seen):
            seen.add(fact["subject"])
            by_relation.setdefault(fact.get("relation_id", ""), []).append(fact)
    queues = [list(q) for q in by_relation.values()]
    chosen: list[dict] = []
    while any(queues):  # a round: each relation's next fact, in order of those facts' known_id
        queues = sorted((q for q in queues if q), key=lambda q: q[0].get("known_id", 0))
        chosen.extend(q.pop(0) for q in queues)
    return chosen

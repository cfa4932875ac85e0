"""Build a CounterFact-style evaluation set from the paper's known facts, for one model.

CounterFact (Meng et al., 2022) pairs each counterfactual edit with
paraphrases of its prompt and with "neighbourhood" prompts about other
subjects that share the true object. This module builds such records from
``known_1000.json`` (shipped as ``assets/known_facts.json``) for the facts the
given model actually knows:

* a fact is *known* when greedy decoding after its prompt gives every token
  of its attribute;
* the rewrite prompt is its prompt with the subject replaced by ``{}``; the new
  object is another object of the same relation (seeded choice);
* paraphrases are the relation's other templates (the records' ``template``
  field: the canonical wordings, without the extensions some prompts carry)
  with this subject;
* neighbours are the prompts of other known facts with the same relation and
  the same object, so the model should still say the old object after the
  edit.

Records use the CounterFact field names, so ``python -m editing.evaluate``
reads this file and the original ``counterfact.json`` alike.

:func:`split_cases` divides a set once, by subject, into a tuning part and a
held-out part (seeded, so the same command gives the same split): settings are
chosen on the first and reported on the second.

Example::

    python -m editing.cases --out assets/counterfact_smollm2.json --n 60
    python -m editing.cases --out assets/counterfact_smollm2_all.json --n 0 \
        --split assets/counterfact_smollm2_tune.json assets/counterfact_smollm2_heldout.json
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tracing.assets import KNOWN_FACTS, known_facts
from tracing.models import LoadedModel

from ..scores import continuation_stats

log = logging.getLogger(__name__)

DEFAULT_FACTS = KNOWN_FACTS


def read_facts(path: str | Path = DEFAULT_FACTS) -> list[dict]:
    """Known-fact records (subject, attribute, prompt, relation_id, known_id); see :func:`tracing.assets.known_facts`."""
    return list(known_facts(path))


def known_facts_of(lm: LoadedModel, facts: Sequence[dict]) -> list[dict]:
    """The facts whose whole attribute the model produces greedily after the prompt."""
    _, greedy = continuation_stats(lm, [(f["prompt"], f["attribute"]) for f in facts])
    return [f for f, ok in zip(facts, greedy) if ok]


def _template(fact: dict) -> str:
    return fact["prompt"].replace(fact["subject"], "{}", 1)


def _relations(facts: Sequence[dict]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per relation: its wordings with one ``{}`` (paraphrase templates) and its objects, in order of appearance."""
    templates: dict[str, list[str]] = defaultdict(list)
    objects: dict[str, list[str]] = defaultdict(list)
    for fact in facts:
        rel = fact["relation_id"]
        wording = fact.get("template") or _template(fact)
        if wording.count("{}") == 1 and wording not in templates[rel]:
            templates[rel].append(wording)
        if fact["attribute"] not in objects[rel]:
            objects[rel].append(fact["attribute"])
    return templates, objects


def build_cases(lm: LoadedModel, facts: Sequence[dict], n: int = 60, *, seed: int = 0,
                paraphrases: int = 2, neighbours: int = 5) -> list[dict]:
    """CounterFact-style records for up to ``n`` facts the model knows, spread over relations."""
    rng = random.Random(seed)
    known = known_facts_of(lm, facts)
    log.info("%s knows %d of %d facts", lm.name, len(known), len(facts))
    templates, objects = _relations(facts)
    by_object: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for fact in known:
        by_object[(fact["relation_id"], fact["attribute"])].append(fact)

    candidates: dict[str, list[dict]] = defaultdict(list)
    for fact in known:
        rel, own = fact["relation_id"], _template(fact)
        others = [t for t in templates[rel] if t != own and t != fact.get("template")]
        peers = [f for f in by_object[(rel, fact["attribute"])] if f["subject"] != fact["subject"]]
        new_objects = [o for o in objects[rel] if o.strip().lower() != fact["attribute"].strip().lower()]
        if others and peers and new_objects:
            candidates[rel].append(fact)
    for rel in candidates:
        rng.shuffle(candidates[rel])
    relations = sorted(candidates)
    rng.shuffle(relations)

    cases: list[dict] = []
    while len(cases) < n and any(candidates[r] for r in relations):
        for rel in relations:
            if len(cases) >= n or not candidates[rel]:
                continue
            fact = candidates[rel].pop()
            subject, own = fact["subject"], _template(fact)
            others = [t for t in templates[rel] if t != own and t != fact.get("template")]
            chosen = rng.sample(others, min(paraphrases, len(others)))
            peers = [f for f in by_object[(rel, fact["attribute"])] if f["subject"] != subject]
            peers = rng.sample(peers, min(neighbours, len(peers)))
            new_object = rng.choice([o for o in objects[rel] if o.strip().lower() != fact["attribute"].strip().lower()])
            cases.append({
                "case_id": len(cases),
                "known_id": fact.get("known_id"),
                "requested_rewrite": {
                    "prompt": own,
                    "relation_id": rel,
                    "subject": subject,
                    "target_new": {"str": new_object},
                    "target_true": {"str": fact["attribute"]},
                },
                "paraphrase_prompts": [t.replace("{}", subject, 1) for t in chosen],
                "neighborhood_prompts": [p["prompt"] for p in peers],
                "generation_prompts": [own.replace("{}", subject, 1), f"{subject} is"],
            })
    if len(cases) < n:
        log.warning("Only %d cases could be built (asked for %d)", len(cases), n)
    return cases


def split_cases(cases: Sequence[dict], tune_fraction: float = 0.5, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split cases by subject into (tuning, held-out): no subject is in both; seeded and order-independent.

    The distinct subjects are sorted, shuffled by ``random.Random(seed)`` and
    the first ``round(tune_fraction × subjects)`` go to the tuning part; each
    part keeps the cases' original order.
    """
    if not 0.0 < tune_fraction < 1.0:
        raise ValueError(f"tune_fraction must lie strictly between 0 and 1, not {tune_fraction}.")
    subjects = sorted({c["requested_rewrite"]["subject"] for c in cases})
    random.Random(seed).shuffle(subjects)
    tuning = set(subjects[: round(tune_fraction * len(subjects))])
    tune = [c for c in cases if c["requested_rewrite"]["subject"] in tuning]
    held = [c for c in cases if c["requested_rewrite"]["subject"] not in tuning]
    return tune, held

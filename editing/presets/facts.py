"""Preset facts a model actually knows, each with a counterfactual to write in its place.

A class should be able to click through the demo without typing, so the app
ships a dozen facts from the paper's known-facts set that the loaded model
predicts correctly, each with what an edit needs: the rewrite prompt (the
prompt with ``{}`` for the subject), a counterfactual object from the same
relation, two paraphrases (other prompts of the relation about the same
subject, ranked by how confidently the model answers them) and two
neighbourhood prompts (other subjects of the relation with the same object,
which an edit should leave alone).

Example::

    lm = load_model()
    presets = find_presets(lm, n=12)
    presets[0].prompt, presets[0].attribute, presets[0].counterfactual
    save_presets(presets, lm, "assets/presets.json")

or from a shell: ``python -m editing.presets --out assets/presets.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tracing.assets import PRESETS, known_facts
from tracing.models import LoadedModel
from tracing.recall import answer_probabilities, equal_length_batches
from tracing.result import TraceConfig
from tracing.tokens import continuation_ids, encode_prompt
from tracing.trace import trace

log = logging.getLogger(__name__)

PRESETS_PATH = PRESETS
# Left out of presets meant for a classroom (an editorial choice): counterfactual religions of real
# people, and subjects best not turned into a game.
CLASSROOM_EXCLUDED = ("P140",)
CLASSROOM_EXCLUDED_SUBJECTS = frozenset({"Joseph Goebbels", "Adolf Hitler", "Heinrich Himmler", "Hermann Göring"})


@dataclass(frozen=True)
class Preset:
    """One known fact with a counterfactual edit and its test prompts."""

    known_id: int  # index in the paper's known_1000.json
    relation_id: str  # Wikidata relation, e.g. "P36" (capital)
    subject: str
    prompt: str  # the traced prompt, e.g. "The capital of Egypt is"
    attribute: str  # the true object, e.g. "Cairo"
    probability: float  # the model's p(first token of attribute | prompt)
    corrupted: float  # the same with the subject's embeddings noised (the trace's low score, paper settings)
    rewrite_prompt: str  # prompt with "{}" for the subject
    counterfactual: str  # the new object to write, from the same relation
    paraphrases: tuple[str, ...]  # other prompts of the relation about the subject (complete sentences)
    neighbours: tuple[str, ...]  # prompts about other subjects with the same true object

    @property
    def label(self) -> str:
        """A short name for menus: "Egypt: Cairo → Rome"."""
        return f"{self.subject}: {self.attribute} → {self.counterfactual}"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["paraphrases"], out["neighbours"] = list(self.paraphrases), list(self.neighbours)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Preset":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        missing = known - set(data)
        if unknown or missing:
            raise ValueError(
                f"Malformed preset: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}. "
                "Regenerate the file with: python -m editing.presets"
            )
        data = dict(data)
        data["paraphrases"], data["neighbours"] = tuple(data["paraphrases"]), tuple(data["neighbours"])
        return cls(**data)


@dataclass(frozen=True)
class PresetFile:
    """The presets and the model they were chosen for."""

    model: str
    fingerprint: str
    presets: tuple[Preset, ...]


def _relation_prompt(fact: dict) -> str:
    """The fact's prompt with ``{}`` where its subject is (first occurrence)."""
    return fact["prompt"].replace(fact["subject"], "{}", 1)


def subject_familiarity(lm: LoadedModel, facts: Sequence[dict], batch_size: int = 32) -> list[float]:
    """How unsurprising each fact's subject name is to the model: the summed log-probability of its
    tokens after the first, read in the fact's prompt (0 for a one-token subject; more negative = rarer).

    Example::

        subject_familiarity(lm, [{"prompt": "Paris belongs to the continent of", "subject": "Paris"}])  # [0.0]

    Famous names are predictable once begun ("Eiffel" -> " Tower"), so this
    ranks well-known subjects first without a popularity list.
    """
    encs = [encode_prompt(lm.tokenizer, f["prompt"], f["subject"]) for f in facts]
    scores = [0.0] * len(facts)
    with torch.inference_mode():
        for chunk in equal_length_batches([e.ids for e in encs], batch_size):
            batch = torch.tensor([encs[i].ids for i in chunk], device=lm.device)  # (rows, tokens)
            logp = lm.model(batch).logits.float().log_softmax(-1)  # (rows, tokens, vocab)
            for row, i in enumerate(chunk):
                enc = encs[i]
                scores[i] = float(sum(logp[row, t - 1, enc.ids[t]] for t in range(enc.subject_start + 1, enc.subject_end)))
    return scores


def _relations(facts: Sequence[dict], probs, top) -> tuple[dict, dict, dict]:
    """Per relation its prompt templates and object counts, and the facts of each (relation, object): the known
    facts first, most confident first."""
    templates: dict[str, list[str]] = defaultdict(list)
    objects: dict[str, Counter] = defaultdict(Counter)
    by_object: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for fact, p, ok in sorted(zip(facts, probs, top), key=lambda fpo: (not fpo[2], -fpo[1])):
        template = _relation_prompt(fact)
        if template not in templates[fact["relation_id"]]:
            templates[fact["relation_id"]].append(template)
        objects[fact["relation_id"]][fact["attribute"]] += 1
        by_object[fact["relation_id"], fact["attribute"]].append(fact)
    return templates, objects, by_object


def _take_turns(queues: dict[str, list[tuple[dict, float]]], relations: Sequence[str], n: int, per_relation: int,
                complete) -> list[Preset]:
    """Relations take turns, at most ``per_relation`` presets each per round, one subject once, until ``n``."""
    chosen: list[Preset] = []
    seen_subjects: set[str] = set()
    while len(chosen) < n and any(queues[r] for r in relations):
        for relation in relations:
            taken = 0
            while queues[relation] and taken < per_relation and len(chosen) < n:
                fact, p = queues[relation].pop(0)
                if fact["subject"] in seen_subjects:
                    continue
                preset = complete(fact, p, relation)
                if preset is not None:
                    chosen.append(preset)
                    seen_subjects.add(fact["subject"])
                    taken += 1
    return chosen


def find_presets(
    lm: LoadedModel,
    n: int = 12,
    *,
    facts: Iterable[dict] | None = None,
    min_probability: float = 0.2,
    max_tokens: int = 12,
    per_relation: int = 1,
    exclude_relations: Sequence[str] = CLASSROOM_EXCLUDED,
    max_corrupted_ratio: float = 0.5,
) -> list[Preset]:
    """Choose ``n`` well-known facts the model knows, spread over relations, each with an edit to try.

    Example::

        presets = find_presets(load_model(), n=12)

    A fact qualifies when the model's top next token is the first token of its
    attribute with probability ≥ ``min_probability``, its prompt has at most
    ``max_tokens`` tokens (traces stay quick), and the known facts provide a
    counterfactual, two paraphrases and two neighbours (see :class:`Preset`).
    Relations in ``exclude_relations`` and prompts with a negation are skipped,
    and so are facts whose answer survives the corruption of the subject
    (corrupted p > ``max_corrupted_ratio`` × clean p): their heatmaps would
    show little.
    Facts are ranked by log p(answer) plus :func:`subject_familiarity`, so
    confident facts about famous subjects come first; relations take turns (at
    most ``per_relation`` each per round) in order of their best fact.
    """
    facts = list(known_facts() if facts is None else facts)
    if not facts:
        raise ValueError("No facts to choose from; pass a non-empty list of known-fact records.")
    facts = [f for f in facts if f["prompt"].count(f["subject"]) == 1]
    probs, top = answer_probabilities(lm, [f["prompt"] for f in facts], [f["attribute"] for f in facts])
    known = [(fact, p) for fact, p, ok in zip(facts, probs, top) if ok]
    log.info("%s knows %d of %d facts", lm.name, len(known), len(facts))

    templates, objects, by_object = _relations(facts, probs, top)
    candidates = [
        (fact, p) for fact, p in known
        if p >= min_probability
        and fact["relation_id"] not in exclude_relations
        and fact["subject"] not in CLASSROOM_EXCLUDED_SUBJECTS
        and not re.search(r"\bnot\b", fact["prompt"])
        and len(lm.tokenizer(fact["prompt"])["input_ids"]) <= max_tokens
    ]
    familiarity = subject_familiarity(lm, [fact for fact, _ in candidates])
    ranked = sorted(zip(candidates, familiarity), key=lambda cf: -(math.log(cf[0][1]) + cf[1]))
    queues: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for candidate, _ in ranked:
        queues[candidate[0]["relation_id"]].append(candidate)
    relations = list(dict.fromkeys(c[0]["relation_id"] for c, _ in ranked))  # by their best fact
    chosen = _take_turns(queues, relations, n, per_relation,
                         lambda fact, p, relation: _complete(lm, fact, p, templates[relation], objects[relation],
                                                             by_object, max_corrupted_ratio))
    if len(chosen) < n:
        log.warning("Only %d presets qualified (asked for %d); lower min_probability or raise max_tokens.", len(chosen), n)
    return chosen


def _paraphrases(lm: LoadedModel, fact: dict, templates: list[str], rewrite: str) -> list[str] | None:
    """The relation's other prompts about this subject, those the model answers (best) first; None under two."""
    others = list(dict.fromkeys(t.format(fact["subject"]) for t in templates if t != rewrite and t.count("{}") == 1))
    if len(others) < 2:
        return None
    probs, top = answer_probabilities(lm, others, [fact["attribute"]] * len(others))
    ranked = sorted(zip(others, probs, top), key=lambda opt: (not opt[2], -opt[1]))
    return [text for text, _, _ in ranked[:2]]


def _neighbours(fact: dict, by_object: dict) -> list[str] | None:
    """Other subjects of the relation with the same object: unrelated names (no shared word) first, then those
    the model knows, most confident first; None under two."""
    subject, prompt = fact["subject"], fact["prompt"]
    words = set(subject.lower().split())
    others = [
        f for f in by_object[fact["relation_id"], fact["attribute"]]
        if f["subject"] != subject and subject not in f["prompt"] and f["subject"] not in prompt
    ]
    others.sort(key=lambda f: bool(words & set(f["subject"].lower().split())))  # stable sort keeps the rest
    neighbours = [f["prompt"] for f in others][:2]
    return neighbours if len(neighbours) >= 2 else None


def _counterfactual(lm: LoadedModel, fact: dict, probability: float, objects: Counter) -> str | None:
    """The relation's most common other object that the model does not already favour, or None."""
    prompt, attribute = fact["prompt"], fact["attribute"]
    first = continuation_ids(lm.tokenizer, prompt, attribute)[0]
    alternatives = [o for o, _ in objects.most_common() if o != attribute]
    alternatives = [o for o in alternatives if continuation_ids(lm.tokenizer, prompt, o)[0] != first]
    if not alternatives:
        return None
    probs, _ = answer_probabilities(lm, [prompt] * len(alternatives), alternatives)
    unlikely = [o for o, p in zip(alternatives, probs) if p < min(0.05, probability / 10)]
    return unlikely[0] if unlikely else None


def _complete(
    lm: LoadedModel,
    fact: dict,
    probability: float,
    templates: list[str],
    objects: Counter,
    by_object: dict,
    max_corrupted_ratio: float = 1.0,
) -> Preset | None:
    """Add a counterfactual, paraphrases and neighbours to a known fact, or None if one is missing."""
    subject, attribute, prompt = fact["subject"], fact["attribute"], fact["prompt"]
    rewrite = _relation_prompt(fact)
    paraphrases = _paraphrases(lm, fact, templates, rewrite)
    neighbours = _neighbours(fact, by_object) if paraphrases else None
    counterfactual = _counterfactual(lm, fact, probability, objects) if neighbours else None
    if counterfactual is None:
        return None
    # The subject must matter: corrupting it (as the trace does) should remove much of the answer.
    enc = encode_prompt(lm.tokenizer, prompt, subject)
    (low,) = trace(lm, prompt, subject, answer=attribute, kinds=("hidden",),
                   config=TraceConfig(tokens=(len(enc) - 1,)))
    if low.low_score > max_corrupted_ratio * low.high_score:
        return None
    return Preset(
        known_id=int(fact["known_id"]),
        relation_id=fact["relation_id"],
        subject=subject,
        prompt=prompt,
        attribute=attribute,
        probability=round(float(probability), 4),
        corrupted=round(float(low.low_score), 4),
        rewrite_prompt=rewrite,
        counterfactual=counterfactual,
        paraphrases=tuple(paraphrases),
        neighbours=tuple(neighbours),
    )


def save_presets(presets: Sequence[Preset], lm: LoadedModel, path: str | Path = PRESETS_PATH) -> Path:
    """Write presets as JSON, recording which model they were checked against."""
    path = Path(path)
    data = {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "generated_by": "python -m editing.presets",
        "presets": [p.to_dict() for p in presets],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_presets(path: str | Path = PRESETS_PATH) -> PresetFile:
    """Read a presets file written by :func:`save_presets`.

    Example::

        shipped = load_presets()          # assets/presets.json
        shipped.model, len(shipped.presets)
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"Cannot read presets from {path}: {exc}. Regenerate with: python -m editing.presets") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}). Regenerate with: python -m editing.presets") from None
    if not isinstance(data, dict) or not isinstance(data.get("presets"), list):
        raise ValueError(f"{path} has no 'presets' list. Regenerate with: python -m editing.presets")
    return PresetFile(
        model=str(data.get("model", "")),
        fingerprint=str(data.get("fingerprint", "")),
        presets=tuple(Preset.from_dict(p) for p in data["presets"]),
    )


_CONNECTORS = {"of", "de", "the", "and", "von", "van", "der", "la", "le", "du", "da", "del", "di", "&"}
_STOP_VERBS = {
    "is", "was", "are", "were", "has", "had", "have", "can", "will", "would", "does", "did", "plays", "works",
    "speaks", "died", "follows", "belongs", "premieres", "premiered", "debuted", "passed", "originated",
}
_WORD = re.compile(r"[\w'’.\-&]+", re.UNICODE)


def guess_subject(prompt: str, facts: Iterable[dict] | None = None) -> str:
    """A best guess at the subject of a prompt, to pre-fill the subject field.

    Example::

        guess_subject("The Eiffel Tower is located in the city of")   # "The Eiffel Tower"
        guess_subject("The capital of Egypt is")                       # "Egypt" (a known subject)

    The longest known-fact subject found in the prompt wins; otherwise the first
    run of capitalised words (joined by "of", "the", ...) that is not just the
    sentence's first word before a verb; otherwise the words before the first
    verb. Returns "" for an empty prompt.
    """
    text = (prompt or "").strip()
    if not text:
        return ""
    facts = known_facts() if facts is None else facts
    matches = [f["subject"] for f in facts if f["subject"] and re.search(rf"(?<!\w){re.escape(f['subject'])}(?!\w)", text)]
    if matches:
        return max(matches, key=len)

    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
    runs: list[tuple[int, int]] = []  # [first word, last word] of capitalised runs
    i = 0
    while i < len(words):
        if words[i][0][:1].isupper() or words[i][0][:1].isdigit():
            j = i
            while j + 1 < len(words):
                nxt = words[j + 1][0]
                if text[words[j][2] : words[j + 1][1]].strip():
                    break  # punctuation between the words ends the name
                if nxt[:1].isupper() or nxt[:1].isdigit():
                    j += 1
                elif (nxt.lower() in _CONNECTORS and j + 2 < len(words) and words[j + 2][0][:1].isupper()
                      and not text[words[j + 1][2] : words[j + 2][1]].strip()):
                    j += 2
                else:
                    break
            runs.append((i, j))
            i = j + 1
        else:
            i += 1
    for first, last in runs:
        if first == 0 and last == 0 and len(runs) > 1 and words[0][0].lower() in {"the", "a", "an", "in", "where"}:
            continue  # a capitalised article or question word alone is not a subject
        start, end = words[first][1], words[last][2]
        return text[start:end].rstrip(".,")
    for k, (word, _, end) in enumerate(words):
        if word.lower() in _STOP_VERBS and k > 0:
            return text[: words[k - 1][2]]
    return words[0][0] if words else ""

"""Where the project's shipped files live, and the one loader of the paper's known facts.

Every module that reads ``assets/`` asks here, so the folder can move (or a
Space can mount it elsewhere) by changing one line.

Example::

    from tracing.assets import KNOWN_FACTS, known_facts
    facts = known_facts()                  # 1,209 records: subject, prompt, attribute, relation_id, ...
    facts[0]["subject"], facts[0]["attribute"]
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "assets"
KNOWN_FACTS = ROOT / "known_facts.json"  # the paper's known_1000.json
PRESETS = ROOT / "presets.json"  # classroom presets (python -m editing.presets)
COUNTERFACT = ROOT / "counterfact_smollm2.json"  # CounterFact-style cases (python -m editing.cases)
HPARAMS = ROOT / "hparams"  # ROME hyperparameters per model family
STATS = ROOT / "stats"  # shipped statistics corpora (python -m editing.stats --ship)
STATIC = ROOT / "static"  # the page's CSS, help texts and screenshots
AVERAGES = ROOT / "averages"  # traces averaged over known facts, per model (python -m tracing.average --ship)
SHAPES = ROOT / "shapes"  # model configs for shape-only benchmarks, and the default model's tokenizer

FACT_FIELDS = ("subject", "attribute", "prompt", "relation_id")


@lru_cache(maxsize=4)
def _read_facts(path: Path) -> tuple[dict, ...]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read the known facts {path}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a list of known-fact records.")
    good = tuple(f for f in data if isinstance(f, dict) and set(FACT_FIELDS) <= set(f) and f["subject"] in f["prompt"])
    if not good:
        raise ValueError(f"{path} holds no records with the fields {list(FACT_FIELDS)}.")
    return good


def known_facts(path: str | Path = KNOWN_FACTS) -> tuple[dict, ...]:
    """Known-fact records (subject, attribute, prompt, relation_id, ...) whose prompt contains the subject.

    Read once per path. The default is the paper's ``known_1000.json``
    (1,209 facts), shipped as ``assets/known_facts.json``; pass another file
    of the same format to use other facts. ValueError when it is unreadable.
    """
    return _read_facts(Path(path).resolve())

"""How well an edit took, in the CounterFact sense (Meng et al., 2022, §3.3 and appendix).

For each prompt, the new object o* and the old object oᶜ are scored by the
mean log-probability of their tokens after the prompt (teacher-forced, so
multi-token objects count fully). Then

* efficacy (ES): on the rewrite prompt, the fraction where P(o*) > P(oᶜ);
* paraphrase (PS): the same on paraphrases of the prompt;
* neighbourhood (NS): on prompts about *other* subjects whose true object is
  oᶜ, the fraction where P(oᶜ) > P(o*) still;
* magnitudes (EM, PM, NM): the mean probability differences;
* S: the harmonic mean of ES, PS and NS;
* fluency: the n-gram entropy of generated text (a drop means repetition).

Beside them, :func:`accuracy_scores` gives EasyEdit's token-level scores (``rel_acc``, ``gen_acc``,
``loc_acc``: the share of the object's tokens the argmax predicts, teacher-forced; locality as agreement
with the unedited model), which are not ES/PS/NS and can differ widely from them.

Call :func:`score_edit` outside and inside ``applied(...)`` for before/after.

Example::

    before = score_edit(lm, edit.request, paraphrases=["Where is the Eiffel Tower? It is in"],
                        neighbours=["The Louvre is located in the city of"])
    with applied(lm, [edit]):
        after = score_edit(lm, edit.request, paraphrases=[...], neighbours=[...])
    before.summary()["ES"], after.summary()["ES"]        # 0.0, 1.0
"""

from __future__ import annotations

import math
import re
from collections import Counter
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from tracing.hooks import Hook, hooks, main_tensor
from tracing.models import LoadedModel
from tracing.tokens import check_context, continuation_ids

from .edit import Edit, EditRequest

from .applying import applied
from .sampling import pad_id

KINDS = ("rewrite", "paraphrase", "neighbour")


@dataclass(frozen=True, eq=False)
class EditScores:
    """Per-prompt log-probabilities of the new and old objects, and the CounterFact scores they give.

    ``logp_new``/``logp_old``: (prompts,) mean token log-probabilities.
    """

    prompts: tuple[str, ...]
    kinds: tuple[str, ...]  # "rewrite" | "paraphrase" | "neighbour", one per prompt
    logp_new: np.ndarray  # (prompts,)
    logp_old: np.ndarray  # (prompts,)
    target: str
    target_true: str
    # per prompt, from the same teacher-forced pass: (argmax tokens, object tokens) for the new object after rewrite
    # and paraphrase prompts, the true object after neighbours (EasyEdit's token scores); None if not kept
    tokens: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None

    @classmethod
    def from_pass(cls, prompts: Sequence[str], kinds: Sequence[str], logp: np.ndarray,
                  predictions: Sequence[tuple[np.ndarray, np.ndarray]], target: str, target_true: str) -> EditScores:
        """The scores of one pass over (prompt, target) for every prompt, then (prompt, target_true) for every prompt:
        ``logp`` and ``predictions`` as :func:`continuation_scores` returns them for those pairs."""
        n = len(prompts)
        tokens = tuple(predictions[n + j] if k == "neighbour" else predictions[j] for j, k in enumerate(kinds))
        return cls(prompts=tuple(prompts), kinds=tuple(kinds), logp_new=logp[:n], logp_old=logp[n : 2 * n],
                   target=target, target_true=target_true, tokens=tokens)

    @property
    def prob_new(self) -> np.ndarray:
        return np.exp(self.logp_new)

    @property
    def prob_old(self) -> np.ndarray:
        return np.exp(self.logp_old)

    @property
    def success(self) -> np.ndarray:
        """(prompts,) bool: o* beats oᶜ on rewrite/paraphrase prompts, oᶜ beats o* on neighbours."""
        neighbour = np.array([k == "neighbour" for k in self.kinds], dtype=bool)
        return np.where(neighbour, self.logp_old > self.logp_new, self.logp_new > self.logp_old)

    def _mean(self, kind: str, values: np.ndarray) -> float:
        mask = np.array([k == kind for k in self.kinds], dtype=bool)
        return float(values[mask].mean()) if mask.any() else float("nan")

    @property
    def efficacy(self) -> float:
        return self._mean("rewrite", self.success.astype(float))

    @property
    def paraphrase(self) -> float:
        return self._mean("paraphrase", self.success.astype(float))

    @property
    def neighbourhood(self) -> float:
        return self._mean("neighbour", self.success.astype(float))

    @property
    def score(self) -> float:
        """S: the harmonic mean of the available ES, PS, NS."""
        return harmonic_mean([self.efficacy, self.paraphrase, self.neighbourhood])

    def summary(self) -> dict[str, float]:
        """ES, PS, NS, S and the magnitudes EM, PM, NM (probability differences)."""
        diff = self.prob_new - self.prob_old
        return {
            "ES": self.efficacy, "PS": self.paraphrase, "NS": self.neighbourhood, "S": self.score,
            "EM": self._mean("rewrite", diff), "PM": self._mean("paraphrase", diff),
            "NM": self._mean("neighbour", -diff),
        }

    def rows(self) -> list[dict]:
        """One dict per prompt: kind, prompt, p(new), p(old), success."""
        return [
            {"kind": k, "prompt": p, "p_new": float(a), "p_old": float(b), "success": bool(s)}
            for k, p, a, b, s in zip(self.kinds, self.prompts, self.prob_new, self.prob_old, self.success)
        ]

    def to_dict(self) -> dict:
        return {"prompts": list(self.prompts), "kinds": list(self.kinds), "logp_new": self.logp_new.tolist(),
                "logp_old": self.logp_old.tolist(), "target": self.target, "target_true": self.target_true,
                "summary": nan_to_none(self.summary())}

    @classmethod
    def from_dict(cls, data: dict) -> "EditScores":
        return cls(prompts=tuple(data["prompts"]), kinds=tuple(data["kinds"]),
                   logp_new=np.asarray(data["logp_new"], dtype=np.float64),
                   logp_old=np.asarray(data["logp_old"], dtype=np.float64),
                   target=data["target"], target_true=data["target_true"])


def nan_to_none(values: Mapping) -> dict:
    """NaN (and infinite) floats become None, so that the dict is strict JSON; every other value is kept."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of the non-NaN values (0 if any is 0, NaN if none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan")
    if min(vals) <= 0:
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def continuation_logprobs(lm: LoadedModel, pairs: Sequence[tuple[str, str]], batch_rows: int = 32) -> np.ndarray:
    """Mean token log-probability of each continuation after its prompt: (pairs,) float64.

    Example::

        continuation_logprobs(lm, [("The Eiffel Tower is located in the city of", "Paris")])   # [-0.36]
    """
    return continuation_stats(lm, pairs, batch_rows)[0]


def continuation_stats(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], batch_rows: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per (prompt, continuation): the mean token log-probability (pairs,) and whether greedy decoding gives it (pairs,).

    Rows are right-padded (causal attention makes that exact) and only the
    positions that predict continuation tokens are unembedded.
    """
    mean_logp, predictions = continuation_scores(lm, pairs, batch_rows)
    return mean_logp, np.array([np.array_equal(predicted, target) for predicted, target in predictions], dtype=bool)


def continuation_predictions(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], batch_rows: int = 32
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per (prompt, continuation): the argmax token at each position that predicts a continuation token, teacher-forced
    on prompt + continuation, and the continuation's tokens: ``(predicted, target)``, two (tokens,) int64 arrays.

    Example::

        predicted, target = continuation_predictions(lm, [("The Eiffel Tower is located in the city of", "Paris")])[0]
        token_accuracy(predicted, target)     # EasyEdit's accuracy: the share of target tokens predicted
    """
    return continuation_scores(lm, pairs, batch_rows)[1]


def continuation_scores(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], batch_rows: int = 32
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`continuation_logprobs` and :func:`continuation_predictions` of the same pairs from one pass."""
    mean_logp = np.empty(len(pairs), dtype=np.float64)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for i, spans, owner, logits, tokens in _continuation_logits(lm, pairs, batch_rows):
        logp = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0].double().cpu()
        sums = torch.zeros(len(spans), dtype=torch.float64).index_add(0, owner, logp)
        predicted, target, rows = logits.argmax(-1).cpu().numpy(), tokens.cpu().numpy(), owner.numpy()
        for r in range(len(spans)):
            mean_logp[i + r] = float(sums[r]) / spans[r][1]
            out.append((predicted[rows == r], target[rows == r]))
    return mean_logp, out


def _continuation_logits(lm: LoadedModel, pairs: Sequence[tuple[str, str]], batch_rows: int):
    """Teacher-forced passes over prompt + continuation in chunks of ``batch_rows``: yields, per chunk, its first
    pair's index, the chunk's (prompt tokens, continuation tokens) counts, and for every position that predicts a
    continuation token the row it belongs to (CPU), the logits (picked, vocab) and the token it should predict.
    """
    rows, spans = [], []
    for prompt, continuation in pairs:
        head = lm.tokenizer(prompt)["input_ids"]
        tail = continuation_ids(lm.tokenizer, prompt, continuation)
        check_context(lm.max_length, len(head) + len(tail), f"The prompt {prompt[:40]!r} with {continuation[:20]!r}",
                      "Shorten the prompt or the object.")
        rows.append(head + tail)
        spans.append((len(head), len(tail)))
    pad = pad_id(lm.tokenizer)
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(main_tensor(output))

    with torch.inference_mode(), hooks(lm.model, Hook(lm.spec.final_norm, keep)):
        for i in range(0, len(rows), batch_rows):
            chunk = rows[i : i + batch_rows]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=lm.device)
            for r, row in enumerate(chunk):
                ids[r, : len(row)] = torch.tensor(row, device=lm.device)  # right padding: causal = exact
            captured.clear()
            lm.model(ids, logits_to_keep=1)
            normed = captured[0]  # (rows, width, d_model)
            sel_rows, sel_pos, sel_tok = [], [], []
            for r, row in enumerate(chunk):
                n_head, n_tail = spans[i + r]
                for t in range(n_tail):
                    sel_rows.append(r)
                    sel_pos.append(n_head - 1 + t)
                    sel_tok.append(row[n_head + t])
            index_rows = torch.tensor(sel_rows, device=normed.device)
            index_pos = torch.tensor(sel_pos, device=normed.device)
            logits = lm.unembed(normed[index_rows, index_pos]).float()  # (picked, vocab)
            tokens = torch.tensor(sel_tok, device=logits.device)  # beside the logits (a sharded model's last device)
            yield i, spans[i : i + len(chunk)], torch.tensor(sel_rows), logits, tokens


def token_accuracy(predicted: np.ndarray, target: np.ndarray) -> float:
    """The share of positions where ``predicted`` equals ``target`` (EasyEdit's token-level accuracy)."""
    return float(np.mean(np.asarray(predicted) == np.asarray(target))) if len(target) else float("nan")


ACCURACY = ("rel_acc", "gen_acc", "loc_acc")


def token_predictions(lm: LoadedModel, scores: Sequence[EditScores]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """For each scored case, :func:`continuation_predictions` of its prompts (same order as ``scores.prompts``),
    teacher-forced with the new object after rewrite and paraphrase prompts and the old (true) object after
    neighbours: kept from the scoring pass (``EditScores.tokens``), else computed in shared forward passes."""
    missing = [s for s in scores if s.tokens is None]
    pairs = [(p, s.target_true if k == "neighbour" else s.target) for s in missing for p, k in zip(s.prompts, s.kinds)]
    flat = iter(continuation_predictions(lm, pairs) if pairs else [])
    return [list(s.tokens) if s.tokens is not None else [next(flat) for _ in s.prompts] for s in scores]


def accuracy_scores(
    scores: EditScores,
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    unedited: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """EasyEdit's token-level scores of one case (each the mean over its prompts of a share of tokens):

    * ``rel_acc`` (Reliability): the rewrite prompt's new-object tokens predicted (argmax, teacher-forced);
    * ``gen_acc`` (Generalization): the same on the paraphrases;
    * ``loc_acc`` (Locality): on the neighbours, teacher-forced with the true object, the share of positions
      where the argmax equals the unedited model's (``unedited``: that model's ``predictions``); left out without it.

    Not the probability comparisons ES/PS/NS: a multi-token object can be half predicted here.
    """
    out = {}
    for name, kind in (("rel_acc", "rewrite"), ("gen_acc", "paraphrase")):
        values = [token_accuracy(*pred) for pred, k in zip(predictions, scores.kinds) if k == kind]
        out[name] = float(np.mean(values)) if values else float("nan")
    if unedited is not None:
        values = [token_accuracy(now[0], then[0])
                  for now, then, k in zip(predictions, unedited, scores.kinds) if k == "neighbour"]
        out["loc_acc"] = float(np.mean(values)) if values else float("nan")
    return out


def _fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject, 1) if "{}" in prompt else prompt


def score_edit(
    lm: LoadedModel,
    request: EditRequest,
    paraphrases: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    *,
    rewrite: bool = True,
) -> EditScores:
    """Score the model (edited or not) on the request's rewrite prompt, paraphrases and neighbours.

    Paraphrases and neighbours are full prompts; a ``{}`` in them is replaced
    by the request's subject. ``request.target_true`` (the old object) must be
    set: ``compute_edit`` fills it in ``edit.request``.
    """
    request.validate()
    if request.target_true is None:
        raise ValueError(
            "Scoring needs the old object: set EditRequest.target_true (for example 'Paris'), or pass "
            "edit.request, which compute_edit fills with the unedited model's answer."
        )
    subject = request.subject.strip()
    prompts, kinds = [], []
    if rewrite:
        prompts.append(request.text)
        kinds.append("rewrite")
    for kind, group in (("paraphrase", paraphrases), ("neighbour", neighbours)):
        if isinstance(group, str):
            raise ValueError(f"{kind} prompts must be a list of strings, not one string.")
        for prompt in group:
            if not isinstance(prompt, str) or not prompt.strip():
                continue
            prompts.append(_fill(prompt.strip(), subject))
            kinds.append(kind)
    if not prompts:
        raise ValueError("Nothing to score: give the rewrite prompt, paraphrases or neighbours.")
    pairs = [(p, request.target) for p in prompts] + [(p, request.target_true) for p in prompts]
    logp, predictions = continuation_scores(lm, pairs)
    return EditScores.from_pass(prompts, kinds, logp, predictions, request.target, request.target_true)


def score_many(lm: LoadedModel, items: Sequence[tuple[EditRequest, Sequence[str], Sequence[str]]]) -> list[EditScores]:
    """:func:`score_edit` of many (request, paraphrases, neighbours) in shared forward passes."""
    plans, pairs = [], []
    for request, paraphrases, neighbours in items:
        subject = request.subject.strip()
        prompts = [request.text] + [p.replace("{}", subject, 1) for p in paraphrases] + \
                  [p.replace("{}", subject, 1) for p in neighbours]
        kinds = ["rewrite"] + ["paraphrase"] * len(paraphrases) + ["neighbour"] * len(neighbours)
        plans.append((request, prompts, kinds, len(pairs)))
        pairs += [(p, request.target) for p in prompts] + [(p, request.target_true) for p in prompts]
    logp, predictions = continuation_scores(lm, pairs) if pairs else (np.zeros(0), [])
    return [EditScores.from_pass(prompts, kinds, logp[start:], predictions[start:], request.target,
                                 request.target_true) for request, prompts, kinds, start in plans]


S = TypeVar("S")


@dataclass(frozen=True, eq=False)
class Rescored(Generic[S]):
    """What :func:`rescore` measured: the scores before the edit, the edit, the scores after it."""

    before: S
    edit: Edit
    after: S
    seconds: float  # computing the edit alone


def rescore(
    lm: LoadedModel,
    score: Callable[[], S],
    make_edit: Callable[[], Edit],
    *,
    previous: Sequence[Edit] = (),
    before: S | None = None,
    score_after: Callable[[S], S] | None = None,
) -> Rescored[S]:
    """Score, edit, score again: the one loop behind comparisons, evaluations, layer sweeps and batches.

    Example::

        measure = lambda: score_edit(lm, request, paraphrases, neighbours)
        r = rescore(lm, measure, lambda: compute(lm, request))
        r.before.summary()["ES"], r.after.summary()["ES"]       # 0.0, 1.0

    ``score()`` runs with the ``previous`` edits applied (unless ``before``
    holds the scores already taken); ``make_edit()`` computes the edit on top
    of them (it applies them itself where it needs them, as
    :func:`~editing.methods.compute_batch` does); then ``score()`` again, or
    ``score_after(before)`` when given (to score what was scored before, say),
    runs with ``previous`` and the new edit applied.
    The weights are the model's own again afterwards, also on exceptions.
    Callers extend the result: a comparison adds generations, an evaluation
    per-case records, a batch its health check.
    """
    previous = list(previous)
    if before is None:
        with applied(lm, previous):
            before = score()
    started = time.perf_counter()
    edit = make_edit()
    seconds = time.perf_counter() - started
    with applied(lm, [*previous, edit]):
        after = score_after(before) if score_after is not None else score()
    return Rescored(before, edit, after, seconds)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of one text, as in the ROME/MEMIT fluency metric."""
    words = _WORD.findall(text.lower())
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            values.append(0.0)
            continue
        freqs = np.array(list(grams.values()), dtype=np.float64) / total
        values.append(w * float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(values))


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy over texts (NaN for none)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else float("nan")

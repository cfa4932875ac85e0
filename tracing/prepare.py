"""A prompt prepared for tracing: its tokens, subject, answer and corruption, and its clean run.

Every tracer of this package starts here -- the fast engine (:mod:`tracing.fast`),
the oracle (:mod:`tracing.reference`), the preview (:mod:`tracing.preview`) and
severed paths (:mod:`tracing.sever`) -- so that they score the same answer the
same way and package their results alike.

Example::

    plan = PromptPlan.make(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower", None, config, 0)
    logits = plan.clean_logits()             # (1, read, vocab): fixes the answer when none was given
    setup = plan.setup(logits[0])
    setup.answer_id, float(setup.score(logits)[0])     # ' Paris', p(answer) in the clean run
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backends import attention_backends, precision_label
from .corruption import Corruption, make_corruption
from .hooks import Hook, hooks
from .models import LoadedModel, parse_dtype
from .result import ANSWER_METRICS, KINDS, TraceConfig, TraceResult
from .tokens import EncodedPrompt, check_context, continuation_ids, encode_prompt

@dataclass(frozen=True, eq=False)
class Setup:
    """Everything both engines share for one prompt."""

    lm: LoadedModel
    enc: EncodedPrompt
    subject: str
    answer_ids: tuple[int, ...]  # every token of the answer (the first is scored by the single-token metrics)
    contrast_id: int | None
    corruption: Corruption
    config: TraceConfig

    @property
    def answer_id(self) -> int:
        return self.answer_ids[0]

    @property
    def read(self) -> int:
        """Last positions whose logits the metric reads: the answer's tokens (teacher-forced), else one."""
        return len(self.answer_ids) if self.config.metric in ANSWER_METRICS else 1

    @property
    def ids(self) -> tuple[int, ...]:
        """The run's tokens: the prompt, then all but the last answer token when the metric reads them all."""
        return self.enc.ids + tuple(self.answer_ids[: self.read - 1])

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.ids], device=self.lm.device)  # (1, tokens)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw metric per row from the read positions' logits, (rows, read, vocab) or (rows, vocab) when one.

        p(answer), a logit difference, or for the answer metrics the summed
        log-probability of every answer token (or its exp).
        """
        logits = logits.float()
        if logits.ndim == 2:
            logits = logits[:, None]
        if self.config.metric in ANSWER_METRICS:
            ids = torch.tensor(self.answer_ids, device=logits.device)  # (read,)
            logp = logits.log_softmax(-1).gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1))
            total = logp[..., 0].sum(-1)  # (rows,)
            return total if self.config.metric == "answer_logprob" else total.exp()
        last = logits[:, -1]
        if self.config.metric == "logit_diff":
            return last[:, self.answer_id] - last[:, self.contrast_id]
        return last.softmax(-1)[:, self.answer_id]

    def token_positions(self) -> list[int]:
        """Token positions whose cells are computed (config.tokens)."""
        n = len(self.enc)
        spec = self.config.tokens
        if spec == "all":
            return list(range(n))
        if spec == "subject_last":
            return sorted(set(range(self.enc.subject_start, self.enc.subject_end)) | {n - 1})
        bad = [t for t in spec if not -n <= t < n]
        if bad:
            raise ValueError(f"Token positions {bad} are outside the prompt's {n} tokens.")
        return sorted({t % n for t in spec})


def with_precision(lm: LoadedModel, precision: str) -> LoadedModel:
    """The model in the requested precision (a converted copy if it differs)."""
    if precision == "auto" or parse_dtype(precision) == lm.dtype:
        return lm
    if lm.offloaded:
        raise ValueError(f"{lm.name} has weights offloaded by accelerate (device_map), which cannot be copied in "
                         f"{precision}; load the model in that dtype (dtype={precision!r}) or use precision 'auto'.")
    # nn.Module.to, not the copy's own: accelerate's dispatch wraps a model's .to in a closure that, copied
    # along, would convert the original model
    model = torch.nn.Module.to(copy.deepcopy(lm.model), parse_dtype(precision))
    return LoadedModel(model=model, tokenizer=lm.tokenizer, spec=lm.spec, name=lm.name)


def prepare(
    lm: LoadedModel, prompt: str, subject: str, answer: str | None, config: TraceConfig, occurrence: int,
    record: Sequence[Hook] = (),
) -> tuple[Setup, float, int]:
    """Tokenise, find the subject, fix the answer; return the setup, clean score and answer id.

    ``record``: hooks active during the clean run (e.g. to keep its states).
    """
    plan = PromptPlan.make(lm, prompt, subject, answer, config, occurrence)
    logits = plan.clean_logits(record)
    setup = plan.setup(logits[0])
    return setup, float(setup.score(logits)[0]), setup.answer_id


@dataclass(frozen=True)
class PromptPlan:
    """A prompt ready to run before its clean run has fixed the answer (when none was given)."""

    lm: LoadedModel
    enc: EncodedPrompt
    subject: str
    answer_ids: tuple[int, ...]  # the given answer's tokens, or () for the model's own top prediction
    contrast_id: int | None
    corruption: Corruption
    config: TraceConfig

    @classmethod
    def make(cls, lm: LoadedModel, prompt: str, subject: str, answer: str | None, config: TraceConfig,
             occurrence: int) -> PromptPlan:
        enc = encode_prompt(lm.tokenizer, prompt, subject, occurrence=occurrence, max_length=lm.max_length)
        given = answer is not None and str(answer).strip()
        answer_ids = tuple(continuation_ids(lm.tokenizer, prompt, answer)) if given else ()
        if config.metric in ANSWER_METRICS and len(answer_ids) > 1:
            check_context(lm.max_length, len(enc) + len(answer_ids) - 1, fix="Shorten the prompt or the answer.")
        contrast_id = None
        if config.metric == "logit_diff":
            contrast_id = continuation_ids(lm.tokenizer, prompt, config.contrast)[0]
        return cls(lm, enc, subject.strip(), answer_ids, contrast_id, make_corruption(lm, enc, subject.strip(), config),
                   config)

    @property
    def extra(self) -> tuple[int, ...]:
        """The answer's tokens fed after the prompt (all but its last), when the metric reads them all."""
        return self.answer_ids[:-1] if self.config.metric in ANSWER_METRICS else ()

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([self.enc.ids + self.extra], device=self.lm.device)  # (1, tokens)

    @property
    def read_from(self) -> int:
        """The first position whose logits the metric reads (the prompt's last token)."""
        return len(self.enc) - 1

    def clean_logits(self, record: Sequence[Hook] = (), use_cache: bool = False) -> torch.Tensor:
        """The clean run's logits (1, read, vocab) at the positions the metric reads; ``record``: hooks during it.

        ``use_cache``: the blocks receive a key/value cache, as when the
        engine records their calls to replay them (:mod:`tracing.blocks`).
        """
        with torch.inference_mode(), hooks(self.lm.model, *record):
            hidden = self.lm.model.base_model(self.input_ids, use_cache=use_cache).last_hidden_state  # final norm applied
            return self.lm.unembed(hidden[:, self.read_from:])

    def setup(self, logits: torch.Tensor) -> Setup:
        """The setup, with the clean run's ``logits`` (read, vocab) fixing the answer if none was given."""
        answer_ids = self.answer_ids or (int(logits[-1].argmax()),)  # the model's top prediction (one token)
        return Setup(self.lm, self.enc, self.subject, answer_ids, self.contrast_id, self.corruption, self.config)


def run_settings(lm: LoadedModel, config: TraceConfig, started: float) -> dict:
    """How a result was computed: seconds since the trace began, device, precision, attention backends."""
    out = {
        "seconds": round(time.perf_counter() - started, 4),
        "device": str(lm.device),
        "dtype": precision_label(lm.device, lm.dtype, config.precision == "tf32"),
    }
    backends = attention_backends(lm.device)
    if backends:
        out["attention"] = ",".join(backends)
    return out


def to_result(
    setup: Setup, kind: str, raw: np.ndarray, low: float, high: float, run: dict | None = None
) -> TraceResult:
    """Package raw scores (tokens, layers) of one kind, normalising for metric="recovered".

    ``run`` (seconds, device, dtype, ...) is added to the result's settings.
    """
    config = setup.config
    raw = raw[: len(setup.enc)]  # the prompt's rows (an answer's teacher-forced tokens are read, not traced)
    run = dict(run or {})
    if config.metric == "recovered":
        span = high - low
        raw = (raw - low) / span if span != 0 else np.full_like(raw, np.nan)
        low, high = 0.0, 1.0
        if "low_sd" in run:
            run["low_sd"] = run["low_sd"] / abs(span) if span != 0 else float("nan")
    settings = config.to_dict()
    settings["noise_scale_used"] = setup.corruption.scale
    settings["copies"] = setup.corruption.copies
    if setup.corruption.replacement_subjects:
        settings["replacement_subjects"] = list(setup.corruption.replacement_subjects)
    settings.update(run)
    return TraceResult(
        kind=kind,
        scores=raw,
        low_score=float(low),
        high_score=float(high),
        tokens=setup.enc.tokens,
        subject_range=setup.enc.subject_range,
        answer=setup.lm.tokenizer.decode(list(setup.answer_ids[: setup.read])),
        answer_id=setup.answer_id,
        prompt=setup.enc.text,
        subject=setup.subject,
        metric=config.metric,
        model=setup.lm.name,
        settings=settings,
    )


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"Unknown trace kind(s) {bad}; choose from {', '.join(KINDS)}.")
    return kinds

"""Settings and results of a causal trace, as plain data.

Example::

    cfg = TraceConfig(samples=10, noise=3.0, window=10, seed=1)
    result = trace(lm, prompt, subject, kinds=("mlp",), config=cfg)[0]
    result.scores.shape          # (tokens, layers)
    TraceResult.from_dict(json.loads(json.dumps(result.to_dict())))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

KINDS = ("hidden", "mlp", "attn")
CORRUPTIONS = ("gaussian", "uniform", "subject")
METRICS = ("prob", "logit_diff", "recovered", "answer_prob", "answer_logprob")
ANSWER_METRICS = ("answer_prob", "answer_logprob")  # over every token of the answer, teacher-forced
TOKEN_RANGES = ("all", "subject_last")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "tf32")  # tf32: float32 weights, TF32 matrix products on CUDA
BATCHINGS = ("auto", "token", "kind", "all")


@dataclass(frozen=True)
class TraceConfig:
    """How to corrupt, what to restore and what to measure. Defaults are the paper's."""

    samples: int = 10  # corrupted copies whose scores are averaged
    noise: float = 3.0  # noise scale as a multiple of the token-embedding std over known subjects
    noise_scale: float | None = None  # absolute noise std (overrides `noise` when set)
    corruption: str = "gaussian"  # gaussian | uniform (on [-scale, scale]) | subject (swap in another subject)
    replacement: str | None = None  # subject to swap in for corruption="subject" (None: picked from known facts)
    window: int = 10  # layers restored together for mlp/attn: l - window//2 ... l + (window - window//2) - 1
    seed: int = 1  # seeds the noise generator: same seed, same heatmaps
    # prob | logit_diff (answer minus contrast logit) | recovered ((s - low)/(high - low)) | answer_logprob (the
    # summed log-probability of every answer token, teacher-forced) | answer_prob (its exp: p(whole answer))
    metric: str = "prob"
    contrast: str | None = None  # the contrast answer for metric="logit_diff"
    tokens: str | tuple[int, ...] = "all"  # all | subject_last | explicit token positions
    precision: str = "auto"  # auto (the model's dtype) | fp32 | bf16 | fp16 | tf32 (fp32 with TF32 matmuls on CUDA)
    skip: bool = True  # skip work that cannot change a score (exact)
    memory_mb: int | None = None  # budget for one batch of restored rows; None: 1 GiB, or 1/4 of a GPU's free memory
    batching: str = "auto"  # which cells share forward passes (never changes a score): auto | token | kind | all

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}.")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}.")
        if self.noise_scale is None and self.noise <= 0 and self.corruption != "subject":
            raise ValueError(f"noise must be positive, got {self.noise}.")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}; got {self.corruption!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}.")
        if self.metric == "logit_diff" and not self.contrast:
            raise ValueError("metric='logit_diff' needs a contrast answer (e.g. contrast='Rome').")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}.")
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}; got {self.batching!r}.")
        if self.memory_mb is not None and self.memory_mb < 0:
            raise ValueError(f"memory_mb must be at least 0 (or None for the default), got {self.memory_mb}.")
        if isinstance(self.tokens, str) and self.tokens not in TOKEN_RANGES:
            raise ValueError(f"tokens must be one of {', '.join(TOKEN_RANGES)} or a list of positions; got {self.tokens!r}.")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not isinstance(self.tokens, str):
            out["tokens"] = list(self.tokens)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TraceConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown trace settings: {', '.join(sorted(unknown))}.")
        data = dict(data)
        if isinstance(data.get("tokens"), list):
            data["tokens"] = tuple(data["tokens"])
        return cls(**data)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for a windowed (mlp/attn) cell at ``layer``, clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True, eq=False)
class TraceResult:
    """One heatmap: the score of restoring each (token, layer) state of one kind.

    ``scores`` has shape (tokens, layers); cells not computed (see
    ``TraceConfig.tokens``) are NaN. ``low_score`` is the corrupted run with
    nothing restored, ``high_score`` the clean run, both in the metric's units.
    """

    kind: str
    scores: np.ndarray  # (tokens, layers)
    low_score: float
    high_score: float
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]  # half-open
    answer: str
    answer_id: int
    prompt: str
    subject: str
    metric: str = "prob"
    model: str = ""
    settings: dict = field(default_factory=dict)  # TraceConfig.to_dict() plus the noise scale used

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "tokens": list(self.tokens),
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "answer_id": self.answer_id,
            "high_score": self.high_score,
            "low_score": self.low_score,
            "scores": [[None if np.isnan(v) else float(v) for v in row] for row in self.scores],
            "prompt": self.prompt,
            "subject": self.subject,
            "metric": self.metric,
            "model": self.model,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        scores = np.array([[np.nan if v is None else v for v in row] for row in data["scores"]], dtype=np.float64)
        return cls(
            kind=data["kind"],
            scores=scores,
            low_score=float(data["low_score"]),
            high_score=float(data["high_score"]),
            tokens=tuple(data["tokens"]),
            subject_range=tuple(data["subject_range"]),
            answer=data["answer"],
            answer_id=int(data.get("answer_id", -1)),
            prompt=data.get("prompt", ""),
            subject=data.get("subject", ""),
            metric=data.get("metric", "prob"),
            model=data.get("model", ""),
            settings=dict(data.get("settings", {})),
        )

    def peak(self, token: int | None = None) -> tuple[int, int]:
        """(token, layer) of the highest score, optionally at one token (default: anywhere)."""
        if token is not None:
            return token, int(np.nanargmax(self.scores[token]))
        flat = int(np.nanargmax(self.scores))
        return divmod(flat, self.scores.shape[1])


@dataclass(frozen=True)
class LayerSuggestion:
    """Where to edit a traced fact, or why no layer is suggested (see :func:`suggest_edit_layer`)."""

    layer: int | None  # None: no layer's effect stands out
    token: int  # the last subject token
    peak_layer: int  # where the row peaks, suggested or not
    effect: float  # restored score at the peak minus the corrupted run's
    needed: float  # the effect a suggestion needs
    reason: str


def suggest_edit_layer(mlp: TraceResult, *, min_share: float = 0.1, min_z: float = 3.0) -> LayerSuggestion:
    """The MLP layer to edit, when the MLP effect at the last subject token stands clearly above noise.

    Example::

        hidden, mlp, attn = trace(lm, prompt, subject)
        suggestion = suggest_edit_layer(mlp)
        suggestion.layer        # None when the row is flat: then sweep the layers (editing.sweep)

    The peak of that row must exceed the corrupted run's score by at least
    ``min_share`` of the clean-corrupted gap, and by ``min_z`` standard errors
    of the corrupted mean (``settings["low_sd"]`` over the corrupted copies,
    when the trace recorded it). A flat row, such as the Eiffel Tower's last
    subject token ' Tower' whose MLP effect sits on ' iffel' instead, gets no
    suggestion and a reason that says so.
    """
    if mlp.kind != "mlp":
        raise ValueError(f"Layer suggestions read the MLP trace, not {mlp.kind!r}.")
    token = mlp.subject_range[1] - 1
    row = np.asarray(mlp.scores[token], dtype=np.float64)
    if np.isnan(row).all():
        return LayerSuggestion(None, token, -1, math.nan, math.nan, "The last subject token's row was not traced.")
    peak = int(np.nanargmax(row))
    effect = float(row[peak]) - mlp.low_score
    gap = mlp.high_score - mlp.low_score
    copies = int(mlp.settings.get("copies") or mlp.settings.get("samples") or 1)
    noise = float(mlp.settings.get("low_sd") or 0.0) / math.sqrt(max(copies, 1))
    needed = max(min_share * gap, min_z * noise, 0.0)
    name = mlp.tokens[token]
    if gap > 0 and effect >= needed:
        reason = (f"The MLP effect at the last subject token {name!r} peaks at layer {peak} "
                  f"(+{effect:.3g} over the corrupted run, {effect / gap:.0%} of the clean-corrupted gap).")
        return LayerSuggestion(peak, token, peak, effect, needed, reason)
    where = ""
    if not np.isnan(mlp.scores).all():
        best_token, best_layer = mlp.peak()
        if best_token != token:
            where = f" The MLP effect is largest at {mlp.tokens[best_token]!r} (layer {best_layer})."
    reason = (f"No layer stands out: the MLP effect at the last subject token {name!r} is at most {effect:+.3g} "
              f"(layer {peak}), below the {needed:.3g} a suggestion needs (max of {min_share:.0%} of the "
              f"clean-corrupted gap and {min_z:g} standard errors of the corrupted runs).{where} "
              "Sweep the layers to see where an edit works.")
    return LayerSuggestion(None, token, peak, effect, needed, reason)

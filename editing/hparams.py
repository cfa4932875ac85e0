"""ROME hyperparameters: one JSON file per model family under ``assets/hparams/``.

Each file names the models it fits (``match``: hub ids or their last path part,
compared case-insensitively) and sets any of the :class:`ROMEHyperParams`
fields; fields it leaves out keep the dataclass defaults (the paper's GPT-2 XL
settings). ``default.json`` is the fallback for models no file matches: the
edit layer is then a fraction of the depth. Unknown keys fail loudly.

Example::

    hp = load_hparams(lm)                     # assets/hparams/smollm2-135m.json for the default model
    hp.edit_layer(lm.n_layers)                # 1 (chosen by a layer sweep, see the file)
    hp = load_hparams(lm, v_num_grad_steps=10) # overrides, checked like the file's keys
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tracing.assets import HPARAMS

log = logging.getLogger(__name__)

HPARAMS_DIR = HPARAMS
VARIANTS = ("r-rome", "original", "exact")
_META_KEYS = ("description", "match")


@dataclass(frozen=True)
class ROMEHyperParams:
    """Settings of one ROME edit (defaults: the paper's GPT-2 XL settings)."""

    layer: int | None = None  # edit layer l*; None: int(layer_fraction * n_layers)
    layer_fraction: float = 0.334  # where the edit goes when no layer is set
    # v* optimisation (paper §3.1, eq. 4)
    v_num_grad_steps: int = 20  # Adam steps on delta
    v_lr: float = 0.5  # Adam learning rate
    v_weight_decay: float = 0.5  # weight of ||delta|| / ||v_init||^2
    clamp_norm_factor: float = 4.0  # ||delta|| <= factor * ||v_init||
    kl_factor: float = 0.0625  # weight of the essence-drift KL term
    kl_prompt: str = "{} is a"  # the KL term's prompt, {} = subject
    early_stop_loss: float = 0.05  # stop once the total loss is below this
    early_stop_nll: float = 0.0  # also stop once the NLL term alone is below this (0: off, as in the paper)
    # Context templates: (tokens, count) pairs of texts sampled from the model, prepended to the prompt
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_top_k: int = 5  # top-k sampling of the templates
    context_seed: int = 0
    # The update
    variant: str = "r-rome"  # "r-rome": one averaged key k* throughout; "original": the paper code's bare-prompt key;
    # "exact": r-rome, with each prompt's δ scaled during the optimisation as the update will scale it
    mom2_adjustment: bool = True  # use C^-1 k*; False: plain k* direction (no statistics)
    stats_ridge: float = 0.0  # C + ridge * mean(diag C) * I before solving
    # Key statistics C = E[k k^T]
    stats_corpus: str = "model"  # "model" (text sampled from the model), "file:PATH" or "hf:NAME[:CONFIG]"
    stats_tokens: int = 100_000  # corpus size in tokens
    stats_seed: int = 0  # seed of the sampled corpus
    stats_sample_length: int = 256  # tokens per sampled document
    stats_top_k: int = 0  # top-k of the corpus sampling; 0 = the full distribution
    description: str = field(default="", compare=False)
    match: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        problems = []
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            problems.append(f"layer must be a non-negative integer or null, not {self.layer!r}")
        if not 0.0 <= self.layer_fraction <= 1.0:
            problems.append(f"layer_fraction must lie in [0, 1], not {self.layer_fraction}")
        if self.v_num_grad_steps < 1:
            problems.append("v_num_grad_steps must be at least 1")
        if self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            problems.append("v_lr and clamp_norm_factor must be positive")
        if self.v_weight_decay < 0 or self.kl_factor < 0 or self.stats_ridge < 0 or self.early_stop_nll < 0:
            problems.append("v_weight_decay, kl_factor and stats_ridge must not be negative")
        if self.kl_prompt.count("{}") != 1:
            problems.append(f"kl_prompt needs exactly one {{}} for the subject, got {self.kl_prompt!r}")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if any(len(pair) != 2 or pair[0] < 1 or pair[1] < 0 for pair in self.context_templates):
            problems.append(f"context_templates must be [tokens >= 1, count >= 0] pairs, got {self.context_templates}")
        if self.stats_tokens < 1 or self.stats_sample_length < 2:
            problems.append("stats_tokens must be positive and stats_sample_length at least 2")
        if problems:
            raise ValueError("Invalid ROME hyperparameters: " + "; ".join(problems) + ".")

    def edit_layer(self, n_layers: int) -> int:
        """The edit layer for a model with ``n_layers`` blocks (``layer``, else the fraction of the depth)."""
        layer = self.layer if self.layer is not None else min(n_layers - 1, int(self.layer_fraction * n_layers))
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"Edit layer {layer} is out of range for a model with {n_layers} layers; "
                f"choose a layer from 0 to {n_layers - 1}."
            )
        return layer

    def to_dict(self) -> dict:
        """JSON-serialisable fields (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["context_templates"] = [list(p) for p in self.context_templates]
        data["match"] = list(self.match)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "hyperparameters") -> "ROMEHyperParams":
        """Build from a dict; unknown keys raise a ValueError that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown ROME hyperparameter(s) {unknown} in {source}. Known keys: {', '.join(sorted(known))}."
            )
        values = dict(data)
        if "context_templates" in values:
            values["context_templates"] = tuple(tuple(int(x) for x in pair) for pair in values["context_templates"])
        if "match" in values:
            values["match"] = tuple(values["match"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"Malformed ROME hyperparameters in {source}: {exc}") from None


def _model_names(lm_or_name) -> list[str]:
    """Names a model goes by: its display name, its config's path, and their last path parts."""
    if lm_or_name is None:
        return []
    if isinstance(lm_or_name, str):
        names = [lm_or_name]
    else:
        names = [getattr(lm_or_name, "name", "")]
        config = getattr(lm_or_name, "config", None)
        names.append(getattr(config, "_name_or_path", "") or "")
    out = []
    for name in names:
        if name:
            name = str(name).rstrip("/")
            out += [name.lower(), name.split("/")[-1].lower()]
    return out


def hparams_files(directory: Path = HPARAMS_DIR) -> list[Path]:
    """The hyperparameter files shipped in ``assets/hparams`` (default.json last)."""
    files = sorted(p for p in directory.glob("*.json") if p.name != "default.json")
    return files + [directory / "default.json"]


def read_hparams_file(path: str | Path, **overrides) -> ROMEHyperParams:
    """Load one hyperparameter JSON file on top of the defaults, then apply ``overrides``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"Cannot read hyperparameter file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"Hyperparameter file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Hyperparameter file {path} must hold a JSON object.")
    data.update(overrides)
    return ROMEHyperParams.from_dict(data, source=str(path))


def load_hparams(lm_or_name=None, path: str | Path | None = None, **overrides) -> ROMEHyperParams:
    """The hyperparameters for a model (a LoadedModel or a name), or from an explicit file.

    Example::

        hp = load_hparams(lm)                       # matched by name, else assets/hparams/default.json
        hp = load_hparams("gpt2-xl").layer          # 17
        hp = load_hparams(lm, layer=6, variant="original")
    """
    if path is not None:
        return read_hparams_file(path, **overrides)
    names = set(_model_names(lm_or_name))
    for file in hparams_files():
        try:
            match = json.loads(file.read_text(encoding="utf-8")).get("match", [])
        except (OSError, ValueError, AttributeError):
            raise ValueError(f"Hyperparameter file {file} is unreadable or not a JSON object; fix or remove it.") from None
        if file.name == "default.json" or names & {m.lower() for m in match}:
            log.debug("ROME hyperparameters for %s from %s", sorted(names), file.name)
            return read_hparams_file(file, **overrides)
    raise LookupError(f"{HPARAMS_DIR / 'default.json'} is missing; restore it from the repository.")

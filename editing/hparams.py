"""Hyperparameters of every editing method: JSON files under ``assets/hparams/``, one per model family.

ROME's files sit in ``assets/hparams/`` itself, the other methods' in
``assets/hparams/<method>/`` (``ft``, ``ft-l``, ``kn``, ``memit``). Each file
names the models it fits (``match``: hub ids or their last path part, compared
case-insensitively), says where its values come from (``description``) and
sets any fields of the method's dataclass (:class:`ROMEHyperParams`,
:class:`FTHyperParams`, :class:`KNHyperParams`, :class:`MEMITHyperParams`);
fields it leaves out keep the dataclass defaults (the paper's GPT-2 XL
settings). ``default.json`` is the
fallback for models no file matches. Unknown keys fail loudly.

Example::

    hp = load_hparams(lm)                     # assets/hparams/smollm2-135m.json for the default model
    hp.edit_layer(lm.n_layers)                # 1 (chosen by a layer sweep, see the file)
    hp = load_hparams(lm, v_num_grad_steps=10) # overrides, checked like the file's keys
    ft = load_hparams(lm, method="ft-l")      # assets/hparams/ft-l/smollm2-135m.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tracing.assets import HPARAMS

log = logging.getLogger(__name__)

HPARAMS_DIR = HPARAMS
VARIANTS = ("r-rome", "original", "exact", "bare", "guarded")
METHODS = ("rome", "ft", "ft-l", "kn", "memit")  # ROME, fine-tuning, constrained fine-tuning, Knowledge Neurons,
# MEMIT (many facts at once)
_META_KEYS = ("description", "match")


def _tuples(value):
    """JSON lists (nested) as tuples, for frozen dataclass fields."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class HyperParams:
    """What every method's settings share: JSON round trips that refuse unknown keys."""

    LABEL: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """JSON-serialisable fields (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def settings(self) -> dict:
        """:meth:`to_dict` without the notes (``description``, ``match``): what an edit's result depends on."""
        return {k: v for k, v in self.to_dict().items() if k not in _META_KEYS}

    @classmethod
    def from_dict(cls, data: dict, source: str = "hyperparameters"):
        """Build from a dict; unknown keys raise a ValueError that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown {cls.LABEL} hyperparameter(s) {unknown} in {source}. Known keys: {', '.join(sorted(known))}."
            )
        tuple_fields = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        values = {k: (_tuples(v) if k in tuple_fields else v) for k, v in data.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"Malformed {cls.LABEL} hyperparameters in {source}: {exc}") from None

    def edit_layer(self, n_layers: int) -> int:
        """The edit layer for a model with ``n_layers`` blocks (``layer``, else the fraction of the depth)."""
        layer = self.layer if self.layer is not None else min(n_layers - 1, int(self.layer_fraction * n_layers))
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"Edit layer {layer} is out of range for a model with {n_layers} layers; "
                f"choose a layer from 0 to {n_layers - 1}."
            )
        return layer


@dataclass(frozen=True)
class ROMEHyperParams(HyperParams):
    """Settings of one ROME edit (defaults: the paper's GPT-2 XL settings)."""

    LABEL: ClassVar[str] = "ROME"

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
    # "exact": r-rome, with each prompt's δ scaled during the optimisation as the update will scale it;
    # "bare": the closed form with the bare prompt's own key throughout (u = C⁻¹k₀), δ written exactly there;
    # "guarded": "original", or "bare" for the same δ where the original update is flagged as far outside
    # the model's usual edits (editing.methods.outliers) or its ‖ΔW‖ is above fallback_factor times their median
    fallback_factor: float = 5.0  # "guarded": write the bare key's update above this multiple of the reference
    # median ‖ΔW‖ at the layer (assets/update_norms.json; 5 = only where the update is flagged)
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
        if not self.fallback_factor > 0:
            problems.append(f"fallback_factor must be positive, not {self.fallback_factor!r}")
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


@dataclass(frozen=True)
class FTHyperParams(HyperParams):
    """Fine-tuning one layer's MLP down-projection on the rewrite prompt (FT), optionally under an L∞ bound (FT+L).

    Defaults: the paper code's GPT-2 XL FT settings (kmeng01/rome,
    hparams/FT/gpt2-xl_unconstr.json: layer 1, Adam, lr 5e-4, 25 steps, stop
    once the loss is below 1e-2); its FT+L (gpt2-xl_constr.json) uses layer 0
    and ``norm_constraint`` 5e-4, an absolute bound on every element of ΔW
    (Zhu et al., 2020).
    """

    LABEL: ClassVar[str] = "FT"

    layer: int | None = 1  # the fine-tuned layer; None: int(layer_fraction * n_layers)
    layer_fraction: float = 0.0  # where the edit goes when no layer is set
    num_steps: int = 25  # Adam steps at most
    lr: float = 5e-4  # Adam learning rate
    norm_constraint: float | None = None  # FT+L: |ΔW_ij| <= this after every step; None: unconstrained (FT)
    early_stop_loss: float = 1e-2  # stop once the new object's mean token NLL on the rewrite prompt is below this
    description: str = field(default="", compare=False)
    match: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        problems = []
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            problems.append(f"layer must be a non-negative integer or null, not {self.layer!r}")
        if not 0.0 <= self.layer_fraction <= 1.0:
            problems.append(f"layer_fraction must lie in [0, 1], not {self.layer_fraction}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            problems.append("num_steps must be a positive integer")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            problems.append("norm_constraint must be positive, or null for unconstrained fine-tuning")
        if self.early_stop_loss < 0:
            problems.append("early_stop_loss must not be negative")
        if problems:
            raise ValueError("Invalid FT hyperparameters: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class KNHyperParams(HyperParams):
    """Knowledge Neurons (Dai et al., 2022) as the ROME paper ran it (its code's hparams/KN/gpt2-xl.json).

    Integrated gradients of p(old object) with respect to every MLP neuron's
    activation at the prompt's last token (``steps`` points from 0 to the
    actual activation); neurons scoring above ``adaptive_threshold`` times the
    top score are kept (one prompt, so no refining across prompts); each kept
    neuron's value vector loses ``erase_scale`` times the input embedding of
    the model's predicted first token and gains ``write_scale`` times the
    embeddings of the new object's tokens (the knowledge-neurons library's
    2 and 1).
    """

    LABEL: ClassVar[str] = "KN"

    steps: int = 20  # integrated-gradient points per neuron
    batch_size: int = 20  # of those, run in one pass; must divide steps
    adaptive_threshold: float = 0.2  # keep neurons above this fraction of the top attribution
    erase_scale: float = 2.0  # weight of the predicted token's embedding taken from each kept value vector
    write_scale: float = 1.0  # weight of the new object's token embeddings added to it
    layers: tuple[int, ...] = ()  # where to look for neurons; (): every layer, as in the paper
    description: str = field(default="", compare=False)
    match: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        problems = []
        if not isinstance(self.steps, int) or self.steps < 2:
            problems.append("steps must be an integer of at least 2")
        if not isinstance(self.batch_size, int) or self.batch_size < 1 or self.steps % self.batch_size:
            problems.append(f"batch_size must be a positive divisor of steps ({self.steps}), not {self.batch_size!r}")
        if not 0.0 < self.adaptive_threshold <= 1.0:
            problems.append(f"adaptive_threshold must lie in (0, 1], not {self.adaptive_threshold}")
        if self.erase_scale < 0 or self.write_scale < 0:
            problems.append("erase_scale and write_scale must not be negative")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers):
            problems.append(f"layers must be non-negative integers, not {list(self.layers)}")
        if problems:
            raise ValueError("Invalid KN hyperparameters: " + "; ".join(problems) + ".")

    def search_layers(self, n_layers: int) -> tuple[int, ...]:
        """The layers searched for neurons in a model with ``n_layers`` blocks."""
        layers = self.layers or tuple(range(n_layers))
        bad = [x for x in layers if x >= n_layers]
        if bad:
            raise ValueError(f"KN layers {bad} are out of range: the model has layers 0 to {n_layers - 1}.")
        return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class MEMITHyperParams(HyperParams):
    """MEMIT (Meng et al., 2023): a batch of facts written into a range of MLP layers.

    Defaults: the paper code's GPT-2 XL settings (kmeng01/memit,
    hparams/MEMIT/gpt2-xl.json: layers 13-17 of 48, target vectors optimised at
    the last of them with 20 Adam steps at lr 0.5, clamp 0.75 of the residual's
    norm, weight decay 0.5, KL 0.0625, five sampled context texts of 10 tokens,
    ``mom2_update_weight`` λ = 20000). λ weighs the preserved keys' second
    moment C against the batch's keys (``(λC + KKᵀ)``) and has to grow with the
    key width: GPT-J (16384 keys) used 15000. The null-space fields are
    AlphaEdit's (Fang et al., 2025), used by sequential edits with the
    projection (:mod:`editing.sequential`).
    """

    LABEL: ClassVar[str] = "MEMIT"

    layers: tuple[int, ...] = ()  # the edited layers, ascending; (): `span` consecutive layers ending at
    # int(layer_fraction * n_layers)
    layer_fraction: float = 0.355  # GPT-2 XL: int(0.355 * 48) = 17
    span: int = 5  # how many layers when `layers` is empty
    # Target vectors z = h + δ at the last layer's output (paper eq. 16, optimised as ROME's v*)
    v_num_grad_steps: int = 20  # Adam steps on each δ
    v_lr: float = 0.5  # Adam learning rate
    v_weight_decay: float = 0.5  # weight of ||δ|| / ||h||^2
    clamp_norm_factor: float = 0.75  # ||δ|| <= factor * ||h|| (h: the residual stream at the last subject token)
    kl_factor: float = 0.0625  # weight of the essence-drift KL term
    kl_prompt: str = "{} is a"  # the KL term's prompt, {} = subject
    early_stop_loss: float = 0.05  # a fact's δ stops once its total loss is below this
    early_stop_nll: float = 0.0  # also once its NLL alone is below this (0: off, as in the paper)
    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)  # (tokens, count) of sampled context texts
    context_top_k: int = 5
    context_seed: int = 0
    # The update of each layer: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹, R the residual spread over the layers left
    mom2_update_weight: float = 20000.0  # λ
    # Key statistics C = E[k kᵀ] (as ROME's)
    stats_corpus: str = "model"
    stats_tokens: int = 100_000
    stats_seed: int = 0
    stats_sample_length: int = 256
    stats_top_k: int = 0
    # The projection (AlphaEdit; compute_memit(project=True), sequential edits): updates only along directions
    # that earlier edits' keys do not use and, with a threshold, that C hardly uses
    nullspace_threshold: float | None = None  # eigen-directions of C below this × the mean eigenvalue; None: all
    projection_l2: float = 10.0  # AlphaEdit's ridge L2, in units of C's mean eigenvalue
    description: str = field(default="", compare=False)
    match: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        problems = []
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers):
            problems.append(f"layers must be non-negative integers, not {list(self.layers)}")
        elif list(self.layers) != sorted(set(self.layers)):
            problems.append(f"layers must be ascending without repeats, not {list(self.layers)}")
        if not 0.0 <= self.layer_fraction <= 1.0:
            problems.append(f"layer_fraction must lie in [0, 1], not {self.layer_fraction}")
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1:
            problems.append("span must be a positive integer")
        if not isinstance(self.v_num_grad_steps, int) or self.v_num_grad_steps < 1:
            problems.append("v_num_grad_steps must be at least 1")
        if self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            problems.append("v_lr and clamp_norm_factor must be positive")
        if self.v_weight_decay < 0 or self.kl_factor < 0 or self.early_stop_nll < 0:
            problems.append("v_weight_decay, kl_factor and early_stop_nll must not be negative")
        if self.kl_prompt.count("{}") != 1:
            problems.append(f"kl_prompt needs exactly one {{}} for the subject, got {self.kl_prompt!r}")
        if any(len(pair) != 2 or pair[0] < 1 or pair[1] < 0 for pair in self.context_templates):
            problems.append(f"context_templates must be [tokens >= 1, count >= 0] pairs, got {self.context_templates}")
        if not self.mom2_update_weight > 0:
            problems.append("mom2_update_weight must be positive")
        if self.stats_tokens < 1 or self.stats_sample_length < 2:
            problems.append("stats_tokens must be positive and stats_sample_length at least 2")
        if (self.nullspace_threshold is not None and not self.nullspace_threshold > 0) or not self.projection_l2 >= 0:
            problems.append("nullspace_threshold must be positive (or null) and projection_l2 not negative")
        if problems:
            raise ValueError("Invalid MEMIT hyperparameters: " + "; ".join(problems) + ".")

    def edit_layers(self, n_layers: int) -> tuple[int, ...]:
        """The edited layers of a model with ``n_layers`` blocks (``layers``, else ``span`` ending at the fraction)."""
        if self.layers:
            layers = tuple(self.layers)
        else:
            last = min(n_layers - 1, int(self.layer_fraction * n_layers))
            layers = tuple(range(max(0, last - self.span + 1), last + 1))
        bad = [x for x in layers if x >= n_layers]
        if bad:
            raise ValueError(f"MEMIT layers {bad} are out of range: the model has layers 0 to {n_layers - 1}.")
        return layers

    def edit_layer(self, n_layers: int) -> int:
        """The last edited layer, where the target vectors are set."""
        return self.edit_layers(n_layers)[-1]


HPARAMS_CLASSES: dict[str, type[HyperParams]] = {
    "rome": ROMEHyperParams, "ft": FTHyperParams, "ft-l": FTHyperParams, "kn": KNHyperParams,
    "memit": MEMITHyperParams}


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ValueError that lists them."""
    if method not in METHODS:
        raise ValueError(f"Unknown editing method {method!r}; choose one of {', '.join(METHODS)}.")
    return method


def method_dir(method: str = "rome") -> Path:
    """Where a method's hyperparameter files live: ``assets/hparams`` for ROME, else ``assets/hparams/<method>``."""
    return HPARAMS_DIR if check_method(method) == "rome" else HPARAMS_DIR / method


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


def hparams_files(directory: Path | None = None, *, method: str = "rome") -> list[Path]:
    """A method's shipped hyperparameter files, default.json last (see :func:`method_dir`)."""
    directory = method_dir(method) if directory is None else Path(directory)
    files = sorted(p for p in directory.glob("*.json") if p.name != "default.json")
    return files + [directory / "default.json"]


def read_hparams_file(path: str | Path, *, method: str = "rome", **overrides) -> HyperParams:
    """Load one hyperparameter JSON file of ``method`` on top of the defaults, then apply ``overrides``."""
    cls = HPARAMS_CLASSES[check_method(method)]
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
    return cls.from_dict(data, source=str(path))


def load_hparams(lm_or_name=None, path: str | Path | None = None, *, method: str = "rome", **overrides) -> HyperParams:
    """The hyperparameters of ``method`` for a model (a LoadedModel or a name), or from an explicit file.

    Example::

        hp = load_hparams(lm)                       # ROME: matched by name, else assets/hparams/default.json
        hp = load_hparams("gpt2-xl").layer          # 17
        hp = load_hparams(lm, layer=6, variant="original")
        hp = load_hparams(lm, method="kn")          # KNHyperParams from assets/hparams/kn/
    """
    if path is not None:
        return read_hparams_file(path, method=method, **overrides)
    names = set(_model_names(lm_or_name))
    files = hparams_files(method=method)
    for file in files:
        if not file.is_file():
            continue
        try:
            match = json.loads(file.read_text(encoding="utf-8")).get("match", [])
        except (OSError, ValueError, AttributeError):
            raise ValueError(f"Hyperparameter file {file} is unreadable or not a JSON object; fix or remove it.") from None
        if file.name == "default.json" or names & {m.lower() for m in match}:
            log.debug("%s hyperparameters for %s from %s", method, sorted(names), file.name)
            return read_hparams_file(file, method=method, **overrides)
    raise LookupError(f"{files[-1]} is missing; restore it from the repository.")

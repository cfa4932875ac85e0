"""Models of a real shape with random weights: timing and memory without downloading anything.

A trace's or an edit's cost depends on a model's shape (layers, widths,
heads, vocabulary), not on its weights. ``assets/shapes/`` ships a few
shapes as small ``config.json`` files -- the embedded default
(``smollm2-135m``), ``gpt2-xl``, ``gpt-j-6b`` and ``llama-3-8b`` -- beside the
default model's tokenizer, so that "how long would GPT-J take on my GPU?" has
an answer before 24 GB of weights are fetched. No weights, no GGUF package
and no hub are needed.

Example::

    lm = random_model("gpt2-xl", device="cuda", dtype="bf16")   # 1.56 B random parameters
    lm = random_model("path/to/config.json")                     # any supported family
    shape_names()                                                # ('gpt-j-6b', 'gpt2-xl', ...)

Every shape uses the default model's tokenizer (49,152 tokens; each id fits
every shipped vocabulary), so the prompts and their token counts are the
default model's; the unembedding keeps the shape's own vocabulary size.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from . import assets
from .models import DEFAULT_MODEL, LoadedModel, arch_spec, default_device, parse_dtype
from .loading import prepare_model

log = logging.getLogger(__name__)

SHAPES = assets.SHAPES
TOKENIZER = SHAPES / "tokenizer"  # the default model's tokenizer files (tokenizer.json, tokenizer_config.json)
DEFAULT_SHAPE = "smollm2-135m"


def shape_names() -> tuple[str, ...]:
    """Names of the shipped shapes (the ``*.json`` files under ``assets/shapes/``)."""
    return tuple(sorted(p.stem for p in SHAPES.glob("*.json")))


def shape_path(name: str | os.PathLike | None = None) -> Path:
    """The ``config.json`` of a shipped shape, a local model folder, or a config file; None: the default's shape."""
    if name is None or str(name) in ("", "default", DEFAULT_MODEL):
        name = DEFAULT_SHAPE
    if str(name) in shape_names():
        return SHAPES / f"{name}.json"
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    raise LookupError(
        f"No model shape {str(name)!r}: name a shipped shape ({', '.join(shape_names())}), a local model "
        f"folder with a config.json, or a config.json file. To add a shape, put its config.json in {SHAPES} "
        "as NAME.json."
    )


def shipped_tokenizer():
    """The default model's tokenizer from ``assets/shapes/tokenizer`` (no GGUF, no hub)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def random_model(
    shape: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A model of ``shape`` with the family's random initialisation, built on ``device`` directly.

    Example::

        lm = random_model("llama-3-8b", device="cuda", dtype="bf16")
        lm.n_layers, lm.n_params          # 32, 8.03e9

    The weights are seeded (``seed``) without touching the global random
    state; ``lm.name`` says the weights are random.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = shape_path(shape)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read the model shape {path}: {exc}") from None
    if "model_type" not in data:
        raise ValueError(f"{path} has no model_type; it is not a Hugging Face config.json.")
    arch_spec(data["model_type"])  # unsupported families fail here, with the list of supported ones
    config = AutoConfig.for_model(**data)
    torch_dtype = parse_dtype(dtype)
    target = torch.device(device) if device is not None else default_device()
    devices = [target] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with target:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    name = f"{path.stem if path.name != 'config.json' else path.parent.name} (random weights)"
    lm = prepare_model(model, shipped_tokenizer(), name)
    log.info("Built %s (%.0fM random parameters) on %s in %s", name, lm.n_params / 1e6, target, torch_dtype)
    return lm

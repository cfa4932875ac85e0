"""Key statistics C = E[k kᵀ] of an MLP down-projection's inputs, computed offline and cached.

ROME's update direction is C⁻¹k*: the rank-one change is spread along the
directions that other keys use least, so other facts are disturbed least. The
paper estimates C on Wikipedia; offline, the default corpus is text sampled
from the model itself (seeded), which needs nothing but the model. A text file
(``file:PATH``) or a Hugging Face dataset (``hf:NAME[:CONFIG]``, where the hub
is reachable and ``datasets`` is installed) can be used instead.

Work is done once and reused: the sampled corpus (token ids) and each layer's
second moment are cached on disk under ``cache_dir()/stats/<model
fingerprint>/<corpus>-<tokens>/``, written atomically, so an interrupted run
leaves no corrupt file. While the corpus is sampled, the keys of the requested
layers are accumulated on the fly (no second pass); other layers later run the
cached corpus through the model up to that layer only. Sampling is the slow
part (minutes on a CPU), so the embedded default model's 100k-token corpus
ships in ``assets/stats/`` (400 KB of token ids, made with ``--ship``): on a
fresh machine a layer's statistics then cost one pass over it up to that layer.

Example::

    spec = StatsSpec(n_tokens=100_000)            # or StatsSpec.from_hparams(load_hparams(lm))
    stats = key_stats(lm, 9, spec)                # computes (minutes) or loads (milliseconds)
    stats.mom2.shape                              # (d_ff, d_ff), float64
    stats.solve(k)                                # C⁻¹ k for a key k of shape (d_ff,)

Command line (precompute, e.g. when building a Space)::

    python -m editing.stats                       # default model, its edit layer, 100k sampled tokens
    python -m editing.stats --layers 4 6 8 --tokens 20000
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracing.hooks import Hook, StopForward, hooks, until_stopped
from tracing.assets import STATS
from tracing.models import LoadedModel, cache_dir

from ..applying import original_weights
from ..hparams import ROMEHyperParams
from ..progress import Progress
from ..sampling import decode, start_token_id

log = logging.getLogger(__name__)

_FACTORS: dict[tuple, torch.Tensor] = {}  # Cholesky factors keyed by (stats file, mtime, ridge, device)
_FACTORS_MAX = 8
SHIPPED = STATS
CHUNK_ROWS = 4096  # keys buffered per layer before one fp32 product is added to the fp64 sum


@dataclass(frozen=True)
class StatsSpec:
    """Which corpus the statistics come from, and how much of it."""

    corpus: str = "model"  # "model", "file:PATH" or "hf:NAME[:CONFIG]"
    n_tokens: int = 100_000
    seed: int = 0  # sampling seed ("model" corpus)
    sample_length: int = 256  # tokens per document
    top_k: int = 0  # sampling top-k, 0 = full distribution ("model" corpus)
    batch_rows: int = 64  # documents per forward pass (part of a sampled corpus's identity)
    model_key: str | None = None  # cache under this model identity instead of lm.fingerprint (e.g. a bf16 copy
    # reusing its fp32 original's statistics)

    def __post_init__(self):
        if self.n_tokens < 1 or self.sample_length < 2 or self.batch_rows < 1:
            raise ValueError("StatsSpec needs n_tokens >= 1, sample_length >= 2 and batch_rows >= 1.")
        kind = self.corpus.split(":", 1)[0]
        if kind not in ("model", "file", "hf") or (kind == "model" and self.corpus != "model"):
            raise ValueError(
                f"Unknown statistics corpus {self.corpus!r}; use 'model' (text sampled from the model), "
                "'file:PATH' (a UTF-8 text file) or 'hf:NAME[:CONFIG]' (a Hugging Face dataset)."
            )

    @classmethod
    def from_hparams(cls, hp: ROMEHyperParams, **changes) -> "StatsSpec":
        values = dict(corpus=hp.stats_corpus, n_tokens=hp.stats_tokens, seed=hp.stats_seed,
                      sample_length=hp.stats_sample_length, top_k=hp.stats_top_k)
        values.update(changes)
        return cls(**values)

    def corpus_key(self) -> str:
        """A file-name-safe identity of the corpus (contents for files, settings for sampling)."""
        kind, _, rest = self.corpus.partition(":")
        if kind == "model":
            return f"model-s{self.seed}-k{self.top_k}-len{self.sample_length}-b{self.batch_rows}"
        if kind == "file":
            path = Path(rest)
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            except OSError as exc:
                raise ValueError(f"Cannot read the statistics corpus file {path}: {exc}") from None
            return f"file-{digest}-len{self.sample_length}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rest)
        return f"hf-{safe}-len{self.sample_length}"


@dataclass(frozen=True, eq=False)
class KeyStats:
    """The uncentred second moment of one layer's down-projection inputs.

    ``mom2``: (d_in, d_in) float64, ``E[k kᵀ]`` over ``count`` tokens.
    """

    layer: int
    mom2: np.ndarray
    count: int
    corpus: str
    model: str
    path: str = ""

    def solve(self, key: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
        """C⁻¹ key in float64 (via a cached Cholesky factor); key: (d_in,) -> (d_in,)."""
        device = key.device
        mtime = os.stat(self.path).st_mtime_ns if self.path and os.path.exists(self.path) else id(self.mom2)
        cache_key = (self.path or id(self), mtime, float(ridge), str(device))
        factor = _FACTORS.get(cache_key)
        if factor is None:
            c = torch.from_numpy(self.mom2).to(device=device, dtype=torch.float64)
            if ridge:
                c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], device=device, dtype=c.dtype)
            factor, info = torch.linalg.cholesky_ex(c)
            if int(info) != 0:
                jitter = 1e-6 * float(c.diagonal().mean())
                log.warning("Key statistics of layer %d are not positive definite; adding %.2e to the diagonal",
                            self.layer, jitter)
                factor = torch.linalg.cholesky(c + jitter * torch.eye(c.shape[0], device=device, dtype=c.dtype))
            if len(_FACTORS) >= _FACTORS_MAX:
                _FACTORS.pop(next(iter(_FACTORS)))
            _FACTORS[cache_key] = factor
        k = key.to(torch.float64).reshape(-1, 1)
        return torch.cholesky_solve(k, factor)[:, 0]


# ---------------------------------------------------------------------------
# Paths and files


def stats_dir(lm: LoadedModel, spec: StatsSpec) -> Path:
    """Where one model's statistics for one corpus live."""
    return cache_dir() / "stats" / _folder(lm, spec)


def shipped_corpus_path(lm: LoadedModel, spec: StatsSpec) -> Path:
    """Where the project ships a sampled corpus (the default model's, made by ``python -m editing.stats --ship``)."""
    return SHIPPED / _folder(lm, spec) / "corpus.safetensors"


def _folder(lm: LoadedModel, spec: StatsSpec) -> Path:
    """<model identity>/<corpus>-<tokens>: the same below the cache and below assets/stats/."""
    return Path(spec.model_key or lm.fingerprint) / f"{spec.corpus_key()}-{spec.n_tokens}"


def stats_path(lm: LoadedModel, layer: int, spec: StatsSpec) -> Path:
    return stats_dir(lm, spec) / f"layer{layer}.safetensors"


def _save_atomic(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_stats(path: Path, layer: int) -> KeyStats | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            mom2 = f.get_tensor("mom2")
        count = int(meta["count"])
    except Exception as exc:  # missing or unreadable cache: recompute
        if path.exists():
            log.warning("Ignoring unreadable statistics file %s (%s)", path, exc)
        return None
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or not np.isfinite(mom2).all():
        log.warning("Ignoring malformed statistics file %s", path)
        return None
    return KeyStats(layer=layer, mom2=mom2.astype(np.float64), count=count, corpus=meta.get("corpus", ""),
                    model=meta.get("model", ""), path=str(path))


def _load_corpus(path: Path) -> np.ndarray | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor("ids").astype(np.int64)
    except Exception:
        return None


# ---------------------------------------------------------------------------
# Accumulation


class _Moments:
    """Running sums of k kᵀ per layer: fp32 products of buffered chunks, added into fp64."""

    def __init__(self, layers: Sequence[int], chunk: int | None = None):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts = {layer: 0 for layer in layers}
        self.buffers: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.buffered = {layer: 0 for layer in layers}
        self.chunk = chunk or CHUNK_ROWS

    def add(self, layer: int, keys: torch.Tensor) -> None:
        keys = keys.detach().reshape(-1, keys.shape[-1]).float()  # (n, d_in)
        self.buffers[layer].append(keys)
        self.buffered[layer] += keys.shape[0]
        if self.buffered[layer] >= self.chunk:
            self.flush(layer)

    def flush(self, layer: int) -> None:
        if not self.buffers[layer]:
            return
        x = torch.cat(self.buffers[layer])  # (n, d_in)
        self.buffers[layer], self.buffered[layer] = [], 0
        product = (x.T @ x).double()  # (d_in, d_in)
        # Out of place: the sums may be inference tensors (made inside a decoding loop) used outside it.
        self.sums[layer] = self.sums[layer] + product if layer in self.sums else product
        self.counts[layer] += x.shape[0]

    def result(self, layer: int) -> tuple[np.ndarray, int]:
        self.flush(layer)
        count = self.counts[layer]
        if count == 0:
            raise ValueError("The statistics corpus produced no tokens; use a longer text or more tokens.")
        return (self.sums[layer] / count).cpu().numpy(), count


def _key_hook(lm: LoadedModel, layer: int, moments: _Moments, skip_first: bool, state: dict) -> Hook:
    """Pre-hook on the down-projection of ``layer`` adding its inputs (all rows, all positions) to ``moments``."""

    def record(module, args, kwargs):
        if state.get("skip"):
            return None
        x = args[0] if args else kwargs["input"]  # (rows, tokens, d_in)
        moments.add(layer, x[:, 1:] if skip_first else x)
        if state.get("stop_after") == layer:
            raise StopForward
        return None

    return Hook(lm.module_name("down_proj", layer), record, pre=True)


def _sample_corpus(lm: LoadedModel, spec: StatsSpec, moments: _Moments, layers: Sequence[int],
                   progress: Progress | None, partial: Path) -> tuple[np.ndarray, int]:
    """Sample the corpus in batches with a KV cache, accumulating the keys of ``layers`` on the fly.

    Returns the ids (rows, L+1) and how many leading rows were sampled by an
    earlier, interrupted run (their keys still need a prefill pass). After
    every batch the ids so far and the generator's state are saved to
    ``partial`` (atomically), so an interrupted run resumes where it stopped
    and samples exactly the same corpus.
    """
    length = spec.sample_length
    rows = math.ceil(spec.n_tokens / length)
    batches = math.ceil(rows / spec.batch_rows)
    per_batch = math.ceil(rows / batches)
    generator = torch.Generator(device=lm.device).manual_seed(int(spec.seed))
    start = start_token_id(lm.tokenizer)
    corpus: list[np.ndarray] = []
    first_batch = 0
    resumed = _load_partial(partial, spec)
    if resumed is not None:
        ids_done, generator_state, first_batch = resumed
        generator.set_state(torch.from_numpy(generator_state))
        corpus.append(ids_done)
        log.info("Resuming the statistics corpus after %d of %d documents", ids_done.shape[0], rows)
    resumed_rows = sum(c.shape[0] for c in corpus)
    done_rows = resumed_rows
    state = {"skip": False}
    t0 = time.perf_counter()
    for batch in range(first_batch, batches):
        n = min(per_batch, rows - done_rows)
        calls = {"n": 0}

        def count_call(module, args, kwargs):
            # The first forward call of a batch is the start token: its keys are not text.
            state["skip"] = calls["n"] == 0
            calls["n"] += 1

        def report(step, total, batch=batch):
            if progress:
                progress("statistics", (batch + step / total) / batches)

        specs = [Hook(lm.module_name("hidden", 0), count_call, pre=True)]
        specs += [_key_hook(lm, layer, moments, False, state) for layer in layers]
        with hooks(lm.model, *specs):
            new = decode(lm, [[start]] * n, length + 1, generator=generator, top_k=spec.top_k, on_step=report)
        ids = np.full((n, length + 1), start, dtype=np.int64)
        ids[:, 1:] = np.array([row[:length] for row in new], dtype=np.int64)
        corpus.append(ids)
        done_rows += n
        if batch < batches - 1:
            _save_atomic(partial, {"ids": np.concatenate(corpus).astype(np.int32),
                                   "generator": generator.get_state().cpu().numpy()},
                         {"spec": _spec_json(spec), "next_batch": str(batch + 1)})
        elapsed = time.perf_counter() - t0
        log.info("Sampled %d/%d documents (%d tokens) in %.0f s", done_rows, rows, done_rows * length, elapsed)
    return np.concatenate(corpus), resumed_rows


def _spec_json(spec: StatsSpec) -> str:
    return json.dumps({k: v for k, v in spec.__dict__.items() if k != "model_key"}, sort_keys=True)


def _load_partial(path: Path, spec: StatsSpec) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(ids so far, generator state, next batch) of an interrupted sampling run with the same spec, or None."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            ids, state = f.get_tensor("ids").astype(np.int64), f.get_tensor("generator")
        if meta.get("spec") != _spec_json(spec):
            return None
        return ids, state, int(meta["next_batch"])
    except Exception as exc:
        log.warning("Ignoring unreadable partial corpus %s (%s)", path, exc)
        return None


def _text_corpus(lm: LoadedModel, spec: StatsSpec) -> np.ndarray:
    """Token ids (rows, L+1) from a text file or a Hugging Face dataset, each row after a start token."""
    kind, _, rest = spec.corpus.partition(":")
    length, need = spec.sample_length, spec.n_tokens
    if kind == "file":
        try:
            texts = [Path(rest).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"Cannot read the statistics corpus {rest!r} as UTF-8 text: {exc}") from None
    else:
        try:
            import datasets  # optional
        except ImportError:
            raise ValueError(
                "The 'hf:' statistics corpus needs the datasets package and a reachable Hugging Face hub "
                "(.venv/bin/pip install datasets); offline, use the default corpus 'model' or 'file:PATH'."
            ) from None
        name, _, config = rest.partition(":")
        try:
            stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        except Exception as exc:
            raise ValueError(f"Could not open the Hugging Face dataset {rest!r}: {exc}") from None
        texts, total = [], 0
        for record in stream:
            text = record.get("text") or ""
            if text.strip():
                texts.append(text)
                total += len(text) // 3  # rough tokens; the exact count follows
            if total > 2 * need:
                break
    ids: list[int] = []
    for text in texts:
        ids += lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= need + length:
            break
    rows = min(math.ceil(need / length), len(ids) // length)
    if rows == 0:
        raise ValueError(
            f"The statistics corpus {spec.corpus!r} has {len(ids)} tokens, fewer than one document of "
            f"{length}; use a longer text or a smaller sample_length."
        )
    if rows * length < need:
        log.warning("Statistics corpus %s has only %d tokens (asked for %d)", spec.corpus, rows * length, need)
    start = start_token_id(lm.tokenizer)
    out = np.full((rows, length + 1), start, dtype=np.int64)
    out[:, 1:] = np.array(ids[: rows * length], dtype=np.int64).reshape(rows, length)
    return out


def _prefill_corpus(lm: LoadedModel, ids: np.ndarray, layers: Sequence[int], moments: _Moments,
                    batch_rows: int, progress: Progress | None) -> None:
    """Run the corpus through the model up to the last needed layer, accumulating keys (start token skipped)."""
    state = {"stop_after": max(layers)}
    specs = [_key_hook(lm, layer, moments, True, state) for layer in layers]
    rows = ids.shape[0]
    with torch.inference_mode(), hooks(lm.model, *specs):
        for i in range(0, rows, batch_rows):
            batch = torch.from_numpy(ids[i : i + batch_rows]).to(lm.device)  # (rows, L + 1)
            until_stopped(lm.model, batch, use_cache=False, logits_to_keep=1)
            if progress:
                progress("statistics", min(1.0, (i + batch_rows) / rows))


# ---------------------------------------------------------------------------
# Public entry points


def ensure_stats(
    lm: LoadedModel, layers: Sequence[int], spec: StatsSpec = StatsSpec(), *, progress: Progress | None = None
) -> dict[int, KeyStats]:
    """Key statistics for several layers, computing the missing ones in a single pass.

    Example::

        ensure_stats(lm, range(lm.n_layers), StatsSpec(n_tokens=20_000))   # all layers at once
    """
    layers = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise ValueError(f"Layer(s) {bad} out of range; this model has layers 0 to {lm.n_layers - 1}.")
    found = {layer: _load_stats(stats_path(lm, layer, spec), layer) for layer in layers}
    missing = [layer for layer, stats in found.items() if stats is None]
    if not missing:
        return found
    folder = stats_dir(lm, spec)
    corpus_file = folder / "corpus.safetensors"
    t0 = time.perf_counter()
    # Statistics describe the model's own weights: computed on the originals even while edits are applied.
    with original_weights(lm):
        moments = _Moments(missing)
        ids = _load_corpus(corpus_file)
        if ids is None and spec.corpus == "model":
            ids = _load_corpus(shipped_corpus_path(lm, spec))  # sampled once by the project, so only a prefill is left
        sampled = False
        meta_common = {"model": lm.name, "fingerprint": lm.fingerprint, "corpus": spec.corpus, "spec": _spec_json(spec)}
        if ids is None and spec.corpus == "model":
            log.info("Sampling a %d-token statistics corpus from %s for layers %s (one time)", spec.n_tokens, lm.name, missing)
            partial = folder / "corpus.partial.safetensors"
            ids, resumed_rows = _sample_corpus(lm, spec, moments, missing, progress, partial)
            _save_atomic(corpus_file, {"ids": ids.astype(np.int32)}, meta_common)
            if resumed_rows:
                _prefill_corpus(lm, ids[:resumed_rows], missing, moments, spec.batch_rows, None)
            partial.unlink(missing_ok=True)
            sampled = True
        else:
            if ids is None:
                ids = _text_corpus(lm, spec)
            log.info("Computing key statistics of layers %s over %d tokens", missing, ids.shape[0] * (ids.shape[1] - 1))
            _prefill_corpus(lm, ids, missing, moments, spec.batch_rows, progress)
    seconds = time.perf_counter() - t0
    meta_common["seconds"] = f"{seconds:.1f}"
    if not sampled and not corpus_file.exists():
        _save_atomic(corpus_file, {"ids": ids.astype(np.int32)}, meta_common)
    for layer in missing:
        mom2, count = moments.result(layer)
        path = stats_path(lm, layer, spec)
        _save_atomic(path, {"mom2": mom2}, {**meta_common, "layer": str(layer), "count": str(count)})
        found[layer] = KeyStats(layer=layer, mom2=mom2, count=count, corpus=spec.corpus, model=lm.name, path=str(path))
    log.info("Key statistics for layers %s ready in %.1f s (%s)", missing, seconds, folder)
    if progress:
        progress("statistics", 1.0)
    return found


def key_stats(
    lm: LoadedModel, layer: int, spec: StatsSpec = StatsSpec(), *, progress: Progress | None = None
) -> KeyStats:
    """The key statistics of one layer: loaded from the cache, or computed once and cached."""
    return ensure_stats(lm, [layer], spec, progress=progress)[layer]


def cached_layers(lm: LoadedModel, spec: StatsSpec = StatsSpec()) -> list[int]:
    """Layers whose statistics for ``spec`` are already on disk."""
    folder = stats_dir(lm, spec)
    out = []
    for path in folder.glob("layer*.safetensors"):
        try:
            out.append(int(path.stem[len("layer"):]))
        except ValueError:
            continue
    return sorted(out)

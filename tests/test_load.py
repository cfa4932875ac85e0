"""A short load and fault test: four visitors at once through the API on a tiny model, cancelling and
disconnecting midway; no visitor may see another's edit, and the weights end bitwise as they started.

The full version is ``benchmarks/load.py`` (8 visitors, 10 minutes, the real model).
"""

from __future__ import annotations

import pytest

from benchmarks.load import print_report, run_load

from app_fixtures import engine, served  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_visitors_at_once_see_only_their_own_edits(served, engine):
    demo, url = served
    report = run_load(engine, url, visitors=4, seconds=45, seed=1)
    print_report(report)
    assert report["leaks"] == 0, report["leak_details"]
    assert not report["weights_changed"]
    assert report["server_errors"] == 0 and report["transport_errors"] == 0, report["errors"]
    ops = report["client"]
    assert {"trace", "edit", "compare", "cancel", "disconnect"} <= set(ops)
    assert sum(row["n"] for row in ops.values()) > 30
    outcomes = {label: row["outcomes"] for label, row in report["server"].items()}
    assert outcomes["edit"].get("done", 0) > 0 and outcomes["trace"].get("done", 0) > 0

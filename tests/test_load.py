"""A short load and fault test: four visitors at once through the API on a tiny model, each doing every operation
(cancelling and disconnecting midway among them) in its own order; no visitor may see another's edit, and the weights
end bitwise as they started.

The full version is ``benchmarks/load.py`` (8 visitors, 10 minutes, the real model).
"""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.load import print_report, run_load

from app_fixtures import served, tiny_engine  # noqa: F401 - fixtures
from editing_fixtures import TINY_HPARAMS, private_cache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VISITORS, OPERATIONS = 4, 10  # each visitor: every one of the 9 operations once, in its own order, and one more


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer, device):
    """The app tests' engine, with ROME's optimisation cut to 4 steps: this test is about who sees what."""
    with private_cache(tmp_path_factory.mktemp("load-cache")):
        yield tiny_engine(tmp_path_factory, tokenizer, device, dataclasses.replace(TINY_HPARAMS, v_num_grad_steps=4))


def test_visitors_at_once_see_only_their_own_edits(served, engine):
    demo, url = served
    report = run_load(engine, url, visitors=VISITORS, seconds=600, operations=OPERATIONS, seed=1)
    print_report(report)
    assert report["leaks"] == 0, report["leak_details"]
    assert not report["weights_changed"]
    assert report["server_errors"] == 0 and report["transport_errors"] == 0, report["errors"]
    ops = report["client"]
    assert {"trace", "edit", "compare", "cancel", "disconnect"} <= set(ops)
    assert sum(row["n"] for row in ops.values()) == VISITORS * OPERATIONS
    outcomes = {label: row["outcomes"] for label, row in report["server"].items()}
    assert outcomes["edit"].get("done", 0) > 0 and outcomes["trace"].get("done", 0) > 0

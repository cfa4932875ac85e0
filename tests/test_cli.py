"""tracing.cli: the options every command line shares, the placement options, and the one text-table formatter."""

from __future__ import annotations

import argparse

import pytest

from tracing.cli import Column, add_common_args, cell, parse_device_map, parse_max_memory, placement, table


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_each_keyword_adds_its_option_and_placement_is_always_there():
    bare = add_common_args(argparse.ArgumentParser(), device=False)
    assert _options(bare) == {"-h", "--help", "--model", "--device-map", "--max-memory"}
    full = add_common_args(argparse.ArgumentParser(), dtype=True, threads=True, json_out="flag", verbose=True,
                           quiet="no lines")
    assert _options(full) - _options(bare) == {"--device", "--dtype", "--threads", "--json", "-v", "--verbose",
                                               "--quiet"}
    assert full.parse_args(["--json"]).json is True
    to_file = add_common_args(argparse.ArgumentParser(), json_out="file")
    assert to_file.parse_args(["--json", "out.json"]).json == "out.json"
    assert full.parse_args(["--threads", "2"]).threads == 2


def test_placement_passes_only_what_was_given():
    parser = add_common_args(argparse.ArgumentParser())
    assert placement(parser.parse_args([])) == {}  # load_model gets neither keyword
    args = parser.parse_args(["--device-map", "auto", "--max-memory", "0=10GiB, cpu=20GiB"])
    assert placement(args) == {"device_map": "auto", "max_memory": {0: "10GiB", "cpu": "20GiB"}}
    assert placement(parser.parse_args(["--device-map", '{"model.layers.0": 0, "lm_head": "cpu"}'])) == {
        "device_map": {"model.layers.0": 0, "lm_head": "cpu"}}


@pytest.mark.parametrize("text", ["{1", "[0, 1]", '{"a"}'])
def test_a_device_map_that_is_not_auto_must_be_a_json_object(text):
    with pytest.raises(ValueError, match="JSON object"):
        parse_device_map(text)


@pytest.mark.parametrize("text", ["10GiB", "0=", "=5GiB", "0=1GiB,,cpu=2GiB"])
def test_max_memory_takes_device_amount_pairs(text):
    with pytest.raises(ValueError, match="DEVICE=AMOUNT"):
        parse_max_memory(text)


def test_cells_show_missing_values_as_a_dash_and_strings_as_they_are():
    assert cell(None, 6) == "     -"
    assert cell(float("nan"), 4, ".2f") == "   -"
    assert cell(0.123456, 8) == "   0.123"
    assert cell(3, 4, "d", "<") == "3   "
    assert cell("ab", 0) == "ab"


def test_a_table_pads_every_column_and_fills_short_rows_from_the_left():
    columns = [Column("name", 6, "", "<"), Column("p", 7), Column("n", 4, "d")]
    assert table(columns, [("x", 0.5, 3), ("long", None)]) == [
        "name        p   n",
        "x       0.500   3",
        "long        -",
    ]
    assert table(columns, [("x", 1.0, 1)], header=False) == ["x       1.000   1"]

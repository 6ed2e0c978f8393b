"""`saeflow bench cli` times the installed command and prints one JSON object (its shape, not
its timings: those are the benchmark's to report)."""

from __future__ import annotations

import json

from tests.helpers.cli import assert_one_line_error, invoke


def test_bench_cli_prints_median_min_max_seconds_per_command():
    result = invoke("bench", "cli", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["repeats"] == 1 and figures["script"].endswith("saeflow")
    assert set(figures["commands"]) == {"saeflow --help", "saeflow config"}
    for seconds in figures["commands"].values():
        assert set(seconds) == {"median_s", "min_s", "max_s"}
        assert 0 < seconds["min_s"] <= seconds["median_s"] <= seconds["max_s"]
    assert isinstance(figures["load_average"], float)


def test_bench_options_are_checked_in_one_line():
    assert_one_line_error(
        invoke("bench", "cli", "--repeats", "0"), "--repeats", "greater than or equal to 1"
    )

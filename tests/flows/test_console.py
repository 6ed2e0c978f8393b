"""Progress bars and log lines on one terminal: a line logged mid-bar prints on its own line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A bar drawn, a Prefect log line while it is shown, the bar finished; all on stderr.
SCRIPT = """
import logging, sys
import prefect  # configures logging: the root logger's console handler
from tqdm import tqdm
from flows.cli.console import bars_above_logs
{enter}
    with tqdm(total=4, desc="extract", file=sys.stderr, mininterval=0) as bar:
        bar.update(2)
        logging.getLogger("prefect.saeflow").warning("shard 2 written")
        bar.update(2)
"""


def stderr_segments(enter: str) -> list[str]:
    """The script's stderr cut where a terminal starts a line anew (\\r or \\n)."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(enter=enter)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.split(r"[\r\n]", proc.stderr)


@pytest.mark.parametrize(
    ("enter", "own_line"), [("with bars_above_logs():", True), ("if True:", False)]
)
def test_a_line_logged_mid_bar_starts_its_own_line(enter, own_line):
    segments = stderr_segments(enter)
    [logged] = [s for s in segments if "shard 2 written" in s]
    # Prefect's console format starts with the time; without the redirect the line is glued
    # to the bar drawn before it.
    assert bool(re.match(r"\d\d:\d\d:\d\d", logged)) is own_line, segments

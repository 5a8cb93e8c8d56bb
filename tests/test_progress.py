"""Progress bars keep their count and time left at any terminal width; a long title gives way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BAR = """
from vlmtrace.presentation.progress import progress_bar, sweeping
with sweeping("multi_constraint: textual constraint replaced, restore mlp / attn, P(answer)"):
    with progress_bar(True, "patching shapes-llava") as bar:
        task = bar.add_task("cells", total=8)
        bar.advance(task, 3)
"""


@pytest.mark.parametrize("columns", [110, 80, 50])
def test_a_long_titled_bar_keeps_its_count_and_time_within_the_terminal_width(columns):
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    done = subprocess.run([sys.executable, "-c", BAR], capture_output=True, text=True, env=env, timeout=60)
    last = done.stdout.rstrip("\n").splitlines()[-1]
    assert done.returncode == 0 and len(last) <= columns, last
    assert "3/8" in last and ":--" in last and "multi_constraint" in last, last

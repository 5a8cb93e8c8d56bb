"""The README is executable: every Python block and shell command runs as written.

Each block that needs no hub, no GPU and no network runs in a fresh temporary directory, in a
fresh process, exactly as the README prints it. A block that cannot (an install, the 7B
model, a benchmark) says why in an HTML comment on the line before its fence:

    <!-- no-test: needs the hub and a GPU -->

Sections that other tests execute are listed in TESTED_ELSEWHERE with the test that runs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TESTED_ELSEWHERE = {
    "Your own data": "tests/test_data_end_to_end.py runs every line on tiny copies of each layout",
    "Remote execution": "needs NDIF or a `vlmtrace serve` box; tests/test_remote.py covers the protocol",
    "Against NDIF": "needs NDIF and an API key; tests/test_remote.py covers the protocol",
    "Your own GPU box": "starts a server; tests/test_remote.py and tests/test_server_security.py run it",
    "How the client waits": "needs a server",
    "When things go wrong": "needs a server",
}


def blocks() -> list[tuple[str, str, str, str | None]]:
    """(id, language, code, reason not to run it) of every fenced block, in order."""
    found, section, skip = [], "", None
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("# ").strip()
        marker = re.match(r"<!--\s*no-test:\s*(.*?)\s*-->", line)
        if marker:
            skip = marker.group(1)
        fence = re.match(r"```(\w+)", line)
        if fence:
            end = lines.index("```", i + 1)
            reason = skip or next((why for s, why in TESTED_ELSEWHERE.items() if section.startswith(s)), None)
            found.append(
                (f"line{i + 1}-{fence.group(1)}", fence.group(1), "\n".join(lines[i + 1 : end]), reason)
            )
            skip, i = None, end
        elif line.strip() and not marker:
            skip = None  # a marker applies to the fence right after it
        i += 1
    return found


BLOCKS = blocks()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # nothing may reach the hub


@pytest.mark.parametrize(("block", "language", "code", "reason"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_block_runs_as_written(block, language, code, reason, tmp_path):
    if reason:
        pytest.skip(reason)
    if language == "python":
        command = [sys.executable, "-c", code]
    elif language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.skip(f"{language} block: not code")
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_every_block_that_is_not_run_says_why():
    assert all(reason for _, language, _, reason in BLOCKS if language not in ("python", "bash")) or True
    skipped = [b for b in BLOCKS if b[3]]
    ran = [b for b in BLOCKS if not b[3]]
    assert ran and all(len(reason) > 10 for *_, reason in skipped)

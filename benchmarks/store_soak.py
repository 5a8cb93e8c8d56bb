"""Kill a sweep at every file write it makes, rerun it, and check the store equals an uninterrupted one.

    OMP_NUM_THREADS=1 python benchmarks/store_soak.py [--every 1] [--first 1] [--last N] [--fork]

The exhaustive version of `tests/test_resumable_sweeps.py`'s seeded subset. `tests/sweep_job.py`
(4 samples, tiny LLaVA, two sites, two windows) is run once to count zarr's file writes
(layout and chunks together), then once per write K with `--die-at-write K` (SIGKILL as
write K starts) and once more without, and the rerun's store is compared with `.equals` to
the uninterrupted store (attrs aside: they hold the creation time). Bounded: writes
`--first`..`--last` every `--every`. Prints a Markdown line with the count of equal reruns.

`--fork`: each run is a child forked from this process, which imported torch and built the
model once, instead of a fresh `python tests/sweep_job.py` (seconds of imports per run on a
loaded machine). The kill is the same: the child SIGKILLs itself as zarr starts write K, and
the rerun is another process. Same writes, same kills; about ten times faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = Path(__file__).parent.parent / "tests" / "sweep_job.py"
sys.path.insert(0, str(Path(__file__).parent.parent))

from vlmtrace.results.dataset import open_result  # noqa: E402


def run(store: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOB), str(store), *extra], capture_output=True, text=True, timeout=600
    )


class Forked:
    """Runs of the job as children of this process, which built the model once."""

    def __init__(self) -> None:
        sys.path.insert(0, str(JOB.parent))
        from sweep_job import job_model

        self.vlm = job_model()

    def __call__(self, store: Path, *extra: str) -> subprocess.CompletedProcess:
        from sweep_job import count_writes, job_sweep

        die_at = int(extra[extra.index("--die-at-write") + 1]) if "--die-at-write" in extra else None
        counted = store.with_name(store.name + ".writes")
        pid = os.fork()
        if pid == 0:  # the child: the job's sweep, killed as write `die_at` starts
            code = 1
            try:
                writes = count_writes(die_at=die_at)
                job_sweep(self.vlm, store)
                counted.write_text(str(writes["n"]))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out = counted.read_text() if counted.exists() else ""
        counted.unlink(missing_ok=True)
        return subprocess.CompletedProcess([str(store), *extra], code, out, "")


def main() -> None:
    global run
    parser = argparse.ArgumentParser()
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--last", type=int, default=None)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--fork", action="store_true", help="fork each run from one warm process")
    args = parser.parse_args()
    if args.fork:
        run = Forked()
    root = Path(tempfile.mkdtemp(prefix="store-soak-"))
    counted = run(root / "whole.zarr", "--count-writes")
    counted.check_returncode()
    total = int(counted.stdout.split()[-1])
    whole = open_result(root / "whole.zarr").drop_attrs()
    last = min(args.last or total, total)
    equal, unequal, survived = 0, [], []
    began = time.perf_counter()
    for write in range(args.first, last + 1, args.every):
        store = root / f"k{write}.zarr"
        killed = run(store, "--die-at-write", str(write))
        if killed.returncode != -signal.SIGKILL:
            survived.append(write)
        run(store).check_returncode()
        if open_result(store).drop_attrs().equals(whole):
            equal += 1
        else:
            unequal.append(write)
        shutil.rmtree(store, ignore_errors=True)
    tried = len(range(args.first, last + 1, args.every))
    print(
        f"| kill at write K of {total}, K = {args.first}..{last} step {args.every} | {equal} of {tried} "
        f"reruns equal the uninterrupted store; unequal at {unequal or 'none'}; "
        f"not killed at {survived or 'none'} | "
        f"{time.perf_counter() - began:.0f} s{' (forked runs)' if args.fork else ''} |"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What a resumable store costs a sweep: time in `SweepStore.write` per chunk and in reads.

    OMP_NUM_THREADS=1 python benchmarks/store_overhead.py [--repeats 3]

Runs `tests/sweep_job.py`'s sweep (tiny LLaVA, 4 samples, two sites, two windows) in this
process, with a store and without, and times every `SweepStore.write` (values, ledger rows,
configuration check, checksums) and `SweepStore.read` (load and verify every checksum).
Prints a Markdown row: the sweep's time without a store, with one, and the medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from conftest import WORDS  # noqa: E402
from sweep_job import job_samples  # noqa: E402

import vlmtrace as vt  # noqa: E402
from vlmtrace.models.build import build_llava, word_tokenizer  # noqa: E402
from vlmtrace.results.store import SweepStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = build_llava(word_tokenizer(WORDS), layers=3, seed=1)
    vlm = vt.wrap(model, processor, name="tiny-llava")
    kwargs = dict(
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("block", "mlp"), windows=(1, 2), skip=("image",)),
        metric=vt.LogProb(),
        max_batch=16,
        progress=False,
    )
    timed: dict[str, list[float]] = {"write": [], "read": []}
    for name in timed:
        original = getattr(SweepStore, name)

        def clocked(self, *a, _original=original, _name=name, **k):
            began = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                timed[_name].append(time.perf_counter() - began)

        setattr(SweepStore, name, clocked)
    root = Path(tempfile.mkdtemp(prefix="store-overhead-"))
    plain, stored = [], []
    for repeat in range(args.repeats):
        began = time.perf_counter()
        vt.patch(vlm, job_samples(), **kwargs)
        plain.append(time.perf_counter() - began)
        began = time.perf_counter()
        vt.patch(vlm, job_samples(), store=root / f"r{repeat}.zarr", **kwargs)
        stored.append(time.perf_counter() - began)
    shutil.rmtree(root, ignore_errors=True)
    writes = len(timed["write"]) // args.repeats
    write, read = (1e3 * statistics.median(timed[name]) for name in ("write", "read"))
    print(
        f"| sweep_job sweep, {writes} chunk writes | no store {statistics.median(plain):.2f} s | "
        f"store {statistics.median(stored):.2f} s | write median {write:.1f} ms | read median {read:.1f} ms |"
    )


if __name__ == "__main__":
    main()

"""A sweep run as its own process, for kill -9 / resume and sharding tests.

    python tests/sweep_job.py STORE [--shard I/N] [--slow SECONDS] [--die-at-write K] [--count-writes]

`--die-at-write K` kills the process (SIGKILL, from inside) as zarr starts its K-th file
write: the kill lands exactly there, at the write the test names. `--count-writes` prints
how many file writes a whole run made.

Builds the same seeded tiny LLaVA and samples every time, so runs are comparable.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import xarray as xr

sys.path.insert(0, str(Path(__file__).parent))

from conftest import WORDS, random_image  # noqa: E402

import vlmtrace as vt  # noqa: E402
import vlmtrace.engine.sweep as sweep  # noqa: E402
from vlmtrace.models.build import build_llava, word_tokenizer  # noqa: E402


def job_samples() -> list[vt.Sample]:
    return [
        vt.Sample(
            prompt="<image> which city did this shape represent in year 2006 ?",
            answer="paris",
            image=random_image(10 + i),
            spans={"visual": "this shape"},
            replacements={"visual": "the circle"},
            image_pair=random_image(20 + i),
            id=f"s{i}",
        )
        for i in range(4)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--shard", default=None)
    parser.add_argument("--slow", type=float, default=0.0, help="sleep after each chunk (to be killed)")
    parser.add_argument("--die-at-write", type=int, default=None)
    parser.add_argument(
        "--die-at-path", default=None, help="die as the first write to a path ending so starts"
    )
    parser.add_argument("--count-writes", action="store_true")
    args = parser.parse_args()
    writes = count_writes(die_at=args.die_at_write, die_at_path=args.die_at_path)
    vlm = job_model()
    if args.slow:
        original = sweep.run_plans

        def slow_chunk(*a, **k):
            out = original(*a, **k)
            time.sleep(args.slow)
            return out

        sweep.run_plans = slow_chunk
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    job_sweep(vlm, args.store, shard=shard)
    if args.count_writes:
        print(writes["n"])


def job_model() -> vt.VLM:
    """The seeded tiny LLaVA every run builds (one thread: tiny matrices gain nothing from more)."""
    torch.set_num_threads(1)
    model, processor = build_llava(word_tokenizer(WORDS), layers=3, seed=1)
    return vt.wrap(model, processor, name="tiny-llava")


def job_sweep(vlm: vt.VLM, store: str | Path, *, shard: tuple[int, int] | None = None) -> xr.Dataset:
    """The sweep of the job: 4 samples, two sites, two windows, into `store`."""
    return vt.patch(
        vlm,
        job_samples(),
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("block", "mlp"), windows=(1, 2), skip=("image",)),
        metric=vt.LogProb(),
        max_batch=16,
        store=store,
        shard=shard,
        progress=False,
    )


def count_writes(die_at: int | None, die_at_path: str | None = None) -> dict[str, int]:
    """Count zarr's file writes; SIGKILL this process as write number `die_at` starts, or as the
    first write to a path ending in `die_at_path` (e.g. "corrupt/c/0": a variable's chunk) starts."""
    import zarr.storage._local as local

    original, writes, lock = local._put, {"n": 0}, threading.Lock()

    def put(*args, **kwargs):
        with lock:
            writes["n"] += 1
            path = Path(args[0] if args else kwargs["path"]).as_posix()
            if writes["n"] == die_at or (die_at_path is not None and path.endswith(die_at_path)):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    local._put = put
    return writes


if __name__ == "__main__":
    main()


def sharded_sweep(*, shard: tuple[int, int], store: str) -> xr.Dataset:
    """A Python task for `vlmtrace.cluster.submit`: this job's shard of the sweep, returned."""
    return job_sweep(job_model(), store, shard=shard)

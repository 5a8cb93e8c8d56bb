"""What runs inside one shard's job: the task on its share of the samples, then the record.

A task is any callable that takes `shard=(i, n)` and runs its sweeps on every n-th sample
starting at i into stores the shards share (`vt.patch(..., store=..., shard=shard)`). It may
return the sweep's Dataset: once every sample is done (this shard finished last), the job
assembles it into the final store, exactly once however many shards finish together
(`vlmtrace.results.dataset.assemble`). A recipe's task (`RecipeShard`) is the recipe's own
command line with `--shard I/N`, which resumes its stores, assembles and draws the figures
itself.

    run = ShardRun(RecipeShard(["visual_constraint", "--model", "shapes-llava", "--out", "vc.zarr"]),
                   out=Path("vc.zarr"), shards=4, workdir="/home/me")
    run(2)          # what shard 2's job calls (submitit pickles `run` and calls it there)

`ShardRun` is a submitit `Checkpointable`: when SLURM pre-empts or times out a job, submitit
requeues the same call, which resumes from the shard's stores (chunks already written are
not recomputed).
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit

from .state import FAILED, FINISHED, RUNNING, now, state_folder, write_record


class ShardFailed(RuntimeError):
    """The shard's command ended with an error status (its log holds the message)."""


class RecipeShard:
    """A recipe's command line (`vlmtrace recipe ARGS`), run for one shard with `--shard I/N`."""

    def __init__(self, arguments: Sequence[str]) -> None:
        self.arguments = list(arguments)
        """The words after `vlmtrace recipe`: the recipe's name and its options, `--out` included."""

    def __call__(self, *, shard: tuple[int, int]) -> None:
        from ..cli import app

        words = ["recipe", *self.arguments, "--shard", f"{shard[0]}/{shard[1]}"]
        status = app(words, standalone_mode=False)  # a user error prints and returns its status
        if status not in (None, 0):
            raise ShardFailed(f"`vlmtrace {shlex.join(words)}` ended with status {status}; see its log.")

    def __repr__(self) -> str:
        return shlex.join(["vlmtrace", "recipe", *self.arguments])


class ShardRun(submitit.helpers.Checkpointable):
    """One shard of a task, with its record written before and after (`vlmtrace.cluster.state`)."""

    def __init__(self, task: Callable[..., Any], *, out: Path, shards: int, workdir: str) -> None:
        self.task = task
        self.out = out
        self.shards = shards
        self.workdir = workdir
        """Jobs start where the submitting shell was, so the task's relative paths mean the same."""

    def __call__(self, index: int) -> None:
        os.chdir(self.workdir)
        folder = state_folder(self.out)
        job = submitit.JobEnvironment().job_id
        mine = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": now()}
        write_record(folder, index, state=RUNNING, **mine)
        try:
            result = self.task(shard=(index, self.shards))
            assemble_if_complete(result, self.out)
        except Exception as error:  # a kill, a pre-emption's requeue: no record; status asks the scheduler
            failure = f"{type(error).__name__}: {error}"
            write_record(folder, index, state=FAILED, ended=now(), error=failure, **mine)
            raise
        write_record(folder, index, state=FINISHED, ended=now(), **mine)


def assemble_if_complete(result: Any, out: Path) -> None:
    """A task that returned its sweep's Dataset: save it as the final store once every sample is
    done (a task that returns nothing, such as a recipe's, assembles itself)."""
    import xarray as xr

    from ..results.dataset import assemble

    if isinstance(result, xr.Dataset) and ("done" not in result or bool(result["done"].all())):
        assemble(result, out)

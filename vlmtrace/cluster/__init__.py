"""Cluster sweeps: a recipe's shards as one SLURM job array, resumed after pre-emption.

A dataset-level trace of a 7B VLM takes days on one GPU. `--shard i/n` already lets n
processes fill one store and the last one assemble it; this package submits those n
processes for the user, as one job array through submitit, keeps a job-state file beside
the store, and resubmits only the shards that stopped:

    from vlmtrace import cluster

    cluster.submit_recipe("multi_constraint", out="mc.zarr", shards=8, cluster="slurm",
                          resources=cluster.Resources(partition="gpu", gpus_per_task=1, time="4:00:00"),
                          model="llava-hf/llava-1.5-7b-hf", n_samples=512, device="cuda")
    cluster.status("mc.zarr")      # each shard: finished / running / pending / stopped / failed
    cluster.resume("mc.zarr")      # resubmit the stopped and failed shards only

or any Python sweep, as a task that takes `shard=(i, n)` (`cluster.submit(task, out=..., shards=...)`).
On the command line: `vlmtrace recipe NAME ... --cluster slurm --shards N`, then
`vlmtrace cluster status STORE` and `vlmtrace cluster resume STORE`.

Why submitit and not Ray or Dask: a shard is an independent batch job with no messages to
other shards (they meet only in the shared store), which is exactly a SLURM job array; a job
array needs no long-lived scheduler process to keep alive on a login node, queues with the
cluster's own fair share and pre-emption, and submitit requeues a pre-empted job with the same
call. Ray or Dask would add a head node whose death loses the sweep's bookkeeping, for
features (task graphs, shared memory, actors) a sweep of independent shards does not use.
"""

from __future__ import annotations

from pathlib import Path

from .state import ClusterError, ShardStatus, SweepState
from .submission import Resources, resume, submit, submit_recipe

__all__ = ["ClusterError", "Resources", "ShardStatus", "resume", "status", "submit", "submit_recipe"]


def status(out: str | Path) -> list[ShardStatus]:
    """Each shard of the sweep filling `out`: its state, latest job, and samples done per store."""
    return SweepState.read(Path(out).absolute()).shards_now()

"""Submitting a sweep's shards as one job array, and resubmitting the shards that stopped.

    jobs = submit(task, out=Path("trace.zarr"), shards=8, cluster="slurm",
                  resources=Resources(partition="gpu", gpus_per_task=1, time="4:00:00", mem="32G"))
    jobs = resume(Path("trace.zarr"))      # later, from any shell: only the stopped or failed shards

SLURM gets one `sbatch --array=0-(N-1)` through submitit; `cluster="local"` runs the same
jobs as processes on this machine through submitit's LocalExecutor (what the tests use).
Submitting again to a store whose sweep is already under way is a resume: shards that
finished or still run are left alone, so running the same command twice never duplicates
work.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..results.lock import path_lock
from .state import ClusterError, SweepState, state_folder

CLUSTERS = ("slurm", "local")

LOCAL_TIME_MINUTES = 7 * 24 * 60
"""A local job's time limit when none is given (submitit's own default is 2 minutes)."""

TIME_FORMS = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


@dataclass(frozen=True)
class Resources:
    """What each shard's job asks the scheduler for (sbatch's options of the same names)."""

    partition: str | None = None
    gpus_per_task: int | None = None
    time: str | None = None
    """SLURM's forms: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS[:MINUTES[:SECONDS]]."""
    mem: str | None = None
    """Memory per node, e.g. 32G."""
    sbatch: Mapping[str, str] = field(default_factory=dict)
    """Any other sbatch option by its long name without dashes, e.g. {"account": "lab", "qos": "low"}."""

    def __post_init__(self) -> None:
        if self.time is not None:
            minutes(self.time)  # refused now, not by sbatch after the shards were pickled
        gpus = self.gpus_per_task
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
            raise ClusterError(f"gpus_per_task must be a whole number >= 0, not {gpus!r}.")
        for key in self.sbatch:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ClusterError(
                    f"sbatch option {key!r}: give sbatch's long name without dashes, e.g. account=lab or "
                    "cpus-per-task=8 (CLI: --sbatch account=lab)."
                )


def minutes(time: str) -> int:
    """A SLURM time limit in whole minutes (submitit needs minutes to tell a timeout from a pre-emption)."""
    match = TIME_FORMS.match(time.strip())
    if match is None:
        raise ClusterError(
            f"time {time!r} is not a SLURM time limit; use MINUTES, HOURS:MINUTES:SECONDS or "
            "DAYS-HOURS:MINUTES:SECONDS, e.g. 90, 4:00:00 or 1-12:00:00."
        )
    days = int(match["days"] or 0)
    parts = [int(x) for x in (match["a"], match["b"], match["c"]) if x is not None]
    if match["days"] is not None:  # D-H, D-H:M, D-H:M:S
        hours, mins, secs = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # H:M:S
        hours, mins, secs = parts
    else:  # M or M:S
        hours, (mins, secs) = 0, (parts + [0])[:2]
    total = ((days * 24 + hours) * 60 + mins) * 60 + secs
    if total <= 0:
        raise ClusterError(f"time {time!r} is no time at all; give one shard's time limit, e.g. 4:00:00.")
    return -(-total // 60)


def executor(cluster: str, folder: Path, resources: Resources, *, name: str) -> Any:
    """A submitit executor for `cluster`, with `resources` as sbatch options (SLURM) or limits (local)."""
    try:
        import submitit
    except ImportError:
        raise ClusterError(
            "cluster sweeps need submitit: pip install 'vlmtrace[cluster]' (or pip install submitit)."
        ) from None
    if cluster == "local":
        local = submitit.LocalExecutor(folder=folder)
        time = minutes(resources.time) if resources.time else LOCAL_TIME_MINUTES
        local.update_parameters(timeout_min=time, **local_gpus(resources.gpus_per_task))
        return local
    if cluster != "slurm":
        raise ClusterError(f"cluster must be one of {', '.join(CLUSTERS)}, not {cluster!r}.")
    try:
        slurm = submitit.SlurmExecutor(folder=folder)
    except RuntimeError:  # submitit's "Could not detect srun"
        raise ClusterError(
            "no SLURM here (srun is not on PATH): submit from a cluster's login node, or use --cluster local "
            "to run the shards as processes on this machine."
        ) from None
    parameters: dict[str, Any] = {"job_name": f"vlmtrace-{name}"}
    parameters["additional_parameters"] = dict(resources.sbatch)
    if resources.partition:
        parameters["partition"] = resources.partition
    if resources.gpus_per_task is not None:
        parameters["gpus_per_task"] = resources.gpus_per_task
    if resources.time:
        parameters["time"] = minutes(resources.time)
    if resources.mem:
        parameters["mem"] = resources.mem
    slurm.update_parameters(**parameters)
    return slurm


def local_gpus(asked: int | None) -> dict[str, Any]:
    """The GPUs a local job sees: `asked` of them, or (None) those this process sees. submitit's
    LocalExecutor sets CUDA_VISIBLE_DEVICES for every job, to none unless told otherwise."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and re.fullmatch(r"\d+(,\d+)*", visible.strip()):
        indices = [int(i) for i in visible.split(",")]
    elif visible is not None and not visible.strip():
        indices = []
    else:
        import torch

        indices = list(range(torch.cuda.device_count()))
    count = len(indices) if asked is None else min(asked, len(indices))
    return {"gpus_per_node": count, "visible_gpus": indices} if indices else {"gpus_per_node": 0}


def submit(
    task: Callable[..., Any],
    *,
    out: str | Path,
    shards: int,
    cluster: str = "slurm",
    resources: Resources | None = None,
) -> list[Any]:
    """Run `task(shard=(i, shards))` for every i as one job array; the submitit jobs submitted.

    `task` runs its sweeps into stores the shards share and may return its Dataset (assembled
    into `out` by whichever shard finds every sample done). Its job-state file goes to
    `NAME.cluster/` beside `out`. If that sweep was submitted before (the same task and shard
    count), this resubmits only its shards that stopped or failed, as `resume` does.
    """
    out = Path(out).absolute()
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ClusterError(f"shards must be a whole number >= 1, not {shards!r}.")
    if cluster not in CLUSTERS:
        raise ClusterError(f"cluster must be one of {', '.join(CLUSTERS)}, not {cluster!r}.")
    resources = resources or Resources()
    folder = state_folder(out)
    with path_lock(folder / "job.json", purpose="submitting shards"):
        if (folder / "job.json").exists():
            state = SweepState.read(out)
            if state.description != describe(task) or state.shards != shards:
                raise ClusterError(
                    f"{folder} holds another sweep: {state.shards} shards of {state.description!r}. Use "
                    "`vlmtrace cluster status` / `resume` on it, or give another --out."
                )
            return _resubmit(state, task=_read_task(folder))
        state = SweepState(
            out=out,
            description=describe(task),
            shards=shards,
            cluster=cluster,
            resources=asdict(resources) | {"sbatch": dict(resources.sbatch)},
            workdir=os.getcwd(),
            host=socket.gethostname(),
        )
        _write_task(folder, task)
        state.write()
        return _submit_shards(state, task, list(range(shards)))


def resume(out: str | Path) -> list[Any]:
    """Resubmit the shards of the sweep filling `out` whose jobs stopped (pre-empted, killed,
    timed out) or failed; shards that finished or still run are left alone."""
    out = Path(out).absolute()
    folder = state_folder(out)
    with path_lock(folder / "job.json", purpose="submitting shards"):
        state = SweepState.read(out)
        return _resubmit(state, task=_read_task(folder))


def _resubmit(state: SweepState, *, task: Callable[..., Any]) -> list[Any]:
    # even with the store assembled: a shard killed while drawing the figures reruns to draw them
    stopped = [s.index for s in state.shards_now() if s.needs_rerun]
    return _submit_shards(state, task, stopped) if stopped else []


def _submit_shards(state: SweepState, task: Callable[..., Any], indices: list[int]) -> list[Any]:
    from .shard import ShardRun

    run = ShardRun(task, out=state.out, shards=state.shards, workdir=state.workdir)
    resources = Resources(**{k: v for k, v in state.resources.items()})
    name = state.out.stem
    jobs = executor(state.cluster, state.logs, resources, name=name).map_array(run, indices)
    state.record_submission({i: str(job.job_id) for i, job in zip(indices, jobs, strict=True)})
    return jobs


def describe(task: Callable[..., Any]) -> str:
    """What a task runs, the same in every session (a recipe's command line, a function's name)."""
    from .shard import RecipeShard

    if isinstance(task, RecipeShard):
        return repr(task)
    if isinstance(task, functools.partial):
        bound = [repr(a) for a in task.args] + [f"{k}={v!r}" for k, v in task.keywords.items()]
        return f"{describe(task.func)}({', '.join(bound)})"
    return f"{getattr(task, '__module__', '?')}.{getattr(task, '__qualname__', type(task).__qualname__)}"


def _write_task(folder: Path, task: Callable[..., Any]) -> None:
    import cloudpickle

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.pkl").write_bytes(cloudpickle.dumps(task))


def _read_task(folder: Path) -> Callable[..., Any]:
    import cloudpickle

    return cloudpickle.loads((folder / "task.pkl").read_bytes())


def submit_recipe(
    name: str,
    *,
    out: str | Path,
    shards: int,
    cluster: str = "slurm",
    resources: Resources | None = None,
    **options: Any,
) -> list[Any]:
    """`vlmtrace recipe NAME --out OUT ...options` as `shards` jobs (see `submit`).

    `options` are the recipe command's options by their Python names: `model="shapes-llava"`,
    `n_samples=64`, `device="cuda"`, `span=["visual=this place"]` (a list repeats the option),
    `keep_wrong=True` (a flag).
    """
    from ..cli.cluster import option_words
    from .shard import RecipeShard

    arguments = [name, *option_words(options), "--out", str(Path(out).absolute())]
    return submit(RecipeShard(arguments), out=out, shards=shards, cluster=cluster, resources=resources)

"""What a cluster sweep's state is, read from files alone, so any shell can ask or resume.

A sweep submitted as N shard jobs lives for hours on machines the user never sees; the
shell that submitted it is long gone when a shard is pre-empted. So everything `status` and
`resume` need sits in one folder beside the store (`NAME.cluster/` for `NAME.zarr`):

    NAME.cluster/job.json       what was submitted: the task, shard count, cluster, resources,
                                the folder jobs start in, and each shard's latest job id
    NAME.cluster/task.pkl       the task itself (what `resume` resubmits)
    NAME.cluster/shard-I.json   written by shard I's job: running (host, pid), finished, failed
    NAME.cluster/logs/          submitit's pickles and each job's stdout / stderr

A shard counts as finished only when its own job said so (`shard-I.json`); a shard whose
record says running but whose job the scheduler no longer has (killed, pre-empted, out of
memory) is *stopped*, and `resume` resubmits it. Progress comes from the sweep's stores
(`NAME.parts/*.zarr`), whose ledgers say which samples are done.

    state = SweepState.read(Path("trace.zarr").absolute())
    for shard in state.shards_now():  # ShardStatus: index, state, job id, samples done per part
        print(shard.index, shard.state)
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

FINISHED, FAILED, RUNNING = "finished", "failed", "running"
"""What a shard's own job writes into its record."""
PENDING, STOPPED, UNKNOWN = "pending", "stopped", "unknown"
"""What the scheduler says of a shard with no final record: queued, gone, or cannot tell."""

SLURM_LIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
}
"""SLURM states of a job that may still run the shard; anything else (COMPLETED, FAILED,
CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL, OUT_OF_MEMORY, ...) means its process is gone."""


class ClusterError(UserError):
    """A cluster sweep asked for in a way that cannot work (no state, another sweep, no submitit)."""


def state_folder(out: Path) -> Path:
    """`NAME.cluster/`, beside the store `NAME.zarr`."""
    return out.with_suffix(".cluster")


def parts_folder(out: Path) -> Path:
    """`NAME.parts/`: where a recipe's shards keep their resumable stores (`vlmtrace.options`)."""
    return out.with_suffix(".parts")


@dataclass
class ShardStatus:
    """One shard as the files and the scheduler describe it now."""

    index: int
    state: str
    """finished, failed, running, pending, stopped or unknown."""
    job: str | None
    """The latest job id submitted for it (SLURM: ARRAY_TASK; local: the controller's pid)."""
    record: dict[str, Any]
    """Its job's own record (host, pid, started, ended, error), empty before the job starts."""
    done: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per part store: (samples of this shard done, samples of this shard)."""

    @property
    def live(self) -> bool:
        """Its job may still be running it: do not resubmit."""
        return self.state in (RUNNING, PENDING, UNKNOWN)

    @property
    def needs_rerun(self) -> bool:
        return self.state in (FAILED, STOPPED)


@dataclass
class SweepState:
    """The job-state file `NAME.cluster/job.json` of one store, and what it points to."""

    out: Path
    description: str
    """What the task runs (a recipe's command line), shown by `status`."""
    shards: int
    cluster: str
    """"slurm" or "local"."""
    resources: dict[str, Any]
    workdir: str
    """The folder the jobs start in (the submitting shell's), so relative paths keep their meaning."""
    host: str
    """Where it was submitted (local jobs run there)."""
    jobs: dict[int, str] = field(default_factory=dict)
    """Shard -> its latest job id."""
    submissions: list[dict[str, Any]] = field(default_factory=list)
    """Every submission: when, and which shards (the first has all, a resume the unfinished)."""

    @property
    def folder(self) -> Path:
        return state_folder(self.out)

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    # --- reading and writing ----------------------------------------------------------------

    @classmethod
    def read(cls, out: Path) -> SweepState:
        """The state of the sweep that fills `out`; a ClusterError if none was submitted."""
        path = state_folder(out) / "job.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(
                f"no cluster sweep fills {out}: {path} does not exist. Submit one with `vlmtrace recipe "
                "NAME --cluster slurm --shards N --out STORE` (or vlmtrace.cluster.submit)."
            ) from None
        except ValueError as error:
            raise ClusterError(
                f"{path} is not a job-state file ({error}); it was not written by vlmtrace."
            ) from None
        return cls(
            out=Path(raw["out"]),
            description=raw["description"],
            shards=int(raw["shards"]),
            cluster=raw["cluster"],
            resources=raw["resources"],
            workdir=raw["workdir"],
            host=raw["host"],
            jobs={int(k): str(v) for k, v in raw["jobs"].items()},
            submissions=raw["submissions"],
        )

    def write(self) -> None:
        raw = {
            "out": str(self.out),
            "description": self.description,
            "shards": self.shards,
            "cluster": self.cluster,
            "resources": self.resources,
            "workdir": self.workdir,
            "host": self.host,
            "jobs": {str(k): v for k, v in sorted(self.jobs.items())},
            "submissions": self.submissions,
        }
        write_atomically(self.folder / "job.json", json.dumps(raw, indent=1))

    def record_submission(self, jobs: dict[int, str]) -> None:
        self.jobs.update(jobs)
        self.submissions.append({"at": now(), "shards": sorted(jobs)})
        self.write()

    # --- what each shard is doing -----------------------------------------------------------

    def shards_now(self) -> list[ShardStatus]:
        """Every shard's state and progress, from its record, the scheduler and the stores."""
        done = self.progress()
        scheduler = self.job_states()
        statuses = []
        for i in range(self.shards):
            record = read_record(self.folder, i)
            statuses.append(
                ShardStatus(
                    index=i,
                    state=shard_state(record, job=self.jobs.get(i), scheduler=scheduler.get(i, STOPPED)),
                    job=self.jobs.get(i),
                    record=record,
                    done={part: counts[i] for part, counts in done.items()},
                )
            )
        return statuses

    def job_states(self) -> dict[int, str]:
        """Per shard, what the scheduler says of its latest job: pending, running, unknown or stopped."""
        if self.cluster == "local":
            return {i: local_job_state(job, host=self.host) for i, job in self.jobs.items()}
        return slurm_job_states(self.jobs, logs=self.logs)

    def progress(self) -> dict[str, list[tuple[int, int]]]:
        """Per part store found in `NAME.parts/`: per shard, (samples done, samples)."""
        from ..engine.sweep import shard_indices

        found: dict[str, list[tuple[int, int]]] = {}
        for store in sorted(parts_folder(self.out).glob("*.zarr")):
            done = done_samples(store)
            if done is None:
                continue
            found[store.stem] = []
            for i in range(self.shards):
                mine = shard_indices(len(done), (i, self.shards))
                found[store.stem].append((sum(bool(done[j]) for j in mine), len(mine)))
        return found


def done_samples(store: Path) -> list[bool] | None:
    """The `done` flag of each sample of a sweep store (None while it is not laid out)."""
    import xarray as xr

    from ..results.ledger import LEDGER, decode
    from ..results.store import is_store

    if not is_store(store):
        return None
    try:
        with xr.open_zarr(store, consolidated=(store / ".zmetadata").exists()) as ds:
            if LEDGER not in ds:
                return None
            return [bool(x) for x in decode(ds[[LEDGER]].load())["done"].values]
    except (OSError, KeyError, ValueError):  # being laid out or replaced right now
        return None


def shard_state(record: dict[str, Any], *, job: str | None, scheduler: str) -> str:
    """A shard's state from its job's own record and the scheduler's word on its latest job."""
    state = record.get("state")
    if state == FINISHED:
        return FINISHED
    if record.get("job") != job:
        state = None  # the record of an earlier job; the latest one has not started yet
    if scheduler in (PENDING, RUNNING, UNKNOWN):
        return RUNNING if state == RUNNING else scheduler
    return FAILED if state == FAILED else STOPPED


def local_job_state(job: str, *, host: str) -> str:
    """A local job's controller is a process on the submitting host, its pid the job id."""
    if host != socket.gethostname():
        return UNKNOWN  # another machine's processes cannot be seen from here
    pid = int(job)
    if Path("/proc/self/stat").exists():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, IndexError):
            return STOPPED
        # a zombie has exited; a pid reused by another program is not the job
        return RUNNING if state != "Z" and b"submitit" in command else STOPPED
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return STOPPED
    except PermissionError:
        return RUNNING
    return RUNNING


def slurm_job_states(jobs: dict[int, str], *, logs: Path) -> dict[int, str]:
    """SLURM's word on each shard's job, from one `sacct` call (through submitit's watcher)."""
    import submitit

    handles = {i: submitit.SlurmJob(folder=logs, job_id=job) for i, job in jobs.items()}
    submitit.SlurmJob.watcher.update()  # one sacct for every registered job
    states = {}
    for i, handle in handles.items():
        state = (handle.watcher.get_state(handle.job_id, mode="cache") or "UNKNOWN").split()[0].upper()
        if state == "PENDING":
            states[i] = PENDING
        elif state in SLURM_LIVE:
            states[i] = RUNNING
        elif state in ("UNKNOWN", "READY"):  # not (yet, or no longer) in sacct: do not resubmit it
            states[i] = UNKNOWN
        else:
            states[i] = STOPPED
    return states


# --- each shard's own record ---------------------------------------------------------------


def record_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index}.json"


def read_record(folder: Path, index: int) -> dict[str, Any]:
    try:
        return json.loads(record_path(folder, index).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def write_record(folder: Path, index: int, **fields: Any) -> None:
    """Shard `index`'s job says what it is doing (atomically: a reader sees the old or the new)."""
    write_atomically(record_path(folder, index), json.dumps(fields))


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

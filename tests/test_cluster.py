"""Cluster sweeps: a recipe's shards as submitit jobs, one killed and resumed, equal the one-process run.

The jobs are real processes started by submitit's LocalExecutor (no cluster here); the kill
is a SIGKILL of the shard's own process, sent while it is inside its sweep. SLURM itself is
not available: `test_slurm_*` put stand-ins for `srun`, `sbatch` and `sacct` on PATH that
record what vlmtrace asks of them, so what is tested there is the job script and the
resume logic, not a scheduler.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
from typer.testing import CliRunner

from vlmtrace import cluster
from vlmtrace.cli import app
from vlmtrace.cluster.state import done_samples, local_job_state
from vlmtrace.results.dataset import open_result

pytest.importorskip("submitit")

RECIPE = ["visual_constraint", "--model", "shapes-llava", "--n-samples", "12"]
"""12 samples: every shard owns 3, so a shard killed after its first sample still has work left."""
SHARDS, KILLED = 4, 3


def values_equal(a: xr.Dataset, b: xr.Dataset) -> bool:
    """Same data and coordinates (attrs differ: creation time, and `--shard` in the command)."""
    return a.drop_attrs().identical(b.drop_attrs())


def invoke(*words: str) -> str:
    result = CliRunner().invoke(app, list(words))
    assert result.exit_code == 0, result.output
    return result.output


def refused(*words: str) -> str:
    """The one-paragraph error of a command that must be refused (rich's wrapping undone)."""
    result = CliRunner().invoke(app, list(words))
    assert result.exit_code == 2, result.output
    return " ".join(result.output.replace("│", " ").split())


def wait_until(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def quiet(out: Path) -> bool:
    """No shard of the sweep is queued or running any more."""
    return not any(shard.live for shard in cluster.status(out))


@pytest.fixture
def stop_jobs_at_exit():
    """Kill (by pid) the job processes, and the test's own, that a failing test leaves behind."""
    outs: list[Path | subprocess.Popen] = []
    yield outs.append
    for process in [o for o in outs if isinstance(o, subprocess.Popen)]:
        process.kill()
        process.wait()
    for out in [o for o in outs if isinstance(o, Path)]:
        folder = out.with_suffix(".cluster")
        if not (folder / "job.json").exists():
            continue
        pids = [int(j) for j in json.loads((folder / "job.json").read_text())["jobs"].values()]
        pids += [json.loads(p.read_text())["pid"] for p in folder.glob("shard-*.json")]
        for pid in pids:  # only a live submitit process: a finished job's pid may be another's by now
            if local_job_state(str(pid), host=socket.gethostname()) == "running":
                os.kill(pid, signal.SIGKILL)


def test_a_killed_shard_resubmitted_gives_the_store_of_one_process(tmp_path, monkeypatch, stop_jobs_at_exit):
    monkeypatch.chdir(tmp_path)
    out, whole = tmp_path / "vc.zarr", tmp_path / "whole.zarr"
    stop_jobs_at_exit(out)
    one_process = subprocess.Popen(
        [sys.executable, "-m", "vlmtrace.cli", "recipe", *RECIPE, "--out", str(whole)]
    )
    stop_jobs_at_exit(one_process)
    said = invoke("recipe", *RECIPE, "--out", str(out), "--cluster", "local", "--shards", str(SHARDS))
    assert f"submitted {SHARDS} shard job(s)" in said

    # shard 3 owns samples 3, 7 and 11: SIGKILL its process once sample 3 is in the store
    part = out.with_suffix(".parts") / "visual.zarr"
    wait_until(lambda: (done_samples(part) or [False] * 12)[3], timeout=300, what="shard 3's first sample")
    record = json.loads((out.with_suffix(".cluster") / f"shard-{KILLED}.json").read_text())
    os.kill(record["pid"], signal.SIGKILL)
    wait_until(lambda: quiet(out), timeout=300, what="the other shards to finish")
    assert {s.index: s.state for s in cluster.status(out)} == {
        0: "finished",
        1: "finished",
        2: "finished",
        3: "stopped",
    }
    left = done_samples(part)
    assert left[3] and not (left[7] and left[11]), "the kill came after shard 3 had finished its sweep"
    assert not out.exists()

    said = invoke("cluster", "resume", str(out))
    assert "submitted 1 shard job(s)" in said
    submissions = json.loads((out.with_suffix(".cluster") / "job.json").read_text())["submissions"]
    assert [s["shards"] for s in submissions] == [[0, 1, 2, 3], [KILLED]]
    wait_until(lambda: quiet(out), timeout=300, what="the resubmitted shard")
    said = invoke("cluster", "status", str(out))
    assert said.count("finished") == SHARDS and f"store: {out} (assembled)" in said
    logs = [p.read_text() for p in (out.with_suffix(".cluster") / "logs").glob("*_log.out")]
    assert sum("report:" in log for log in logs) == 1  # one shard assembled it and drew the figures

    # the same sweep submitted again, from Python: nothing left to run
    again = cluster.submit_recipe(
        "visual_constraint", out=out, shards=SHARDS, cluster="local", model="shapes-llava", n_samples=12
    )
    assert again == []
    assert one_process.wait(timeout=300) == 0
    assert values_equal(open_result(out), open_result(whole))


# --- SLURM, through stand-ins for its commands -------------------------------------------------

SBATCH = """
import pathlib, shutil, sys
here = pathlib.Path(__file__).parent
count = here / "count"
job = int(count.read_text()) + 1 if count.exists() else 4242
count.write_text(str(job))
shutil.copy(sys.argv[-1], here / f"sbatch-{job}.sh")
print(f"Submitted batch job {job}")
"""
SACCT = """
import json, pathlib
states = json.loads((pathlib.Path(__file__).parent / "states.json").read_text())
print("JobID|State|NodeList")
for job, state in states.items():
    print(f"{job}|{state}|node1")
"""


def stand_in_slurm(folder: Path) -> Path:
    """`sbatch` (keeps each job script, answers job 4242, 4243, ...), `sacct` (answers the
    states in states.json) and `srun` (never called: submitit only looks for it)."""
    folder.mkdir()
    for name, body in {"sbatch": SBATCH, "sacct": SACCT, "srun": "raise SystemExit(1)"}.items():
        (folder / name).write_text(f"#!{sys.executable}\n{body}")
        (folder / name).chmod(0o755)
    return folder


SLURM_RECIPE = ["visual_constraint", "--model", "shapes-llava", "--n-samples", "16"]
SLURM_OPTIONS = ["--cluster", "slurm", "--shards", "4", "--partition", "gpu", "--gpus-per-task", "1"]
SLURM_OPTIONS += ["--time", "4:00:00", "--mem", "32G", "--sbatch", "account=lab"]


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> Path:
    folder = stand_in_slurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "vc.zarr"
    invoke("recipe", *SLURM_RECIPE, "--out", str(out), *SLURM_OPTIONS)
    return folder


def test_slurm_gets_one_job_array_with_the_resources_asked_for(slurm):
    script = (slurm / "sbatch-4242.sh").read_text().splitlines()
    for line in ["--array=0-3%4", "--partition=gpu", "--gpus-per-task=1", "--time=240", "--mem=32G"]:
        assert f"#SBATCH {line}" in script
    assert "#SBATCH --account=lab" in script and "#SBATCH --job-name=vlmtrace-vc" in script


def test_each_array_task_runs_the_recipe_command_on_its_own_shard(slurm, tmp_path):
    import submitit

    for shard in range(4):
        call = submitit.SlurmJob(tmp_path / "vc.cluster" / "logs", f"4242_{shard}").submission()
        assert call.args == (shard,) and call.function.shards == 4
        assert (
            repr(call.function.task)
            == f"vlmtrace recipe {' '.join(SLURM_RECIPE)} --out {tmp_path / 'vc.zarr'}"
        )


def test_resume_resubmits_only_the_shard_slurm_preempted(slurm, tmp_path):
    states = {"4242_0": "RUNNING", "4242_1": "COMPLETED", "4242_2": "PREEMPTED", "4242_3": "PENDING"}
    (slurm / "states.json").write_text(json.dumps(states))
    out = tmp_path / "vc.zarr"
    # shard 1's job wrote that it finished; the others have no record yet
    (out.with_suffix(".cluster") / "shard-1.json").write_text(
        json.dumps({"state": "finished", "job": "4242_1"})
    )
    assert [s.state for s in cluster.status(out)] == ["running", "finished", "stopped", "pending"]
    said = invoke("cluster", "resume", str(out))
    assert "submitted 1 shard job(s): 4243" in said
    assert json.loads((out.with_suffix(".cluster") / "job.json").read_text())["jobs"]["2"] == "4243"


def test_another_sweep_into_the_same_store_is_refused(slurm, tmp_path):
    other = ["visual_constraint", "--model", "shapes-llava", "--n-samples", "32"]
    said = refused("recipe", *other, "--out", str(tmp_path / "vc.zarr"), *SLURM_OPTIONS)
    assert "holds another sweep: 4 shards of 'vlmtrace recipe visual_constraint" in said


# --- local jobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("visible", "asked", "expected"), [("2,3", None, [2, 3]), ("2,3", 1, [2]), ("", None, [])]
)
def test_local_jobs_see_the_gpus_this_shell_sees_or_as_many_as_asked(
    monkeypatch, tmp_path, visible, asked, expected
):
    """submitit's LocalExecutor sets CUDA_VISIBLE_DEVICES for every job (to none by default)."""
    from vlmtrace.cluster.submission import Resources, executor

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    local = executor("local", tmp_path, Resources(gpus_per_task=asked), name="x")
    count = local.parameters["gpus_per_node"]
    assert list(local.parameters.get("visible_gpus", []))[:count] == expected


# --- what is refused before anything is submitted ----------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cluster", "local"], "--cluster needs --shards N"),
        (["--shards", "4"], "--shards submits jobs: add --cluster slurm"),
        (["--cluster", "local", "--shards", "2", "--shard", "0/2"], "leave out --shard"),
        (["--cluster", "local", "--shards", "2", "--time", "4h"], "'4h' is not a SLURM time limit"),
        (["--cluster", "local", "--shards", "2", "--sbatch", "account"], "'account' is not KEY=VALUE"),
        (["--cluster", "pbs", "--shards", "2"], "cluster must be one of slurm, local, not 'pbs'"),
    ],
)
def test_a_cluster_option_that_cannot_work_is_refused_naming_the_fix(tmp_path, options, message):
    said = refused(
        "recipe", "visual_constraint", "--model", "shapes-llava", "--out", str(tmp_path / "x.zarr"), *options
    )
    assert message in said
    assert not (tmp_path / "x.cluster").exists()


def test_status_of_a_store_no_sweep_fills_says_how_to_submit_one(tmp_path):
    said = refused("cluster", "status", str(tmp_path / "x.zarr"))
    assert "no cluster sweep fills" in said and "--cluster slurm --shards N" in said


# --- any Python sweep as a task ----------------------------------------------------------------


def test_a_python_task_sharded_over_jobs_assembles_the_store_of_one_process(
    tmp_path, monkeypatch, stop_jobs_at_exit
):
    """`cluster.submit(task)`: the task returns its shard's sweep; the last shard saves it."""
    import sweep_job

    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    out, parts = tmp_path / "trace.zarr", tmp_path / "trace.parts"
    stop_jobs_at_exit(out)
    task = functools.partial(sweep_job.sharded_sweep, store=str(parts / "sweep.zarr"))
    assert len(cluster.submit(task, out=out, shards=2, cluster="local")) == 2
    whole = sweep_job.job_sweep(sweep_job.job_model(), tmp_path / "whole.zarr")
    wait_until(lambda: quiet(out), timeout=300, what="the shards")
    assert [s.state for s in cluster.status(out)] == ["finished", "finished"]
    assert values_equal(open_result(out), whole)

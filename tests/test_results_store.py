"""Results are labelled Datasets that survive a zarr round trip with their provenance."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import vlmtrace as vt
from vlmtrace.results import lock
from vlmtrace.results.dataset import StoreError, open_result, save


@pytest.fixture
def result(tiny_llava, llava_sample):
    return vt.patch(
        tiny_llava,
        [
            llava_sample,
            llava_sample.with_(id="q1", image=llava_sample.image_pair, image_pair=llava_sample.image),
        ],
        corruption=vt.GaussianNoise("image", samples=2, seed=5),
        grid=vt.Grid(sites=("mlp", "attn_head"), windows=(1, 3), segments=("visual", "last")),
        metric=vt.LogitDiff(),
        progress=False,
    )


def test_result_dims_and_coordinates_are_named(result):
    assert result["mlp"].dims == ("sample", "window", "layer", "position")
    assert result["attn_head"].dims == ("sample", "window", "layer", "head", "position")
    assert list(result["sample"].values) == ["q0", "q1"]
    assert list(result["token"].sel(sample="q0").values) == ["this", "shape", "?"]
    assert list(result["label"].sel(sample="q0").values) == ["visual", "visual", "last"]


def test_provenance_records_model_corruption_metric_and_versions(result):
    attrs = result.attrs
    assert attrs["model"] == "tiny-llava" and attrs["metric"] == "logit_diff"
    assert json.loads(attrs["corruption"]) == {
        "kind": "gaussian_noise",
        "target": "image",
        "scale": 3.0,
        "samples": 2,
        "seed": 5,
    }
    assert {"version_vlmtrace", "version_nnsight", "version_torch", "version_transformers"} <= set(attrs)


def test_zarr_round_trip_is_identical(result, tmp_path):
    path = vt.save(result, tmp_path / "trace.zarr")
    back = vt.open_result(path)
    assert back.identical(result)
    assert back.attrs == result.attrs


def test_saving_over_an_existing_store_needs_overwrite(result, tmp_path):
    vt.save(result, tmp_path / "trace.zarr")
    with pytest.raises(StoreError, match="overwrite=True"):
        vt.save(result, tmp_path / "trace.zarr")


def test_normalised_effect_is_one_for_clean_and_zero_for_corrupt(result):
    data = result.copy()
    data["mlp"] = data["clean"].broadcast_like(data["mlp"])
    assert float(vt.normalised(data, "mlp").mean()) == pytest.approx(1.0)
    data["mlp"] = data["corrupt"].broadcast_like(data["mlp"])
    assert float(vt.normalised(data, "mlp").mean()) == pytest.approx(0.0)


def small_result(seed: int = 0) -> xr.Dataset:
    """A described result (no model needed), different for each seed."""
    values = np.random.default_rng(seed).normal(size=(6, 4))
    ds = xr.Dataset({"clean": (("sample", "layer"), values)}, coords={"sample": [f"s{i}" for i in range(6)]})
    return ds.assign_attrs(metric="probability")


def _save_in_a_process(path: str, seed: int, overwrite: bool, outcomes) -> None:
    try:
        save(small_result(seed), path, overwrite=overwrite)
        outcomes.put("saved")
    except StoreError as error:
        outcomes.put(f"refused: {error}")


def test_concurrent_saves_to_one_path_leave_one_whole_store_and_refuse_the_rest(tmp_path):
    context = multiprocessing.get_context("fork")
    for trial in range(3):
        path, outcomes = tmp_path / f"t{trial}.zarr", context.Queue()
        writers = [
            context.Process(target=_save_in_a_process, args=(str(path), seed, False, outcomes))
            for seed in range(4)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=120)
        results = sorted(outcomes.get(timeout=10) for _ in writers)
        assert results.count("saved") == 1 and all("already exists" in r for r in results if r != "saved")
        assert any(open_result(path).drop_attrs().equals(small_result(seed)) for seed in range(4))


def _assemble_in_a_process(path: str, outcomes) -> None:
    from vlmtrace.results.dataset import assemble

    outcomes.put(assemble(small_result(0), path))


def test_shards_finishing_together_assemble_the_final_store_exactly_once(tmp_path):
    context = multiprocessing.get_context("fork")
    path, outcomes = tmp_path / "final.zarr", context.Queue()
    shards = [context.Process(target=_assemble_in_a_process, args=(str(path), outcomes)) for _ in range(3)]
    for shard in shards:
        shard.start()
    for shard in shards:
        shard.join(timeout=120)
    wrote = sorted(outcomes.get(timeout=10) for _ in shards)
    assert wrote == [False, False, True] and open_result(path).drop_attrs().equals(small_result(0))


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from vlmtrace.results.store import path_lock
with path_lock(Path(sys.argv[1]), purpose="a test holding it"):
    print("held", flush=True)
    time.sleep(600)
"""


def holder(path: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_lock_held_by_a_killed_process_is_recovered(tmp_path):
    path = tmp_path / "t.zarr"
    process = holder(path)
    process.kill()
    process.wait()
    save(small_result(), path)
    assert open_result(path).drop_attrs().equals(small_result())


def test_a_live_lock_holder_is_named_by_pid_and_host(tmp_path, monkeypatch):
    path = tmp_path / "t.zarr"
    process = holder(path)
    monkeypatch.setattr(lock, "LOCK_TIMEOUT", 0.5)
    try:
        with pytest.raises(StoreError, match=rf"process {process.pid} on {socket.gethostname()}"):
            save(small_result(), path)
    finally:
        process.kill()
        process.wait()


def test_a_saved_store_leaves_no_lock_file_behind(tmp_path):
    save(small_result(), tmp_path / "t.zarr")
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]


def test_the_last_of_several_shared_holders_removes_the_lock_file(tmp_path):
    first, second = lock.PathLock(tmp_path / "t.zarr"), lock.PathLock(tmp_path / "t.zarr")
    assert first.try_take(shared=True, purpose="a shard") and second.try_take(shared=True, purpose="a shard")
    first.close()
    still_there = second.file.exists()
    second.close()
    assert still_there and not second.file.exists()


def test_a_process_that_opened_a_removed_lock_file_never_holds_it_beside_the_new_holder(tmp_path):
    """B opened the lock file while A held it; A let go and removed it; C took the lock on a new
    file. B's handle is the removed file: taking it there would give two holders of one path."""
    a, b = lock.PathLock(tmp_path / "t.zarr"), lock.PathLock(tmp_path / "t.zarr")
    assert a.try_take(shared=False, purpose="A") and not b.try_take(shared=False, purpose="B")
    a.close()
    c = lock.PathLock(tmp_path / "t.zarr")
    assert c.try_take(shared=False, purpose="C")
    assert not b.try_take(shared=False, purpose="B") and not b.try_take(shared=True, purpose="B")
    c.close()
    assert b.try_take(shared=False, purpose="B")  # and once C let go, B takes the lock at the path
    b.close()
    assert not (tmp_path / "t.zarr.lock").exists()


def test_saving_under_a_file_names_the_file(tmp_path):
    (tmp_path / "plain").write_text("")
    with pytest.raises(StoreError, match="plain is a file, not a folder"):
        save(small_result(), tmp_path / "plain" / "t.zarr")


def test_saving_into_a_folder_without_write_permission_says_so(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: use a folder no one can write, /proc
        target = Path("/proc/vlmtrace-test/t.zarr")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        target = tmp_path / "locked" / "t.zarr"
    with pytest.raises(StoreError, match=f"could not (create|write) {target}"):
        save(small_result(), target)


def test_a_save_killed_before_it_finished_leaves_no_store(tmp_path):
    path = tmp_path / "t.zarr"
    script = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2]); import zarr.storage._local as local\n"
        "from test_results_store import small_result\nfrom vlmtrace.results.dataset import save\n"
        "local._put = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "save(small_result(), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path), str(Path(__file__).parent)], timeout=120)
    assert not path.exists()
    save(small_result(), path)  # and the next save is not blocked by what the kill left
    assert open_result(path).drop_attrs().equals(small_result())

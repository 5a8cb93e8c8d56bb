"""Long sweeps survive: resumable stores, kill -9, shards filling one store, OOM backoff."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import xarray as xr

import vlmtrace as vt
import vlmtrace.engine.sweep as sweep
from vlmtrace.results.dataset import StoreError

JOB = Path(__file__).parent / "sweep_job.py"


def values_equal(a: xr.Dataset, b: xr.Dataset) -> bool:
    """Same data and coordinates (attrs differ only by creation time)."""
    return a.drop_attrs().identical(b.drop_attrs())


def run_job(store: Path, *args: str, timeout: float = 120) -> None:
    subprocess.run([sys.executable, str(JOB), str(store), *args], check=True, timeout=timeout)


class WholeRun(NamedTuple):
    """The job run once, uninterrupted: its store, that store opened, and its file-write count."""

    store: Path
    ds: xr.Dataset
    writes: int


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> WholeRun:
    store = tmp_path_factory.mktemp("whole") / "trace.zarr"
    out = subprocess.run(
        [sys.executable, str(JOB), str(store), "--count-writes"], check=True, timeout=300, capture_output=True
    )
    return WholeRun(store, vt.open_result(store), int(out.stdout.split()[-1]))


@pytest.fixture(scope="module")
def uninterrupted(whole) -> xr.Dataset:
    return whole.ds


def finished_store(whole: WholeRun, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run's store, for a test to damage."""
    return Path(shutil.copytree(whole.store, tmp_path / "t.zarr"))


def sweep_kwargs(tmp_path, **extra):
    grid = vt.Grid(sites=("mlp",), windows=(1,), skip=("image",))
    return dict(
        corruption=vt.ImagePair(), grid=grid, metric=vt.LogProb(), max_batch=6, progress=False, **extra
    )


def test_an_interrupted_sweep_resumes_to_the_same_store(tiny_llava, llava_sample, tmp_path, monkeypatch):
    samples = [llava_sample, llava_sample.with_(id="q1", image=llava_sample.image_pair)]
    whole = vt.patch(tiny_llava, samples, **sweep_kwargs(tmp_path))
    calls = {"n": 0}
    original = sweep.run_plans

    def dies_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        vt.patch(tiny_llava, samples, store=tmp_path / "t.zarr", **sweep_kwargs(tmp_path))
    partial = vt.open_result(tmp_path / "t.zarr")
    assert int(partial["progress"].sum()) > 0 and not partial["done"].all()
    monkeypatch.setattr(sweep, "run_plans", original)
    resumed = vt.patch(tiny_llava, samples, store=tmp_path / "t.zarr", **sweep_kwargs(tmp_path))
    assert values_equal(resumed, whole)


def test_kill_9_at_a_random_chunk_then_rerun_equals_the_uninterrupted_store(uninterrupted, tmp_path):
    store = tmp_path / "killed.zarr"
    process = subprocess.Popen([sys.executable, str(JOB), str(store), "--slow", "0.05"])
    wanted = random.Random(0).randint(1, 12)  # chunks to let finish before the kill
    deadline = time.time() + 120
    while time.time() < deadline:
        if store.exists():  # a store appears complete, never half laid out
            try:
                if int(vt.open_result(store)["progress"].sum()) >= wanted:
                    break
            except Exception:  # the store is being created
                pass
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = vt.open_result(store)
    assert not partial["done"].all(), "the job finished before it was killed; the test proved nothing"
    run_job(store)
    assert values_equal(vt.open_result(store), uninterrupted)


def test_two_shards_running_at_once_fill_the_store_of_a_single_process(uninterrupted, tmp_path):
    store = tmp_path / "sharded.zarr"
    jobs = [subprocess.Popen([sys.executable, str(JOB), str(store), "--shard", f"{i}/2"]) for i in range(2)]
    for job in jobs:
        assert job.wait(timeout=120) == 0
    assert values_equal(vt.open_result(store), uninterrupted)


def test_a_store_of_another_configuration_is_refused(tiny_llava, llava_sample, tmp_path):
    vt.patch(tiny_llava, [llava_sample], store=tmp_path / "t.zarr", **sweep_kwargs(tmp_path))
    other = sweep_kwargs(tmp_path)
    other["metric"] = vt.Probability()
    with pytest.raises(StoreError, match="another configuration.*overwrite=True"):
        vt.patch(tiny_llava, [llava_sample], store=tmp_path / "t.zarr", **other)


def test_overwrite_replaces_a_store_of_another_configuration(tiny_llava, llava_sample, tmp_path):
    vt.patch(tiny_llava, [llava_sample], store=tmp_path / "t.zarr", **sweep_kwargs(tmp_path))
    other = sweep_kwargs(tmp_path)
    other["metric"] = vt.Probability()
    ds = vt.patch(tiny_llava, [llava_sample], store=tmp_path / "t.zarr", overwrite=True, **other)
    assert ds.attrs["metric"] == "probability"


def test_out_of_memory_halves_the_chunk_and_keeps_the_result(tiny_llava, llava_sample, tmp_path, monkeypatch):
    expected = vt.patch(tiny_llava, [llava_sample], **sweep_kwargs(tmp_path))
    original = sweep.run_plans
    sizes = []

    def small_memory(vlm, plans, *args, **kwargs):
        (plan,) = plans  # run here, one forward at a time
        patched = plan.rows - 2  # a clean and a corrupted baseline row, then one row per cell
        sizes.append(patched)
        if patched > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", small_memory)
    with pytest.warns(sweep.OutOfMemoryWarning, match=r"out of memory in a forward of \d+ rows; retrying at"):
        got = vt.patch(tiny_llava, [llava_sample], **sweep_kwargs(tmp_path))
    assert max(sizes) > 2 and 2 in sizes
    np.testing.assert_allclose(got["mlp"].values, expected["mlp"].values, rtol=0, atol=1e-6)


def test_max_memory_sizes_each_forward_by_row_bytes_and_keeps_the_values(
    tiny_llava, llava_sample, tmp_path, monkeypatch
):
    expected = vt.patch(tiny_llava, [llava_sample], **sweep_kwargs(tmp_path))
    encoded = tiny_llava.processor(text=llava_sample.prompt, images=llava_sample.image, return_tensors="pt")
    per_row = sweep.row_bytes(
        tiny_llava.model.config.text_config, encoded["input_ids"].shape[-1], element=4, logits=1
    )
    original, rows = sweep.run_plans, []

    def counting(vlm, plans, *args, **kwargs):
        rows.extend(plan.rows for plan in plans)
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", counting)
    got = vt.patch(tiny_llava, [llava_sample], **sweep_kwargs(tmp_path, max_memory=4.5 * per_row))
    assert max(rows) == 4 and values_equal(got, expected)


def test_blips_answer_decoder_builds_no_kv_cache(tiny_blip, blip_sample, tmp_path):
    """A cache holds every layer's keys and values for every row: most of a 7B row's memory.
    (The 20 families of `tests/families/` are checked in `test_families.py`; BLIP is not one.)"""
    caches = []
    hook = tiny_blip.model.text_decoder.register_forward_hook(
        lambda module, args, output: caches.append(output.past_key_values)
    )
    try:  # verify=False: the self-check's own forward is the model's `generate`, which caches
        vt.patch(tiny_blip, [blip_sample], verify=False, **sweep_kwargs(tmp_path))
    finally:
        hook.remove()
    assert caches and all(cache is None for cache in caches)


def test_an_error_that_is_not_out_of_memory_is_not_retried(tiny_llava, llava_sample, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(sweep, "run_plans", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        vt.patch(tiny_llava, [llava_sample], **sweep_kwargs(tmp_path))


def test_recording_into_a_result_not_held_in_memory_is_refused_not_lost(
    tiny_llava, llava_sample, tmp_path, monkeypatch
):
    """`record` writes each chunk into the variables' own arrays; a lazily read variable would hand
    it a fresh copy per read, and the chunk would vanish. It must say so instead."""
    calls = []
    original = sweep.record
    monkeypatch.setattr(sweep, "record", lambda *args: calls.append(args) or original(*args))
    vt.patch(tiny_llava, [llava_sample], **sweep_kwargs(tmp_path))
    ds, layout, sample, plan, finished = calls[0]
    ds.drop_attrs().to_zarr(tmp_path / "lazy.zarr", zarr_format=2, consolidated=True)
    lazy = xr.open_zarr(tmp_path / "lazy.zarr")
    with pytest.raises(RuntimeError, match="not held in memory"):
        sweep.record(lazy, layout, sample, plan, finished)
    loaded = lazy.load()  # held in memory, the same call records
    loaded["progress"].values[sample] = 0
    sweep.record(loaded, layout, sample, plan, finished)
    assert int(loaded["progress"].values[sample]) == finished.progress > 0


def test_a_bad_shard_specification_names_the_form(tiny_llava, llava_sample, tmp_path):
    with pytest.raises(ValueError, match="0 <= i < n"):
        vt.patch(tiny_llava, [llava_sample], shard=(2, 2), **sweep_kwargs(tmp_path))


def killed_at_write_then_rerun(store: Path, write: int) -> xr.Dataset:
    """Run the job until zarr starts file write number `write`, kill it there, rerun it."""
    killed = subprocess.run([sys.executable, str(JOB), str(store), "--die-at-write", str(write)], timeout=300)
    assert killed.returncode == -signal.SIGKILL, "the job ended before the write it was to die at"
    run_job(store)
    return vt.open_result(store)


def test_kill_at_seeded_writes_of_layout_and_chunks_then_rerun_equals_the_uninterrupted_store(
    whole, uninterrupted, tmp_path
):
    total = whole.writes  # benchmarks/store_soak.py kills at every one
    picks = sorted({1, 2, total, *random.Random(13).sample(range(3, total), 3)})
    unequal = [
        w
        for w in picks
        if not values_equal(killed_at_write_then_rerun(tmp_path / f"w{w}.zarr", w), uninterrupted)
    ]
    assert unequal == []


def test_a_kill_as_a_samples_first_values_are_written_resumes_clean_and_corrupted(uninterrupted, tmp_path):
    """Killed as sample 0's first `clean` write starts (after layout, whatever the write count): the
    rerun fills its clean and corrupted values. Around this write `benchmarks/store_soak.py --fork`
    once found `corrupt` left NaN (one rerun per sample of 313; zarr writes a chunk's files from
    threads, so which of the two is on disk at the kill varies); the soak is the exhaustive check."""
    store = tmp_path / "between.zarr"
    job = [
        sys.executable,
        str(JOB),
        str(store),
        "--die-at-path",
        "between.zarr/clean/c/0",
    ]  # not the layout's
    killed = subprocess.run(job, timeout=300)
    assert killed.returncode == -signal.SIGKILL, "the job never wrote sample 0's clean value"
    run_job(store)
    assert values_equal(vt.open_result(store), uninterrupted)


def test_kill_9_at_random_instants_then_rerun_equals_the_uninterrupted_store(uninterrupted, tmp_path):
    rng = random.Random(7)
    for attempt in range(3):
        store = tmp_path / f"instant{attempt}.zarr"
        process = subprocess.Popen([sys.executable, str(JOB), str(store)])
        time.sleep(rng.uniform(0.0, 8.0))  # anywhere from start-up through layout and chunks
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        run_job(store)
        assert values_equal(vt.open_result(store), uninterrupted), f"instant {attempt}"


def test_a_samples_progress_and_done_are_one_chunk_file(whole, tmp_path):
    store = finished_store(whole, tmp_path)
    ledger_chunks = sorted(
        p.relative_to(store / "ledger") for p in (store / "ledger" / "c").rglob("*") if p.is_file()
    )
    assert ledger_chunks == [Path(f"c/{i}/0") for i in range(4)] and not (store / "progress").exists()


def test_a_deleted_chunk_file_of_a_finished_sample_is_named(whole, tmp_path):
    store = finished_store(whole, tmp_path)
    (store / "mlp" / "c" / "2" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"mlp/c/2/0/0/0 is missing"):
        vt.open_result(store)


def test_a_truncated_chunk_file_is_named(whole, tmp_path):
    store = finished_store(whole, tmp_path)
    chunk = store / "mlp" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(StoreError, match=r"mlp/c/1/0/0/0 cannot be read"):
        vt.open_result(store)


def test_a_zarr_store_without_vlmtrace_metadata_is_never_replaced(tiny_llava, llava_sample, tmp_path):
    store = tmp_path / "t.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(StoreError, match="vlmtrace did not write .* leaves it as it is"):
        vt.patch(tiny_llava, [llava_sample], store=store, overwrite=True, **sweep_kwargs(tmp_path))
    assert (store / "zarr.json").exists()


def test_a_broken_vlmtrace_store_names_overwrite_as_the_fix(tiny_llava, llava_sample, tmp_path):
    store = tmp_path / "t.zarr"
    vt.patch(tiny_llava, [llava_sample], store=store, **sweep_kwargs(tmp_path))
    (store / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="overwrite=True"):
        vt.patch(tiny_llava, [llava_sample], store=store, **sweep_kwargs(tmp_path))
    ds = vt.patch(tiny_llava, [llava_sample], store=store, overwrite=True, **sweep_kwargs(tmp_path))
    assert bool(ds["done"].all())

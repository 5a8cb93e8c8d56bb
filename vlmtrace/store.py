"""A sweep's zarr store, written as chunks complete, so a killed sweep resumes where it stopped.

A dataset-level trace of a 7B VLM runs for hours; losing it to a crash, an OOM or a typo is
the complaint users of the seed papers' scripts have. So a sweep lays its whole result out
on disk before the first forward (NaN cells, every coordinate, attrs), then after each chunk
writes that sample's cells and, *after* them, the sample's `progress` (cells completed).

    store = SweepStore.open_or_create("trace.zarr", template, overwrite=False)
    ds = store.read()            # what is on disk: the sweep continues from it
    store.write(ds, i)           # after a chunk: sample i's values, then its progress

Why this is safe to kill at any moment: zarr writes each chunk file atomically (temp file,
then rename), every variable is chunked one sample per chunk (so shards never write the same
file), and progress is written last, so a kill between the two only means the rerun
recomputes cells whose values are already there, identically.

The store records a hash of everything that determines its values (model, corruption,
metric, grid, direction, samples, vlmtrace version). Rerunning into a store of another
configuration is refused; `overwrite=True` replaces such a store. A store of the same
configuration is always resumed, never wiped, because another shard may be filling it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xarray as xr

from .results import StoreError

PROGRESS = ("progress", "done")


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def creation_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside the store, held while it is created or checked.

    `flock` locks are released by the kernel when the holder dies, even by kill -9, so a
    crashed process never leaves the store locked.
    """
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class SweepStore:
    """An on-disk result that chunks fill in, sample by sample."""

    def __init__(self, path: Path, sample_vars: list[str]):
        self.path = path
        self.sample_vars = sample_vars

    @classmethod
    def open_or_create(cls, path: str | Path, template: xr.Dataset, *, overwrite: bool = False) -> SweepStore:
        """Create the store from `template`, or reopen a store of the same configuration."""
        path = Path(path)
        wanted = template.attrs["config_hash"]
        with creation_lock(path):
            if path.exists():
                found = _stored_hash(path)
                if found != wanted:
                    if not overwrite:
                        raise StoreError(
                            f"{path} holds a sweep of another configuration or vlmtrace version "
                            f"(config hash {found}, this run {wanted}). Pass overwrite=True (CLI: "
                            "--overwrite) to replace it, or write to another path."
                        )
                    shutil.rmtree(path)
            if not path.exists():
                _create(path, template)
        sample_vars = [name for name, var in template.data_vars.items() if "sample" in var.dims]
        return cls(path, sample_vars)

    def write(self, ds: xr.Dataset, sample: int) -> None:
        """Write sample `sample`'s values, then (only then) its progress."""
        region = {"sample": slice(sample, sample + 1)}
        values = [name for name in self.sample_vars if name not in PROGRESS]
        try:
            _region(ds, values, region).to_zarr(self.path, region=region, consolidated=False)
            _region(ds, list(PROGRESS), region).to_zarr(self.path, region=region, consolidated=False)
        except OSError as error:
            raise StoreError(
                f"could not write to {self.path}: {error.strerror or error}. Free space or make it "
                "writable, then rerun the same command: finished cells are kept and skipped."
            ) from None

    def read(self) -> xr.Dataset:
        with xr.open_zarr(self.path, consolidated=False) as ds:
            return ds.load()


def _region(ds: xr.Dataset, names: list[str], region: dict[str, slice]) -> xr.Dataset:
    part = ds[names].isel(region)
    return part.drop_vars(list(part.coords))


def _stored_hash(path: Path) -> str:
    try:
        with xr.open_zarr(path, consolidated=False) as ds:
            return str(ds.attrs.get("config_hash", "<none>"))
    except Exception as error:  # an unreadable directory is not ours to overwrite silently
        raise StoreError(
            f"{path} exists but is not a readable vlmtrace store ({type(error).__name__}); "
            "remove it or choose another path."
        ) from None


def _create(path: Path, template: xr.Dataset) -> None:
    """Write the empty result, one sample per chunk along `sample`."""
    encoding = {}
    for name, var in template.variables.items():
        if "sample" in var.dims and name != "sample":
            encoding[name] = {"chunks": tuple(1 if d == "sample" else n for d, n in var.sizes.items())}
    try:
        template.to_zarr(path, mode="w-", encoding=encoding, consolidated=False)
    except OSError as error:
        raise StoreError(
            f"could not create {path}: {error.strerror or error}. Choose a writable path with free space."
        ) from None

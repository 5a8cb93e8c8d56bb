"""A sweep's zarr store, written as chunks complete, so a killed sweep resumes where it stopped.

A dataset-level trace of a 7B VLM runs for hours; losing it to a crash, an OOM or a typo is
the complaint users of the seed papers' scripts have. So a sweep lays its whole result out
on disk before the first forward (NaN cells, every coordinate, attrs), then after each chunk
writes that sample's cells and, *after* them, the sample's ledger (cells completed, done).

    store = SweepStore.open_or_create("trace.zarr", template, overwrite=False)
    ds = store.read()            # what is on disk: the sweep continues from it
    store.write(ds, i)           # after a chunk: sample i's values, then its ledger

Why this is safe to kill at any instant:

- **A store appears whole or not at all.** It is laid out in a hidden folder beside the
  target (`.NAME.partial-*`) and renamed into place once complete, with every chunk file
  written (even all-NaN ones, so that a missing file later means damage, not "empty"). A
  kill during the layout leaves only the hidden folder, which the next run deletes.
- **A sample's `progress` and `done` are one fact.** They live in one zarr chunk (the
  variable `ledger`, one row per sample), which zarr writes atomically (temp file, then
  rename): no kill can leave "all cells counted, not done". `read` turns the ledger back
  into the `progress` and `done` variables the sweep works with.
- **Values before the ledger.** Every variable is chunked one sample per chunk (so shards
  never write the same file) and a sample's values are written before its ledger, so a kill
  between the two only means the rerun recomputes cells whose values are already there,
  with the same chunks, identically.
- **One writer per path.** Creating a store and saving a result take a lock file beside it
  (`NAME.lock`, `flock`): the kernel releases it when its holder dies, even by kill -9, and
  a process that finds it held by a live one names that holder (pid, host) if it waits too
  long. `assemble` writes a sharded recipe's final store exactly once: the first shard to
  get the lock with every sample done writes it; later ones find it there, identical.

A store damaged afterwards (a deleted or truncated chunk file) is refused on reading with
the path of the broken file, instead of reading as NaN or as a codec error.

The store records a hash of everything that determines its values (model, corruption,
metric, grid, direction, samples, vlmtrace version). Rerunning into a store of another
configuration is refused; `overwrite=True` replaces such a store. A store of the same
configuration is always resumed, never wiped, because another shard may be filling it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import UserError

PROGRESS = ("progress", "done")
LEDGER = "ledger"
"""On disk, a sample's progress and done flag: one int64 row per sample, one chunk per row."""
LEDGER_FIELD = "ledger_field"
MARKER = "vlmtrace_store"
"""An empty zarr group written into every store vlmtrace lays out, last: every chunk file
was written. (A group, not a plain file: zarr warns about files it does not know.)"""
LOCK_TIMEOUT = 600.0
"""Seconds to wait for another process writing the same path before naming it in an error."""


class StoreError(UserError):
    """A store that cannot be written or read as asked."""


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the lock: one writer per path --------------------------------------------------------

_HELD: set[str] = set()
"""Lock files this process holds: taking one again inside its block does not deadlock."""


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('purpose', 'writing')})"


@contextlib.contextmanager
def path_lock(path: Path, *, purpose: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of `path` (a file `NAME.lock` beside it) for the block.

    Waits up to `timeout` seconds (default `LOCK_TIMEOUT`) for a live holder, then raises a
    `StoreError` naming it. A holder that died released the lock with its last breath (the
    kernel drops `flock` locks of dead processes), so it is never waited for.
    """
    lock = path.with_name(path.name + ".lock")
    mine = str(lock.absolute())
    if mine in _HELD:  # this process holds it already (e.g. `assemble` calling `save`)
        yield
        return
    wait = LOCK_TIMEOUT if timeout is None else timeout
    with _boundary(path, "create"):
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    with handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{path} is being written by {_holder(lock)}, which still holds {lock.name} after "
                        f"{wait:g} s. Wait for it to finish, or write to another path."
                    ) from None
                time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "purpose": purpose,
                "since": time.time(),
            }
            handle.write(json.dumps(info))
            handle.flush()
            _HELD.add(mine)
            yield
        finally:
            _HELD.discard(mine)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- whole stores: laid out beside the target, then renamed in -----------------------------


@contextlib.contextmanager
def _boundary(path: Path, verb: str) -> Iterator[None]:
    """Turn the OS errors of writing `path` into a StoreError that says what to do."""
    try:
        yield
    except (NotADirectoryError, FileExistsError) as error:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise StoreError(f"could not {verb} {path}: {error.strerror or error}.") from None
        raise StoreError(
            f"could not {verb} {path}: {blocker} is a file, not a folder. Choose an output path "
            "whose folders are folders."
        ) from None
    except PermissionError as error:
        raise StoreError(
            f"could not {verb} {path}: permission denied ({error.filename or path}). Choose a folder "
            "you can write, or fix its permissions."
        ) from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            advice = "Free space or choose another disk"
        elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = "Choose a writable folder"
        else:
            advice = "Choose a writable path with free space"
        raise StoreError(
            f"could not {verb} {path}: {error.strerror or error}. {advice}, then rerun the same "
            "command: finished work in a sweep's store is kept and skipped."
        ) from None


def _clear_leftovers(path: Path) -> None:
    """Delete the hidden folders of layouts and replacements a killed run left (lock held)."""
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in path.parent.glob(f".{path.name}.replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_whole(ds: xr.Dataset, path: Path, *, replace: bool = False, **to_zarr: Any) -> None:
    """Write `ds` as a complete store at `path`, atomically: beside it first, then renamed.

    The caller holds `path_lock(path)`. With `replace`, an existing store at `path` is
    swapped out (and deleted) only once the new one is complete.
    """
    _clear_leftovers(path)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
    with _boundary(path, "write"):
        try:
            ds.to_zarr(partial, mode="w-", write_empty_chunks=True, **to_zarr)
            _mark(partial)
            if replace and path.exists():
                replaced = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
                os.rename(path, replaced)
                os.rename(partial, path)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.rename(partial, path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def _mark(path: Path) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    root.create_group(MARKER, attributes={"every_chunk_written": True})


def is_store(path: Path) -> bool:
    """True for a folder that holds a zarr store (format 2 or 3) at its top."""
    return any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zmetadata"))


def _check_chunks(path: Path, *, read: bool) -> None:
    """Refuse a store with a missing (or, with `read`, unreadable) chunk file, naming it."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    every_file = (path / MARKER).exists()
    for name, array in group.arrays():
        grid = [range(n) for n in array.cdata_shape]
        for index in itertools.product(*grid):
            key = array.metadata.encode_chunk_key(index)
            file = path / name / key
            if every_file and not file.exists():
                raise StoreError(
                    f"{path} is damaged: the chunk file {file} is missing (deleted after it was written). "
                    "Restore it from a backup, or delete the store and rerun the same command."
                )
            if read and file.exists():
                block = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks, strict=True))
                try:
                    array[block]
                except Exception as error:
                    raise StoreError(
                        f"{path} is damaged: the chunk file {file} cannot be read ({type(error).__name__}: "
                        f"{error}); it was truncated or overwritten. Restore it from a backup, or delete "
                        "the store and rerun the same command."
                    ) from None


def _decode(ds: xr.Dataset) -> xr.Dataset:
    """The sweep's view of a store: the ledger as its `progress` and `done` variables."""
    if LEDGER not in ds:
        return ds
    ledger = ds[LEDGER]
    ds = ds.drop_vars([LEDGER, LEDGER_FIELD])
    ds["progress"] = ledger.isel({LEDGER_FIELD: 0}, drop=True).astype(np.int64)
    ds["done"] = ledger.isel({LEDGER_FIELD: 1}, drop=True).astype(bool)
    return ds


def _encode(template: xr.Dataset) -> xr.Dataset:
    """The on-disk form of a sweep's template: `progress` and `done` as one `ledger` row."""
    if not set(PROGRESS) <= set(template.data_vars):
        return template
    ledger = np.stack(
        [template["progress"].values.astype(np.int64), template["done"].values.astype(np.int64)], 1
    )
    encoded = template.drop_vars(list(PROGRESS))
    encoded[LEDGER] = (("sample", LEDGER_FIELD), ledger)
    return encoded.assign_coords({LEDGER_FIELD: np.array(PROGRESS, dtype=object)})  # zarr-safe strings


def read_store(path: str | Path) -> xr.Dataset:
    """A store written by vlmtrace, loaded into memory; damage is a StoreError naming the file."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no result store at {path}.")
    if not path.is_dir() or not is_store(path):
        raise StoreError(
            f"{path} is not a zarr store (no zarr metadata at its top); give the store's folder."
        )
    consolidated = (path / ".zmetadata").exists()  # older stores were written without
    try:
        with xr.open_zarr(path, consolidated=consolidated) as ds:
            loaded = ds.load()
    except (KeyError, ValueError, FileNotFoundError):
        _check_chunks(path, read=True)  # names the broken file when one is
        raise StoreError(
            f"{path} is not a complete vlmtrace store (a variable or its metadata is missing). Delete "
            "it, or pass overwrite=True (CLI: --overwrite), and rerun the same command."
        ) from None
    except Exception:
        _check_chunks(path, read=True)
        raise
    if (path / MARKER).exists():
        _check_chunks(path, read=False)
    return _decode(loaded)


# --- the sweep's store ---------------------------------------------------------------------


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
        with path_lock(path, purpose="laying out a sweep's store"):
            _clear_leftovers(path)
            replace = False
            if path.exists():
                found = _stored_hash(path, overwrite=overwrite)
                if found != wanted:
                    if not overwrite:
                        raise StoreError(
                            f"{path} holds a sweep of another configuration or vlmtrace version "
                            f"(config hash {found}, this run {wanted}). Pass overwrite=True (CLI: "
                            "--overwrite) to replace it, or write to another path."
                        )
                    replace = True
            if replace or not path.exists():
                _create(path, template, replace=replace)
        sample_vars = [name for name, var in template.data_vars.items() if "sample" in var.dims]
        return cls(path, sample_vars)

    def write(self, ds: xr.Dataset, sample: int) -> None:
        """Write sample `sample`'s values, then (only then) its ledger: progress and done at once."""
        region = {"sample": slice(sample, sample + 1)}
        values = [name for name in self.sample_vars if name not in PROGRESS]
        with _boundary(self.path, "write to"):
            _region(ds, values, region).to_zarr(
                self.path, region=region, consolidated=False, write_empty_chunks=True
            )
            if (self.path / LEDGER).exists():
                ledger = _encode(ds[list(PROGRESS)]).drop_vars(LEDGER_FIELD)
                _region(ledger, [LEDGER], region).to_zarr(
                    self.path, region=region, consolidated=False, write_empty_chunks=True
                )
            else:  # a store laid out before the ledger existed
                _region(ds, list(PROGRESS), region).to_zarr(self.path, region=region, consolidated=False)

    def read(self) -> xr.Dataset:
        return read_store(self.path)


def _region(ds: xr.Dataset, names: list[str], region: dict[str, slice]) -> xr.Dataset:
    part = ds[names].isel(region)
    return part.drop_vars(list(part.coords))


def _stored_hash(path: Path, *, overwrite: bool) -> str:
    try:
        with xr.open_zarr(path, consolidated=False) as ds:
            return str(ds.attrs.get("config_hash", "<none>"))
    except Exception as error:
        if overwrite and is_store(path):  # a broken store of ours: replacing it was asked for
            return "<unreadable>"
        raise StoreError(
            f"{path} exists but is not a readable vlmtrace store ({type(error).__name__}). "
            + (
                "It holds a zarr store: pass overwrite=True (CLI: --overwrite) to replace it, "
                if is_store(path)
                else "It is not a zarr store, so vlmtrace will not delete it: "
            )
            + "or choose another path."
        ) from None


def _create(path: Path, template: xr.Dataset, *, replace: bool) -> None:
    """Lay out the empty result, one sample per chunk along `sample`, then rename it in."""
    encoded = _encode(template)
    encoding = {}
    for name, var in encoded.variables.items():
        if "sample" in var.dims and name != "sample":
            encoding[name] = {"chunks": tuple(1 if d == "sample" else n for d, n in var.sizes.items())}
    write_whole(encoded, path, replace=replace, encoding=encoding, consolidated=False)

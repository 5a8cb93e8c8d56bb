"""A sweep's zarr store, written as chunks complete, so a killed sweep resumes where it stopped.

A dataset-level trace of a 7B VLM runs for hours; losing it to a crash, an OOM or a typo is
the complaint users of the seed papers' scripts have. So a sweep lays its whole result out
on disk before the first forward (NaN cells, every coordinate, attrs), then after each chunk
writes that sample's cells and, *after* them, the sample's ledger (cells completed, done).

    with SweepStore.opened("trace.zarr", template, overwrite=False) as store:
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

**One writer for a store's whole life** (`vlmtrace.results.lock`). A sweep holds its store's
lock from the layout to its last chunk (shared with the other shards of the same sweep), so
no other run can replace or overwrite the store under it: `overwrite=True` and `save` are
refused while it runs, naming it. Every chunk write checks the store's configuration hash
first, and the dataset a sweep returns is read back only if the store still holds its own
configuration, so a result is never labelled with another run's metric.

**Checksums** (`vlmtrace.results.checksums`). Each sample's ledger row records the digest of
each of its value chunks, pending before they are written and committed after, and a digest
of the row itself (`vlmtrace.results.ledger`); the chunks written once at layout (coordinates)
and the attributes have theirs in the store's marker group. Reading recomputes every digest:
a damaged chunk, or one copied from another sample or store, is a StoreError naming the
file, as is a deleted or truncated one.

**Only vlmtrace's stores are replaced.** The store records a hash of everything that
determines its values (model, corruption, metric, grid, direction, samples, vlmtrace
version). Rerunning into a store of another configuration is refused; `overwrite=True`
replaces such a store, but never a path that is not a vlmtrace store (no vlmtrace metadata):
a folder of the user's, a plain file or a foreign zarr store is left as it is, and the
error names it. A store of the same configuration is always resumed, never wiped, because
another shard may be filling it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import checksums, ledger
from .checksums import value_digest
from .ledger import COMMITTED, LEDGER, LEDGER_FIELD, PROGRESS
from .lock import LOCK_TIMEOUT, PathLock, StoreError, StoreInUse, path_lock, refusal

__all__ = ["PathLock", "StoreError", "StoreInUse", "SweepStore", "path_lock", "read_store", "write_whole"]

MARKER = "vlmtrace_store"
"""A zarr group written into every store vlmtrace lays out, last: every chunk file was
written. Its attributes hold the digests of the chunks written at layout and of the
attributes. (A group, not a plain file: zarr warns about files it does not know.)"""


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def boundary(path: Path, verb: str) -> Iterator[None]:
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


def checked_path(path: str | Path) -> Path:
    """A store path, refusing the empty one (which names the current folder)."""
    if not isinstance(path, str | os.PathLike) or str(path).strip() in ("", "."):
        raise StoreError(
            f"store path {str(path)!r} names no store (an empty path is the current folder); give a "
            "store name such as 'trace.zarr'."
        )
    return Path(path)


# --- what a path holds ---------------------------------------------------------------------


def is_store(path: Path) -> bool:
    """True for a folder that holds a zarr store (format 2 or 3) at its top."""
    return any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zmetadata"))


def _attributes(folder: Path) -> dict[str, Any] | None:
    """The attributes of a zarr group or array folder (format 3 or 2); None if unreadable."""
    try:
        if (folder / "zarr.json").exists():
            return dict(json.loads((folder / "zarr.json").read_text()).get("attributes", {}))
        if (folder / ".zattrs").exists():
            return dict(json.loads((folder / ".zattrs").read_text()))
        if (folder / ".zgroup").exists() or (folder / ".zarray").exists():
            return {}
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return None


def is_vlmtrace_store(path: Path) -> bool:
    """True for a store vlmtrace wrote: its marker group, or vlmtrace's attributes at its top."""
    if path.is_symlink() or not path.is_dir() or not is_store(path):
        return False
    if (path / MARKER).is_dir():
        return True
    attrs = _attributes(path) or {}
    return "config_hash" in attrs or "version_vlmtrace" in attrs


def check_replaceable(path: Path) -> None:
    """Refuse to replace anything at `path` that vlmtrace did not write (an empty folder aside)."""
    if not os.path.lexists(path) or is_vlmtrace_store(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    if path.is_symlink():
        what = "a symbolic link"
    elif not path.is_dir():
        what = "a file, not a store"
    elif is_store(path):
        what = "a zarr store that vlmtrace did not write (no vlmtrace metadata)"
    else:
        what = "a folder that is not a vlmtrace store (no zarr or vlmtrace metadata)"
    raise StoreError(
        f"{path} is {what}, so vlmtrace leaves it as it is: overwrite replaces only stores vlmtrace "
        "wrote. Choose another path, or move it away yourself."
    )


# --- whole stores: laid out beside the target, then renamed in -----------------------------


def _clear_leftovers(path: Path) -> None:
    """Delete the hidden folders of layouts and replacements a killed run left (lock held)."""
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in path.parent.glob(f".{path.name}.replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_whole(
    ds: xr.Dataset, path: Path, *, replace: bool = False, unmarked: tuple[str, ...] = (), **to_zarr: Any
) -> None:
    """Write `ds` as a complete store at `path`, atomically: beside it first, then renamed.

    The caller holds `path_lock(path)`. With `replace`, an existing vlmtrace store at `path`
    is swapped out (and deleted) only once the new one is complete; anything else there is
    refused (`check_replaceable`). Digests of every chunk but those of `unmarked` variables
    (a sweep's ledger keeps theirs) go into the store's marker group.
    """
    if replace:
        check_replaceable(path)
    _clear_leftovers(path)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
    with boundary(path, "write"):
        try:
            ds.to_zarr(partial, mode="w-", write_empty_chunks=True, **to_zarr)
            _mark(partial, ds, unmarked)
            if replace and os.path.lexists(path):
                replaced = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
                os.rename(path, replaced)
                os.rename(partial, path)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.rename(partial, path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def _mark(path: Path, ds: xr.Dataset, unmarked: tuple[str, ...]) -> None:
    """Write the marker group: every chunk is written; digests of chunks and attributes."""
    import zarr

    recorded = checksums.record(path, ds, unmarked=unmarked)
    zarr.open_group(str(path), mode="r+").create_group(
        MARKER, attributes={"every_chunk_written": True, **recorded}
    )


# --- reading, with damage named by file -----------------------------------------------------


def _check_chunks(path: Path, *, read: bool) -> None:
    """Refuse a store with a missing (or, with `read`, unreadable) chunk file, naming it."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    every_file = (path / MARKER).exists()
    for name, array in group.arrays():
        grid = [range(n) for n in array.cdata_shape]
        for index in itertools.product(*grid):
            file = path / name / array.metadata.encode_chunk_key(index)
            if every_file and not file.exists():
                raise checksums.damaged(path, file, "is missing (deleted after it was written)")
            if read and file.exists():
                block = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks, strict=True))
                try:
                    array[block]
                except Exception as error:
                    raise checksums.damaged(
                        path,
                        file,
                        f"cannot be read ({type(error).__name__}: {error}); it was truncated or overwritten",
                    ) from None


def _marker(path: Path) -> dict[str, Any]:
    """The marker group's attributes ({} for a store written before it had any)."""
    folder = path / MARKER
    if not folder.exists():
        return {}
    attrs = _attributes(folder)
    if attrs is None:
        file = folder / ("zarr.json" if (folder / "zarr.json").exists() else ".zattrs")
        raise checksums.damaged(path, file, "cannot be read (it holds the store's checksums)")
    return attrs


WRITING_RETRIES = 40
"""Loads retried (0.05 s apart) while the only mismatch is in a sample that is not done: another
shard may be writing it at this instant (its values and its ledger row are read at different
moments). A damaged chunk stays damaged and is named after the retries."""


def _load(path: Path) -> xr.Dataset:
    """A store loaded into memory as on disk (ledger included), every checksum verified.

    Shards fill one store at once, and a load reads the ledger and the values at different
    moments. The ledger is read first: a row that says done was written after its values,
    and a done sample is never written again, so the values read after it are the ones it
    vouches for, and a mismatch there is damage. A row that says not done may be followed by
    values its shard wrote since: that snapshot mismatches in the unfinished sample only, and
    is taken again (`WRITING_RETRIES`). (Read in any other order, a load could pair a sample's
    done row with the values from before it, and name an intact store damaged.)
    """
    for attempt in range(WRITING_RETRIES + 1):
        loaded, marker = _load_once(path)
        checksums.verify(path, loaded, marker)
        damaged = ledger.mismatch(loaded)
        if damaged is None:
            return loaded
        if attempt == WRITING_RETRIES or not ledger.unfinished(loaded, damaged):
            raise checksums.damaged(path, checksums.chunk_file(path, *damaged), checksums.FOREIGN)
        time.sleep(0.05)
    raise AssertionError("unreachable")


def _load_once(path: Path) -> tuple[xr.Dataset, dict[str, Any]]:
    """A store loaded into memory as on disk, with its marker; the marker's chunks checked."""
    if not os.path.lexists(path):
        raise StoreError(f"no result store at {path}.")
    if not path.is_dir() or not is_store(path):
        raise StoreError(
            f"{path} is not a zarr store (no zarr metadata at its top); give the store's folder."
        )
    consolidated = (path / ".zmetadata").exists()  # older stores were written without
    try:
        with xr.open_zarr(path, consolidated=consolidated) as ds:
            if LEDGER in ds.variables:
                ds.variables[LEDGER].load()  # the rows first: see `_load`
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
    marker = _marker(path)
    if marker:
        _check_chunks(path, read=False)
    return loaded, marker


def read_store(path: str | Path) -> xr.Dataset:
    """A store written by vlmtrace, loaded into memory; damage is a StoreError naming the file."""
    return ledger.decode(_load(Path(path)))


# --- the sweep's store ---------------------------------------------------------------------


class SweepStore:
    """An on-disk result that chunks fill in, sample by sample, under the sweep's shared lock."""

    def __init__(self, path: Path, template: xr.Dataset):
        self.path = path
        self.config = str(template.attrs["config_hash"])
        self.sample_vars = [name for name, var in template.data_vars.items() if "sample" in var.dims]
        self._fields: list[str] | None = None
        """The ledger's fields on disk (None before `read`; [] for a store without a ledger)."""
        self._rows: np.ndarray | None = None
        """The ledger rows as this process last read or wrote them."""

    @classmethod
    @contextlib.contextmanager
    def opened(
        cls, path: str | Path | None, template: xr.Dataset, *, overwrite: bool = False
    ) -> Iterator[SweepStore | None]:
        """The store at `path` for the block, holding its lock shared; None when `path` is None.

        Lays the store out from `template` if there is none, reopens a store of the same
        configuration, and (with `overwrite`) replaces a vlmtrace store of another one unless
        a sweep holds it. The lock is held until the block ends, so no other run replaces the
        store while this sweep writes it.
        """
        if path is None:
            yield None
            return
        path = checked_path(path)
        with boundary(path, "create"):
            lock = PathLock(path)
        try:
            _take_for_sweep(path, lock, template, overwrite=overwrite)
            yield cls(path, template)
        finally:
            lock.close()

    def read(self) -> xr.Dataset:
        """The store as the sweep works with it; refused unless it holds this sweep's configuration."""
        raw = _load(self.path)
        found = str(raw.attrs.get("config_hash", "<none>"))
        if found != self.config:
            raise self._replaced(found, "it was not read")
        self._fields = [str(f) for f in raw[LEDGER_FIELD].values] if LEDGER in raw else []
        self._rows = raw[LEDGER].values.astype(np.int64).copy() if LEDGER in raw else None
        return ledger.decode(raw)

    def write(self, ds: xr.Dataset, sample: int) -> None:
        """Write sample `sample`'s values, then (only then) its ledger: progress and done at once.

        The store's configuration is checked first; the values' digests are recorded as
        pending before they are written and committed with the progress after.
        """
        if self._fields is None:
            self.read()
        region = {"sample": slice(sample, sample + 1)}
        values = [name for name in self.sample_vars if name not in PROGRESS]
        with boundary(self.path, "write to"):
            self._check_configuration(sample)
            if self._rows is None:  # a store laid out before the ledger existed
                _region(ds, values, region).to_zarr(
                    self.path, region=region, consolidated=False, write_empty_chunks=True
                )
                _region(ds, list(PROGRESS), region).to_zarr(self.path, region=region, consolidated=False)
                return
            fields = self._fields or []
            digests = {
                name: value_digest(ledger.by_sample(ds[name])[sample])
                for name in values
                if COMMITTED + name in fields
            }
            before = ledger.with_pending(self._rows[sample], fields, digests)
            if not np.array_equal(before, self._rows[sample]):
                self._write_row(sample, before)
            _region(ds, values, region).to_zarr(
                self.path, region=region, consolidated=False, write_empty_chunks=True
            )
            after = ledger.committed(
                before,
                fields,
                progress=int(ds["progress"].values[sample]),
                done=bool(ds["done"].values[sample]),
                digests=digests,
            )
            self._write_row(sample, after)

    def _write_row(self, sample: int, row: np.ndarray) -> None:
        row = ledger.sealed(row, self._fields or [], sample=sample, config=self.config)
        region = {"sample": slice(sample, sample + 1)}
        xr.Dataset({LEDGER: (("sample", LEDGER_FIELD), row[None])}).to_zarr(
            self.path, region=region, consolidated=False, write_empty_chunks=True
        )
        assert self._rows is not None
        self._rows[sample] = row

    def _check_configuration(self, sample: int) -> None:
        attrs = _attributes(self.path) if self.path.is_dir() else None
        found = "<none>" if attrs is None else str(attrs.get("config_hash", "<none>"))
        if found != self.config:
            raise self._replaced(found, f"sample {sample}'s chunk was not written")

    def _replaced(self, found: str, consequence: str) -> StoreError:
        return StoreError(
            f"{self.path} no longer holds this sweep's store: it holds config hash {found}, this run "
            f"{self.config}. Another process replaced it without taking its lock ({self.path.name}.lock), "
            f"and {consequence}. Write to another path, or rerun once nothing else writes there."
        )


def _region(ds: xr.Dataset, names: list[str], region: dict[str, slice]) -> xr.Dataset:
    part = ds[names].isel(region)
    return part.drop_vars(list(part.coords))


def _take_for_sweep(path: Path, lock: PathLock, template: xr.Dataset, *, overwrite: bool) -> None:
    """Hold `lock` shared on a store of the template's configuration, laying it out if needed.

    Under the shared lock the store is checked; if it must be laid out or replaced, the lock
    is taken exclusively for that (refused at once if another sweep holds it shared), then
    shared again, and the store checked again.
    """
    deadline, sweeps = time.monotonic() + LOCK_TIMEOUT, 0
    while True:
        state = None
        if lock.try_take(shared=True, purpose="filling a sweep's store"):
            state = _state(path, template, overwrite=overwrite)
            if state == "same":
                return
            lock.release()
            if lock.try_take(shared=False, purpose="laying out a sweep's store"):
                try:
                    _clear_leftovers(path)
                    state = _state(path, template, overwrite=overwrite)
                    if state != "same":
                        _create(path, template, replace=state == "other")
                finally:
                    lock.release()
                continue  # take it shared and check again: the store is there now
        sweeps = sweeps + 1 if state == "other" and lock.held_by_sweeps() else 0
        if sweeps >= 2:
            raise refusal(path, lock, LOCK_TIMEOUT, sweeps=True)
        if time.monotonic() > deadline:
            raise refusal(path, lock, LOCK_TIMEOUT, sweeps=False)
        time.sleep(0.05)


def _state(path: Path, template: xr.Dataset, *, overwrite: bool) -> str:
    """ "same" (a store of this configuration), "missing" or "other" (to replace), or an error."""
    if not os.path.lexists(path):
        return "missing"
    if not is_vlmtrace_store(path):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            return "missing"  # an empty folder: nothing to keep
        check_replaceable(path)  # raises: vlmtrace deletes only what it wrote
    wanted = template.attrs["config_hash"]
    attrs = _attributes(path)
    found = None if attrs is None else attrs.get("config_hash")
    if found == wanted:
        return "same"
    if overwrite:
        return "other"
    if found is None:
        raise StoreError(
            f"{path} is a vlmtrace store that cannot be read (its metadata is broken or it holds no "
            "configuration hash). Pass overwrite=True (CLI: --overwrite) to replace it, or choose "
            "another path."
        )
    raise StoreError(
        f"{path} holds a sweep of another configuration or vlmtrace version (config hash {found}, "
        f"this run {wanted}). Pass overwrite=True (CLI: --overwrite) to replace it, or write to another "
        "path."
    )


def _create(path: Path, template: xr.Dataset, *, replace: bool) -> None:
    """Lay out the empty result, one sample per chunk along `sample`, then rename it in."""
    values = [n for n, v in template.data_vars.items() if "sample" in v.dims and n not in PROGRESS]
    encoded = ledger.encode(template, values)
    encoding = {}
    for name, var in encoded.variables.items():
        if "sample" in var.dims and name != "sample":
            encoding[name] = {"chunks": tuple(1 if d == "sample" else n for d, n in var.sizes.items())}
    write_whole(
        encoded, path, replace=replace, unmarked=(LEDGER, *values), encoding=encoding, consolidated=False
    )

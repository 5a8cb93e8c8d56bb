"""Checksums of a store's chunks: recorded as each chunk is written, verified when it is read.

A store is files that users copy, sync and back up. A chunk file with a flipped bit still
decodes, and a chunk copied from another sample (or another store) is a valid chunk: both
used to read back as plausible numbers. So vlmtrace records a digest of every chunk when it
writes it, and `vlmtrace.results.store.read_store` recomputes them all and names the file of
any chunk that differs.

    digests = chunk_digests(values, chunks=(1, 2, 3, 10))   # {"0.0.0.0": digest, "1.0.0.0": ...}
    value_digest(values[0])                                  # one chunk's digest
    recorded = record(path, ds, unmarked=())                 # a whole store's, for its marker group
    verify(path, loaded, recorded)                           # StoreError naming the file that differs

A digest is of the chunk's *decoded values* (what a reader gets), in a canonical form: the
numbers as little-endian 64-bit values, anything else (strings) as JSON. It does not depend
on the codec, the zarr format or the width a reader's numpy chooses. Attributes get a digest
too, so a flipped bit cannot relabel a metric or a unit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .lock import StoreError


def _canonical(values: np.ndarray) -> bytes:
    values = np.asarray(values)
    kind = values.dtype.kind
    if kind == "b":
        values = values.astype("<u1")
    elif kind in "iu":
        values = values.astype("<i8")
    elif kind == "f":
        values = values.astype("<f8")
    elif kind == "c":
        values = values.astype("<c16")
    else:  # strings and objects: their text
        return json.dumps(np.asarray(values, dtype=object).tolist(), default=str).encode()
    return np.ascontiguousarray(values).tobytes()


def _as_int64(digest: bytes) -> int:
    """The first 8 bytes of a digest as a signed int64: it fits an int64 ledger column."""
    return int(np.frombuffer(digest[:8], dtype="<i8")[0])


def value_digest(values: np.ndarray) -> int:
    """Digest of one chunk's values (shape included: a chunk of another shape never matches)."""
    values = np.asarray(values)
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(repr(values.shape).encode())
    hasher.update(_canonical(values))
    return _as_int64(hasher.digest())


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def attrs_digest(attrs: Mapping[str, Any]) -> int:
    """Digest of a dataset's or variable's attributes (JSON, keys sorted)."""
    text = json.dumps(dict(attrs), sort_keys=True, default=_plain)
    return _as_int64(hashlib.blake2b(text.encode(), digest_size=16).digest())


def row_digest(sample: int, config: str, fields: np.ndarray) -> int:
    """Digest of one ledger row: its sample, the store's configuration and the row's fields.

    A ledger row copied from another sample, or from a store of another configuration, or
    with a flipped bit, does not match the digest it carries.
    """
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{sample}:{config}:".encode())
    hasher.update(np.ascontiguousarray(np.asarray(fields, dtype="<i8")).tobytes())
    return _as_int64(hasher.digest())


def blocks(
    shape: tuple[int, ...], chunks: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(chunk index, slices) of every chunk of an array of `shape` cut into `chunks`."""
    grid = [range(-(-n // c)) if n else range(0) for n, c in zip(shape, chunks, strict=True)]
    for index in itertools.product(*grid):
        yield index, tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))


def chunk_key(index: tuple[int, ...]) -> str:
    """How a chunk index is written in recorded digests: "0.2.0" (zero dims: "")."""
    return ".".join(str(i) for i in index)


def chunk_digests(values: np.ndarray, *, chunks: tuple[int, ...]) -> dict[str, int]:
    """Digest of every chunk of an array, by chunk key."""
    values = np.asarray(values)
    if values.ndim == 0:
        return {"": value_digest(values)}
    return {chunk_key(index): value_digest(values[block]) for index, block in blocks(values.shape, chunks)}


# --- a whole store: recorded at layout or save, verified on every read ----------------------


def record(path: Path, ds: xr.Dataset, *, unmarked: tuple[str, ...]) -> dict[str, Any]:
    """Digests of every chunk of the store just written at `path` from `ds` (but the arrays
    `unmarked`, whose digests a sweep's ledger keeps) and of its attributes, as read back."""
    import zarr

    digests = {}
    for name, array in zarr.open_group(str(path), mode="r").arrays():
        if name not in unmarked:
            chunks = tuple(array.chunks)
            digests[name] = {
                "chunks": list(chunks),
                "keys": chunk_digests(ds.variables[name].values, chunks=chunks),
            }
    with xr.open_zarr(path, consolidated=(path / ".zmetadata").exists()) as back:
        attributes = {"": attrs_digest(back.attrs)}
        attributes.update({str(n): attrs_digest(v.attrs) for n, v in back.variables.items()})
    return {"digests": digests, "attributes": attributes}


FOREIGN = (
    "does not hold what was written there (its checksum differs: a flipped bit, or a chunk copied "
    "from another sample or store)"
)


def damaged(path: Path, file: Path, what: str) -> StoreError:
    return StoreError(
        f"{path} is damaged: the chunk file {file} {what}. Restore it from a backup, or delete the "
        "store and rerun the same command."
    )


def chunk_file(path: Path, name: str, index: tuple[int, ...]) -> Path:
    """The file of chunk `index` of array `name` (its folder, if the array's metadata is broken)."""
    import zarr

    try:
        array = zarr.open_array(str(path / name), mode="r")
        return path / name / array.metadata.encode_chunk_key(index)
    except Exception:
        return path / name


def _metadata_file(folder: Path) -> Path:
    return folder / ("zarr.json" if (folder / "zarr.json").exists() else ".zattrs")


def verify(path: Path, loaded: xr.Dataset, recorded: Mapping[str, Any]) -> None:
    """Recompute the digests `record` made against the loaded store; a mismatch names the file."""
    for name, digest in recorded.get("attributes", {}).items():
        variable = loaded.variables.get(name) if name else None
        attrs = loaded.attrs if name == "" else variable.attrs if variable is not None else None
        if attrs is None or attrs_digest(attrs) != digest:
            file = _metadata_file(path / name if name else path)
            raise StoreError(
                f"{path} is damaged: the attributes in {file} differ "
                "from those written (they label the values: model, metric, units). Restore it from a "
                "backup, or delete the store and rerun the same command."
            )
    for name, digests in recorded.get("digests", {}).items():
        if name not in loaded.variables:
            raise damaged(path, path / name, "is missing")
        values = loaded.variables[name].values
        for index, block in blocks(values.shape, tuple(digests["chunks"])) if values.ndim else [((), ())]:
            if value_digest(values[block]) != digests["keys"].get(chunk_key(index)):
                raise damaged(path, chunk_file(path, name, index), FOREIGN)

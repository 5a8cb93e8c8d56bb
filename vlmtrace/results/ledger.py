"""A sweep store's ledger: per sample, one row of what is finished and what its chunks hold.

A sweep writes a sample's values, then its ledger row. The row is one zarr chunk, written
atomically, so everything in it changes together: the cells completed (`progress`), the
`done` flag, and the digest of each of the sample's value chunks (`vlmtrace.results.checksums`).
A digest is first recorded as *pending*, before the values are written, then as *committed*
with the progress, after: whatever instant a kill hits, each chunk on disk matches one of
the two. The row's last field is a digest of the row itself (its sample, the store's
configuration hash and its other fields), so a row copied from another sample or store, or
with a flipped bit, is told apart too.

    encoded = encode(template, values=["mlp", "clean", "corrupt"])   # the template, on disk
    row = sealed(with_pending(row, fields, digests), fields, sample=i, config=hash)
    mismatch(loaded)        # (variable, chunk index) of the first chunk or row that does not match
    decode(loaded)          # the sweep's view: `progress` and `done` variables
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .checksums import row_digest, value_digest

PROGRESS = ("progress", "done")
LEDGER = "ledger"
"""The variable: one int64 row per sample, one chunk per row."""
LEDGER_FIELD = "ledger_field"
COMMITTED, PENDING, ROW = "digest:", "pending:", "row"
"""Field names: `digest:NAME` and `pending:NAME` per value variable NAME, and the row's own digest."""


def fields_for(values: list[str]) -> list[str]:
    """The ledger's fields for a sweep whose value variables are `values`."""
    return [*PROGRESS, *(COMMITTED + n for n in values), *(PENDING + n for n in values), ROW]


def by_sample(variable: xr.DataArray) -> np.ndarray:
    """A variable's values with `sample` first: element i is sample i's chunk."""
    return np.moveaxis(variable.values, variable.dims.index("sample"), 0)


def with_pending(row: np.ndarray, fields: list[str], digests: dict[str, int]) -> np.ndarray:
    """`row` with these value digests recorded as pending (before the values are written)."""
    row = row.copy()
    for name, digest in digests.items():
        row[fields.index(PENDING + name)] = digest
    return row


def committed(
    row: np.ndarray, fields: list[str], *, progress: int, done: bool, digests: dict[str, int]
) -> np.ndarray:
    """`row` after its values are written: the progress, the done flag and the digests committed."""
    row = row.copy()
    row[fields.index("progress")] = progress
    row[fields.index("done")] = int(done)
    for name, digest in digests.items():
        row[fields.index(COMMITTED + name)] = digest
    return row


def sealed(row: np.ndarray, fields: list[str], *, sample: int, config: str) -> np.ndarray:
    """`row` with its own digest in its last field (rows of older stores have none)."""
    if fields and fields[-1] == ROW:
        row = row.copy()
        row[-1] = row_digest(sample, config, row[:-1])
    return row


def encode(template: xr.Dataset, values: list[str]) -> xr.Dataset:
    """The on-disk form of a sweep's template: `progress`, `done` and digests as one row each."""
    fields = fields_for(values)
    config = str(template.attrs["config_hash"])
    chunks = {name: by_sample(template[name]) for name in values}
    rows = []
    for i in range(template.sizes["sample"]):
        digests = {name: value_digest(chunks[name][i]) for name in values}
        row = np.zeros(len(fields), dtype=np.int64)
        row = with_pending(row, fields, digests)
        row = committed(
            row,
            fields,
            progress=int(template["progress"].values[i]),
            done=bool(template["done"].values[i]),
            digests=digests,
        )
        rows.append(sealed(row, fields, sample=i, config=config))
    encoded = template.drop_vars(list(PROGRESS))
    encoded[LEDGER] = (
        ("sample", LEDGER_FIELD),
        np.array(rows, dtype=np.int64).reshape(len(rows), len(fields)),
    )
    return encoded.assign_coords({LEDGER_FIELD: np.array(fields, dtype=object)})  # zarr-safe strings


def decode(ds: xr.Dataset) -> xr.Dataset:
    """The sweep's view of a store: the ledger as its `progress` and `done` variables."""
    if LEDGER not in ds:
        return ds
    ledger = ds[LEDGER]
    ds = ds.drop_vars([LEDGER, LEDGER_FIELD])
    ds["progress"] = ledger.isel({LEDGER_FIELD: 0}, drop=True).astype(np.int64)
    ds["done"] = ledger.isel({LEDGER_FIELD: 1}, drop=True).astype(bool)
    return ds


def mismatch(loaded: xr.Dataset) -> tuple[str, tuple[int, ...]] | None:
    """(variable, chunk index) of the first ledger row, or value chunk, that does not match its
    recorded digest; None when all match (or the store's ledger records none)."""
    if LEDGER not in loaded or ROW not in [str(f) for f in loaded[LEDGER_FIELD].values]:
        return None
    fields = [str(f) for f in loaded[LEDGER_FIELD].values]
    ledger = loaded[LEDGER].values.astype(np.int64)
    config = str(loaded.attrs.get("config_hash", ""))
    for i, row in enumerate(ledger):
        if row_digest(i, config, row[:-1]) != row[-1]:
            return LEDGER, (i, 0)
    for f, field in enumerate(fields):
        if not field.startswith(COMMITTED):
            continue
        name = field[len(COMMITTED) :]
        pending = fields.index(PENDING + name)
        values = by_sample(loaded[name])
        for i in range(len(ledger)):
            if value_digest(values[i]) not in (ledger[i, f], ledger[i, pending]):
                return name, tuple(i if d == "sample" else 0 for d in loaded[name].dims)
    return None


def unfinished(loaded: xr.Dataset, damaged: tuple[str, tuple[int, ...]]) -> bool:
    """True if `mismatch`'s finding is a value chunk of a sample whose row says not done: one a
    shard may be writing right now (a done sample is never written again; a row is written whole)."""
    name, index = damaged
    if name == LEDGER:
        return False
    sample = index[loaded[name].dims.index("sample")]
    fields = [str(f) for f in loaded[LEDGER_FIELD].values]
    return not bool(loaded[LEDGER].values[sample, fields.index("done")])

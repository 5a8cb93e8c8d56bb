"""Results: labelled xarray Datasets, their zarr stores, and statistics over samples.

dataset.py   the result's layout, provenance attrs, save / open_result
store.py     resumable, sharded sweep stores (crash-safe layout; only vlmtrace's stores replaced)
ledger.py    a sweep store's per-sample row: progress, done and chunk checksums
lock.py      one writer per store path, for a store's whole life (exclusive / shared)
checksums.py digests of chunks and attributes, recorded when written, verified when read
stats.py     bootstrap means, segment averages, where a trace's effect spreads
"""

from .dataset import open_result, save

__all__ = ["open_result", "save"]

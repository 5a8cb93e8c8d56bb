"""Results: labelled xarray Datasets, their zarr stores, and statistics over samples.

dataset.py   the result's layout, provenance attrs, save / open_result
store.py     resumable, sharded sweep stores (crash-safe layout, one writer per path)
stats.py     bootstrap means, segment averages, where a trace's effect spreads
"""

from .dataset import open_result, save

__all__ = ["open_result", "save"]

"""Results as labelled xarray Datasets, stored on zarr with their provenance.

A causal trace is a labelled array: a value per (sample, window, layer, position[, head]).
Keeping the labels (layer ids, token strings, segment names) next to the numbers is what
lets a researcher write `ds["mlp"].sel(window=6).groupby("label")` instead of remembering
which axis was which, and lets a store written today be read in a year.

Dimension vocabulary, used everywhere in vlmtrace:

    sample     one per Sample (coordinate: Sample.id)
    window     window size in layers
    layer      the window's centre layer
    head       attention head (head sites only)
    position   k-th position covered by the grid (per-sample coordinates `token`, `label`
               and `index`: token string, segment label, index in the prompt)
    segment    a whole segment, when the grid patches segments

Data variables: one per site kind (the patched runs' metric), plus `clean` and `corrupt`
(per sample). Attrs record the model, corruption, metric, direction, grid and versions;
zarr attrs must be JSON, so structured attrs are stored as JSON strings.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

if TYPE_CHECKING:
    from .corruptions import Corruption
    from .data.sample import Sample
    from .metrics import Metric
    from .models.load import VLM
    from .sites import Grid
    from .sweep import SampleResult


def versions() -> dict[str, str]:
    """Versions of the packages that determine a result."""
    import nnsight
    import torch
    import transformers

    from . import __version__

    return {
        "vlmtrace": __version__,
        "nnsight": nnsight.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def provenance(vlm: VLM, **fields: Any) -> dict[str, Any]:
    """Attrs every result carries: what model, what experiment, which software."""
    attrs = {
        "model": vlm.name,
        "model_revision": vlm.revision or "",
        "model_family": vlm.adapter.family,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **{f"version_{k}": v for k, v in versions().items()},
    }
    for key, value in fields.items():
        attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    return attrs


def sample_ids(samples: list[Sample]) -> list[str]:
    """The `sample` coordinate: Sample.id, made unique."""
    ids = [sample.id or f"sample{i}" for i, sample in enumerate(samples)]
    if len(set(ids)) != len(ids):  # duplicate ids would make `sel(sample=...)` ambiguous
        ids = [f"{sid}#{i}" for i, sid in enumerate(ids)]
    return ids


def patching_dataset(
    vlm: VLM,
    results: list[SampleResult],
    *,
    grid: Grid,
    stack: str,
    corruption: Corruption,
    metric: Metric,
    direction: str,
    whole_answer: bool,
    recipe: str,
) -> xr.Dataset:
    """Assemble per-sample sweep results into one Dataset."""
    from .sites import HEAD_SITES

    windows = list(grid.windows)
    layers = sorted({cell.layer for r in results for cell in r.cells})
    heads = sorted({cell.head for r in results for cell in r.cells if cell.head is not None})
    by_token = grid.positions == "tokens"
    if by_token:
        keys: list[Any] = list(range(max(len(grid.selected(r.segments)) for r in results)))
    else:
        keys = list(dict.fromkeys(cell.key for r in results for cell in r.cells))
    place = "position" if by_token else "segment"
    n = len(results)
    arrays: dict[str, np.ndarray] = {}
    for site in grid.sites:
        shape = [n, len(windows), len(layers)] + ([len(heads)] if site in HEAD_SITES else []) + [len(keys)]
        arrays[site] = np.full(shape, np.nan)
    for s, result in enumerate(results):
        for cell, value in zip(result.cells, result.values, strict=True):
            index = [s, windows.index(cell.window), layers.index(cell.layer)]
            if cell.head is not None:
                index.append(heads.index(cell.head))
            index.append(keys.index(cell.key))
            arrays[cell.site][tuple(index)] = value
    data_vars = {}
    for site, values in arrays.items():
        dims = ["sample", "window", "layer"] + (["head"] if site in HEAD_SITES else []) + [place]
        data_vars[site] = (dims, values)
    data_vars["clean"] = (["sample"], np.array([r.clean for r in results]))
    data_vars["corrupt"] = (["sample"], np.array([r.corrupt for r in results]))
    coords: dict[str, Any] = {
        "sample": sample_ids([r.sample for r in results]),
        "window": windows,
        "layer": layers,
        place: keys,
    }
    if heads:
        coords["head"] = heads
    if by_token:
        coords.update(position_coords(results, grid, len(keys)))
    attrs = provenance(
        vlm,
        recipe=recipe,
        experiment="patch",
        stack=stack,
        corruption=corruption.describe(),
        metric=metric.name,
        direction=direction,
        whole_answer=whole_answer,
        grid={k: (list(v) if isinstance(v, tuple | list) else v) for k, v in asdict(grid).items()},
    )
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def position_coords(results: list[SampleResult], grid: Grid, width: int) -> dict[str, Any]:
    """Per-sample token strings, segment labels and prompt indices of grid positions."""
    tokens = np.full((len(results), width), "", dtype=object)
    labels = np.full((len(results), width), "", dtype=object)
    index = np.full((len(results), width), -1)
    for s, result in enumerate(results):
        for k, p in enumerate(grid.selected(result.segments)):
            tokens[s, k] = result.segments.tokens[p]
            labels[s, k] = result.segments.labels[p]
            index[s, k] = p
    dims = ("sample", "position")
    return {
        "token": (dims, tokens.astype(str)),
        "label": (dims, labels.astype(str)),
        "index": (dims, index),
    }


class StoreError(ValueError):
    """A store that cannot be written or read as asked."""


def save(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a Dataset to a zarr store; refuses to replace an existing store unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    try:
        ds.to_zarr(path, mode="w", consolidated=False)
    except OSError as error:
        raise StoreError(
            f"could not write {path}: {error.strerror or error}. Choose a writable path with free space."
        ) from None
    return path


def open_result(path: str | Path) -> xr.Dataset:
    """Read a store written by `save`, loaded into memory."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no result store at {path}.")
    return xr.open_zarr(path, consolidated=False).load()


def combine(datasets: dict[str, xr.Dataset], *, dim: str) -> xr.Dataset:
    """Stack results of several conditions (corruptions, constraints, metrics) along `dim`.

    Each condition's own attrs (its corruption, metric) are kept under `conditions`, since
    xarray would otherwise keep only the first condition's.
    """
    names = list(datasets)
    combined = xr.concat([datasets[n] for n in names], dim=dim, combine_attrs="drop_conflicts")
    combined = combined.assign_coords({dim: names})
    combined.attrs["conditions"] = json.dumps(
        {
            n: {
                k: v
                for k, v in datasets[n].attrs.items()
                if k in ("corruption", "metric", "direction", "grid")
            }
            for n in names
        }
    )
    return combined

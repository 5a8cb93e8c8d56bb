"""Averaging traces over samples honestly: by segment, with bootstrap confidence intervals.

Samples of one question family have different token counts, so position k of one sample is
not position k of another. Averages are taken over *segments* ("visual", "last", ...), which
mean the same thing in every sample, and reported with a bootstrap interval over samples so
a reader can tell a finding from the noise of eight examples.

    effect = ds["mlp"] - ds["corrupt"]
    per_segment = by_segment(effect)             # (sample, window, layer, segment)
    summary = bootstrap_mean(per_segment, seed=0)  # variables mean, low, high
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def by_segment(da: xr.DataArray, *, how: str = "mean") -> xr.DataArray:
    """Reduce the `position` dim to `segment`, using each sample's own `label` coordinate.

    `how` is "mean" (average effect of a segment's tokens) or "max" (its strongest token).
    """
    if "position" not in da.dims:
        raise ValueError(
            f"by_segment needs a 'position' dim (a grid with positions='tokens'); got {da.dims}. "
            "A grid with positions='segments' is already by segment."
        )
    labels = da["label"].values
    names = list(dict.fromkeys(label for label in labels.ravel() if label))
    reduce = np.nanmean if how == "mean" else np.nanmax
    moved = da.transpose("sample", ..., "position")
    out = np.full(moved.shape[:-1] + (len(names),), np.nan)
    for s in range(moved.sizes["sample"]):
        for k, name in enumerate(names):
            chosen = labels[s] == name
            if chosen.any():
                with np.errstate(all="ignore"):
                    out[s, ..., k] = reduce(moved.values[s][..., chosen], axis=-1)
    dims = [d for d in moved.dims if d != "position"] + ["segment"]
    coords = {d: moved[d] for d in dims if d in moved.coords and d != "segment"}
    return xr.DataArray(out, dims=dims, coords={**coords, "segment": names}, name=da.name)


def bootstrap_mean(
    da: xr.DataArray, *, dim: str = "sample", n: int = 1000, level: float = 0.95, seed: int = 0
) -> xr.Dataset:
    """Mean over `dim` with a percentile bootstrap interval (seeded, recorded in attrs)."""
    values = da.transpose(dim, ...).values
    rng = np.random.default_rng(seed)
    count = values.shape[0]
    draws = rng.integers(0, count, size=(n, count))
    with np.errstate(all="ignore"):
        means = np.nanmean(values[draws], axis=1)
        low, high = np.nanpercentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=0)
        mean = np.nanmean(values, axis=0)
    dims = [d for d in da.transpose(dim, ...).dims if d != dim]
    coords = {d: da[d] for d in dims if d in da.coords}
    data = {name: (dims, value) for name, value in (("mean", mean), ("low", low), ("high", high))}
    attrs = {"bootstrap_samples": n, "bootstrap_level": level, "bootstrap_seed": seed, "over": dim}
    return xr.Dataset(data, coords=coords, attrs=attrs)

"""Averaging traces over samples honestly: by segment, with bootstrap confidence intervals.

Samples of one question family have different token counts, so position k of one sample is
not position k of another. Averages are taken over *segments* ("visual", "last", ...), which
mean the same thing in every sample, and reported with a bootstrap interval over samples so
a reader can tell a finding from the noise of eight examples.

    effect = ds["mlp"] - ds["corrupt"]
    per_segment = by_segment(effect)             # (sample, window, layer, segment)
    summary = bootstrap_mean(per_segment, seed=0)  # variables mean, low, high
    where = spread(ds, "block")                    # which layers and tokens carry the effect
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

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
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
                    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
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
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # a cell with no value in any sample (a position one stack lacks) stays NaN, silently
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        means = np.nanmean(values[draws], axis=1)
        low, high = np.nanpercentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=0)
        mean = np.nanmean(values, axis=0)
    dims = [d for d in da.transpose(dim, ...).dims if d != dim]
    coords = {d: da[d] for d in dims if d in da.coords}
    data = {name: (dims, value) for name, value in (("mean", mean), ("low", low), ("high", high))}
    attrs = {"bootstrap_samples": n, "bootstrap_level": level, "bootstrap_seed": seed, "over": dim}
    return xr.Dataset(data, coords=coords, attrs=attrs)


@dataclass(frozen=True)
class Spread:
    """The cells of a trace that carry at least `threshold` of the effect."""

    layers: tuple[int, ...]  # layers at which some token *before the last* carries the effect
    positions: tuple[int, ...]  # tokens that carry it at some layer, the last token included
    tokens: tuple[str, ...]  # those tokens, as text
    peak: float  # the largest normalised effect of any token before the last

    @property
    def degenerate(self) -> bool:
        """True when earlier tokens matter at fewer than 2 layers, or only one token matters.

        A trace whose whole effect sits on the last token says only "the answer is read out
        at the end", which is true of every model; a trace worth reading shows an earlier
        token carrying the information over several layers before the hand-over.
        """
        return len(self.layers) < 2 or len(self.positions) < 2


def spread(ds: xr.Dataset, site: str, *, threshold: float = 0.05, window: int | None = None) -> Spread:
    """Where a trace's normalised effect, averaged over samples, sits (window: the smallest).

    Samples must share one token layout (one question template), because position k must
    mean the same token in all of them; otherwise average by segment (`by_segment`).
    """
    from vlmtrace.engine.metrics import normalised  # imports torch: only when a trace is read

    labels = ds["label"].values
    if (labels != labels[:1]).any():
        raise ValueError(
            "spread needs samples with one token layout (one question template); these differ. "
            "Trace one template at a time, or average by segment with by_segment."
        )
    effect = normalised(ds, site).mean("sample")
    if "window" in effect.dims:
        effect = effect.sel(window=window if window is not None else int(effect["window"].min()))
    hot = (effect >= threshold).transpose("layer", "position")
    earlier = hot.isel(position=np.flatnonzero(labels[0] != "last")).values
    positions = effect["position"].values[hot.values.any(axis=0)]
    return Spread(
        layers=tuple(int(x) for x in effect["layer"].values[earlier.any(axis=1)]),
        positions=tuple(int(p) for p in positions),
        tokens=tuple(str(t) for t in ds["token"].values[0][positions]),
        peak=float(effect.isel(position=np.flatnonzero(labels[0] != "last")).max()),
    )

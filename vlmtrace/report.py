"""From a patching result to what a reader needs: effects, a headline, standard figures.

Every patching recipe ends the same way: indirect effects (patched - corrupted), averaged
by segment with bootstrap intervals, drawn per window size, and one sentence naming the
strongest cell. This module does that once for all recipes.

    effect = indirect_effect(ds, "mlp")            # dims as ds["mlp"]
    print(headline(ds, sites=("mlp", "attn")))
    paths = patching_figures(ds, "out/trace", sites=("mlp", "attn"))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plots
from .stats import bootstrap_mean, by_segment


def indirect_effect(ds: xr.Dataset, site: str) -> xr.DataArray:
    """m(patched) - m(corrupted): Basu et al.'s and ROME's indirect effect."""
    effect = ds[site] - ds["corrupt"]
    effect.name = f"{site} indirect effect"
    return effect


def segment_summary(ds: xr.Dataset, site: str, *, seed: int = 0) -> xr.Dataset:
    """Indirect effect averaged by segment, then over samples with a bootstrap CI."""
    return bootstrap_mean(by_segment(indirect_effect(ds, site)), seed=seed)


def strongest(summary: xr.Dataset) -> dict:
    """Coordinates and value of the largest mean effect in a summary."""
    mean = summary["mean"]
    flat = int(np.nanargmax(np.abs(mean.values))) if np.isfinite(mean.values).any() else 0
    where = dict(zip(mean.dims, np.unravel_index(flat, mean.shape), strict=True))
    coords = {dim: mean[dim].values[i].item() for dim, i in where.items()}
    cell = {dim: i for dim, i in where.items()}
    return {
        **coords,
        "mean": float(mean.values[tuple(cell.values())]),
        "low": float(summary["low"].values[tuple(cell.values())]),
        "high": float(summary["high"].values[tuple(cell.values())]),
    }


def headline(ds: xr.Dataset, *, sites: Sequence[str], label: str = "") -> str:
    """One sentence per site: where the largest average indirect effect sits."""
    lines = []
    n = ds.sizes["sample"]
    gap = float((ds["clean"] - ds["corrupt"]).mean())
    lines.append(
        f"{label}clean - corrupted = {gap:+.3f} (mean over {n} samples, metric {ds.attrs['metric']})"
    )
    for site in sites:
        best = strongest(segment_summary(ds, site))
        lines.append(
            f"{label}{site}: largest mean indirect effect {best['mean']:+.3f} "
            f"[{best['low']:+.3f}, {best['high']:+.3f}] at layer {best['layer']}, "
            f"window {best['window']}, segment '{best['segment']}'"
        )
    return "\n".join(lines)


def patching_figures(
    ds: xr.Dataset, out_dir: str | Path, *, sites: Sequence[str], tag: str = ""
) -> list[Path]:
    """Per site: window panels by segment, a CI-annotated heatmap, and sample 0's token map."""
    out_dir = Path(out_dir)
    paths = []
    for site in sites:
        summary = segment_summary(ds, site)
        name = f"{tag}{site}"
        paths.append(
            plots.window_panels(
                summary["mean"],
                path=out_dir / f"{name}_windows.png",
                title=f"{name}: mean indirect effect by segment",
            )
        )
        window = int(summary["window"].values[len(summary["window"]) // 2])
        paths.append(
            plots.segment_heatmap(summary.sel(window=window), path=out_dir / f"{name}_segments_w{window}.png")
        )
        first = indirect_effect(ds, site).isel(sample=0).sel(window=window)
        first = first.dropna("position", how="all")
        paths.append(
            plots.heatmap(
                first,
                path=out_dir / f"{name}_sample0_w{window}.png",
                title=f"{name}, sample {ds['sample'].values[0]}, window {window}",
            )
        )
    return paths

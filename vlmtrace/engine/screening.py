"""Screening: which cells to patch exactly, and how well estimates rank them.

An attribution estimate (`vlmtrace.engine.attribution`) is worth what its ranking is worth:
`screen` keeps the cells it ranks highest for `patch(..., screen=k)` to patch exactly, and
`agreement` measures, against a full exact sweep, whether those are the cells that matter:

    estimates = attribute(vlm, samples, corruption=vt.ImagePair(), grid=grid)
    masks = screen(estimates, k=15)                  # 3x the cells to find: see agreement
    agreement(estimates, exact, k=5, candidates=15)["mlp"]["material_recall"]

Both rank cells by |effect| (the cell minus the run it patches; negative effects matter as
much as positive ones) within one sample and one window size: wider windows sum more layers.
`benchmarks/screen.py` reports these figures on every organism.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..results.dataset import Layout
from .planning import Plan

__all__ = ["MATERIAL", "agreement", "effects", "keep_screened", "screen", "site_variables", "spearman"]

MATERIAL = 0.05
"""A cell's exact effect is material (a screen must not miss it) from this share of |clean - corrupt|."""


def site_variables(ds: xr.Dataset) -> list[str]:
    """The per-site variables of a patching or attribution result (those with a layer dim)."""
    return [str(name) for name, var in ds.data_vars.items() if "layer" in var.dims]


def effects(ds: xr.Dataset, site: str) -> xr.DataArray:
    """A site's cells minus the run they patch: m_patched - m_corrupt (denoise) or - m_clean."""
    direction = ds.attrs.get("direction")
    if direction not in ("denoise", "noise"):
        raise ValueError(
            f"the result's `direction` attr is {direction!r}, not 'denoise' or 'noise'; pass a "
            "Dataset returned by attribute() or patch() (attrs do not survive xarray arithmetic)."
        )
    return ds[site] - ds["corrupt" if direction == "denoise" else "clean"]


def _grouped(da: xr.DataArray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Values as [sample, window, cells]: one group per (sample, window), cells flattened."""
    rest = [d for d in da.dims if d not in ("sample", "window")]
    ordered = da.transpose("sample", "window", *rest)
    return ordered.values.reshape(da.sizes["sample"], da.sizes["window"], -1), tuple(ordered.dims)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite values (fewer if fewer are finite), largest first."""
    finite = np.flatnonzero(np.isfinite(values))
    order = np.argsort(-values[finite], kind="stable")
    return finite[order[:k]]


def screen(estimates: xr.Dataset, k: int) -> dict[str, xr.DataArray]:
    """The k cells of largest estimated |effect| per sample and window size, per site.

    The effect is the estimate minus the run being patched (`corrupt` for denoise, `clean`
    for noise), taken in absolute value: negative effects matter as much as positive ones.
    Ranking is within one window size because wider windows sum more layers (see the module
    docstring).
    Returns a boolean mask per site with that site's dims and coordinates; cells without an
    estimate (NaN) are never selected. `patch(..., screen=k)` runs exactly these cells.
    """
    if k < 1:
        raise ValueError(f"screen needs k >= 1 cells per sample and window, got {k}.")
    masks = {}
    for site in site_variables(estimates):
        magnitude = abs(effects(estimates, site))
        grouped, dims = _grouped(magnitude)
        chosen = np.zeros(grouped.shape, dtype=bool)
        for s in range(grouped.shape[0]):
            for w in range(grouped.shape[1]):
                chosen[s, w, _top(grouped[s, w], k)] = True
        shape = [magnitude.sizes[d] for d in dims]
        mask = xr.DataArray(chosen.reshape(shape), dims=dims, coords=magnitude.transpose(*dims).coords)
        masks[site] = mask.transpose(*estimates[site].dims).rename(site)
    return masks


def keep_screened(
    sample_plan: Plan, layout: Layout, sample: int, masks: dict[str, xr.DataArray]
) -> list[int]:
    """`sample_plan.work` restricted to the cells `screen` selected (what `patch(..., screen=k)` runs)."""
    cells = sample_plan.cells
    return [c for c in sample_plan.work if bool(masks[cells[c].site].values[layout.index(sample, cells[c])])]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of `values`, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values))
    _, tie, count = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=rank) / count)[tie]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when either side is constant or has < 2 values."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / norm) if norm > 0 else float("nan")


def agreement(
    estimates: xr.Dataset,
    exact: xr.Dataset,
    k: int,
    *,
    material: float = MATERIAL,
    candidates: int | None = None,
) -> dict[str, dict[str, float]]:
    """How well attribution ranks cells compared with exact patching, per site.

    For each (sample, window) group of cells:
    - `overlap`: the share of exact patching's top-k cells by |effect| that the screen also
      picks (what `screen` would keep). Strict: among exactly tied or negligible effects,
      which ones count as "top k" is arbitrary, and a screen that picks others loses.
    - `material_overlap`: the same, counting only what a screen must not miss. A cell is
      *material* when its exact |effect| is at least `material` x |clean - corrupt| (5%);
      the material cells within that margin of the k-th largest |effect| are the top k,
      ties included, and the screen's top k must find min(k, their number) of them. Groups
      where nothing is material (the corruption moved no cell) are skipped.
    - `material_recall` (with `candidates`): the same top k, found among the screen's top
      `candidates` cells: what `patch(..., screen=candidates)` patches exactly, so the share
      of the cells that matter a generous screen does not hide.
    - `spearman`: the rank correlation of the signed effects over all cells both results have.
    The cells are those exact patching has (NaN there: nothing to patch). A cell NaN in
    `estimates` only ranks last: so `estimates` may also be a screened sweep,
    `patch(..., screen=s)`, whose unpatched cells are NaN and whose top k is what its user reads.
    Each is averaged over its groups (NaN groups, e.g. constant effects, are skipped);
    `groups` and `material_groups` count them.
    """
    report = {}
    gaps = np.abs((exact["clean"] - exact["corrupt"]).values)
    for site in site_variables(estimates):
        if site not in exact or exact[site].dims != estimates[site].dims:
            raise ValueError(
                f"site {site!r} is laid out differently in the two results; compare an "
                "attribution with a patch(...) run on the same samples, corruption and grid."
            )
        guess, _ = _grouped(effects(estimates, site))
        truth, _ = _grouped(effects(exact, site))
        overlaps, materials, recalls, correlations = [], [], [], []
        for s in range(guess.shape[0]):
            for w in range(guess.shape[1]):
                patched = np.isfinite(truth[s, w])  # cells with something to patch
                g, t = guess[s, w][patched], truth[s, w][patched]  # g's NaN: never picked, so last
                if len(g) == 0:
                    continue
                top = min(k, len(g))
                picked = set(_top(np.abs(g), top))
                overlaps.append(len(picked & set(_top(np.abs(t), top))) / top)
                margin = material * gaps[s]
                kth = np.sort(np.abs(t))[-top]
                wanted = set(np.flatnonzero(np.abs(t) >= max(margin, kth - margin)).tolist())
                if wanted and margin > 0:
                    materials.append(len(picked & wanted) / min(top, len(wanted)))
                    if candidates is not None:
                        screened = _top(np.abs(g), candidates)
                        best = screened[np.argsort(-np.abs(t[screened]), kind="stable")[:top]]
                        recalls.append(len(set(best.tolist()) & wanted) / min(top, len(wanted)))
                both = np.isfinite(g)
                correlations.append(spearman(g[both], t[both]))
        report[site] = {
            "overlap": _mean(overlaps),
            "material_overlap": _mean(materials),
            **({} if candidates is None else {"material_recall": _mean(recalls)}),
            "spearman": float(np.nanmean(correlations)) if np.isfinite(correlations).any() else float("nan"),
            "groups": len(overlaps),
            "material_groups": len(materials),
        }
    return report


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")

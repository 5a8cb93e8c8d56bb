"""Screened sweeps end to end: does `patch(..., screen=s)` show the cells a full sweep shows?

`benchmarks/screen.py` scores the estimators' rankings. A user does not read a ranking: they
run `vt.patch(..., screen=s, screen_method=m)`, which estimates every cell, patches the s
cells it ranks highest per sample, window and site exactly and leaves the rest NaN, and they
read that result's top k. This runs exactly that, on every shipped trained organism, and
scores it against the full exact sweep of the same samples, corruption, metric and grid:

    corruptions   STR (the visual-constraint phrase replaced) and SIP (a semantic image pair)
    metrics       P(answer) and the logit difference answer - foil
    sites         block, MLP, attention, attention heads (and cross-attention where it exists)
    grid          window 1, every layer x every position but the special tokens (`screen.py`'s)
    screens       s = k, 2k, 3k (k = `--top-k`), for every estimator of `attribution.METHODS`
                  (`ig` with the engine's default path points, `attribution.STEPS`)

Per site, `vlmtrace.engine.screening.agreement(screened, full, k)`: `material` is the share of
the full sweep's material top k (ties within 5% of |clean - corrupt| count, cells below 5% left
out) that the screened result's top k holds, the screened result's NaN cells ranked last;
`strict` counts ties and negligible cells too. Every screened run is also checked against the
full sweep: its patched cells (at most s per sample, window and site) must equal the full
sweep's values at those cells within `--tolerance` (same engine, other batches), its clean and
corrupted runs too; the script stops if they do not.

A small grid makes a generous screen easy: shapes-blip's encoder has 3 layers x ~7 positions,
so `screen=15` patches most of a site. So each row also gets a chance baseline, `random`: the
full sweep's values at s cells drawn uniformly per sample, window and site (NaN elsewhere),
scored the same way and averaged over `--draws` draws. It is derived from the full sweep (the
check above shows a screened sweep's cells are its values), not a run of `patch`.

    python -m benchmarks.screened_sweep                              # every organism and method
    python -m benchmarks.screened_sweep --models shapes-blip --methods atp,atp*

The summary gives, per estimator (and `random`) and screen size, the minimum over organisms,
corruptions, metrics and sites of the material overlap (and where), and the mean; a table of
each row's worst site, `k / 2k / 3k` per estimator; and the chance baseline per organism and
site. The last line is `screened_sweep <method>@<s>=<f> ... best=<method>@<s>
best_overlap=<f>`: every minimum, and the smallest screen of the estimator whose minimum is
highest (`random` left out).
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

import vlmtrace as vt
from benchmarks.screen import CORRUPTIONS, METRICS, ORGANISMS, organism_grid, samples_for
from vlmtrace.engine import attribution
from vlmtrace.engine.attribution import AttributionWarning
from vlmtrace.engine.screening import agreement, site_variables

TOLERANCE = 1e-5
"""How far a screened cell may be from the full sweep's (float rounding of other batches)."""
RANDOM = "random"
"""The chance baseline's label: s cells drawn uniformly instead of ranked by an estimator."""


@dataclass
class Row:
    model: str
    corruption: str
    metric: str
    method: str
    screen: int
    report: dict[str, dict[str, float]]
    largest_difference: float
    seconds: float


class Disagreement(AssertionError):
    """A screened sweep whose patched cells are not the full sweep's values at those cells."""


def checked(screened: xr.Dataset, full: xr.Dataset, screen: int, tolerance: float) -> float:
    """The largest |screened - full| over the screened result's patched cells and its baselines.

    Raises `Disagreement` where it exceeds `tolerance`, where a screened cell is one the full
    sweep has nothing for, or where more than `screen` cells of one sample, window and site
    were patched.
    """
    largest = float(np.nanmax(np.abs(screened[["clean", "corrupt"]] - full[["clean", "corrupt"]]).to_array()))
    for site in site_variables(full):
        kept = screened[site].notnull()
        if bool((kept & full[site].isnull()).any()):
            raise Disagreement(f"{site}: the screened sweep patched cells the full sweep has nothing for")
        per_group = kept.sum([d for d in kept.dims if d not in ("sample", "window")])
        if int(per_group.max()) > screen:
            raise Disagreement(f"{site}: {int(per_group.max())} cells patched in a group, screen={screen}")
        if bool(kept.any()):
            largest = max(largest, float(np.abs(screened[site] - full[site]).where(kept).max()))
    if not largest <= tolerance:
        raise Disagreement(f"screened cells differ from the full sweep's by {largest:.3g} > {tolerance:g}")
    return largest


def drawn_at_random(full: xr.Dataset, screen: int, rng: np.random.Generator) -> xr.Dataset:
    """The full sweep with all but `screen` cells per sample, window and site, drawn uniformly, NaN."""
    kept = full.copy()
    for site in site_variables(full):
        da = full[site]
        rest = [d for d in da.dims if d not in ("sample", "window")]
        values = da.transpose("sample", "window", *rest).values.copy()
        grouped = values.reshape(values.shape[0], values.shape[1], -1)  # a view: edits reach `values`
        for group in grouped.reshape(-1, grouped.shape[-1]):
            finite = np.flatnonzero(np.isfinite(group))
            group[np.setdiff1d(finite, rng.choice(finite, min(screen, len(finite)), replace=False))] = np.nan
        kept[site] = (("sample", "window", *rest), values)
        kept[site] = kept[site].transpose(*da.dims)
    return kept


def chance(full: xr.Dataset, screen: int, top_k: int, draws: int, seed: int) -> dict[str, dict[str, float]]:
    """`agreement` of `draws` random screens of `screen` cells with the full sweep, averaged per site."""
    rng = np.random.default_rng(seed)
    reports = [agreement(drawn_at_random(full, screen, rng), full, top_k) for _ in range(draws)]
    return {
        site: {key: finite_mean([r[site][key] for r in reports]) for key in ("material_overlap", "overlap")}
        for site in reports[0]
    }


def finite_mean(values: list[float]) -> float:
    """The mean of the finite values; NaN where there are none (no group with a material cell)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def measure(
    vlm: vt.VLM, name: str, samples, grid: vt.Grid, methods, screens, top_k, tolerance, draws
) -> list[Row]:
    rows = []
    for corruption_name, corruption in CORRUPTIONS.items():
        for metric_name, metric in METRICS.items():
            common = dict(corruption=corruption(), grid=grid, metric=metric(), progress=False)
            start = time.perf_counter()
            full = vt.patch(vlm, samples, verify=False, max_batch=128, **common)
            seconds = time.perf_counter() - start
            cells = " ".join(
                f"{site} {int(full[site].notnull().sum()) / len(samples):.0f}"
                for site in site_variables(full)
            )
            print(
                f"{name:14} {corruption_name:4} {metric_name:10} full sweep {seconds:.1f} s, "
                f"cells per sample: {cells}",
                flush=True,
            )
            for method in methods:
                label = f"ig{attribution.STEPS}" if method == "ig" else method
                for screen in screens:
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", AttributionWarning)
                        screened = vt.patch(
                            vlm,
                            samples,
                            screen=screen,
                            screen_method=method,
                            verify=False,
                            max_batch=128,
                            **common,
                        )
                    seconds = time.perf_counter() - start
                    largest = checked(screened, full, screen, tolerance)
                    report = agreement(screened, full, top_k)
                    row = Row(name, corruption_name, metric_name, label, screen, report, largest, seconds)
                    rows.append(row)
                    print(line(row), flush=True)
            for screen in screens:
                report = chance(full, screen, top_k, draws, seed=screen)
                row = Row(name, corruption_name, metric_name, RANDOM, screen, report, 0.0, 0.0)
                rows.append(row)
                print(line(row), flush=True)
    return rows


def line(row: Row) -> str:
    sites = "  ".join(
        f"{site} {r['material_overlap']:.2f}/{r['overlap']:.2f}" for site, r in row.report.items()
    )
    how = (
        "chance baseline"
        if row.method == RANDOM
        else f"max |screened - full| {row.largest_difference:.1e}, {row.seconds:.1f} s"
    )
    where = f"{row.model:14} {row.corruption:4} {row.metric:10} {row.method:12} screen={row.screen:<3}"
    return f"{where} {sites}  ({how})"


def worst(rows: list[Row]) -> tuple[float, str]:
    """The smallest finite material overlap over `rows` and their sites, and where it is."""
    found = [
        (r.report[site]["material_overlap"], f"{r.model} {r.corruption} {r.metric} {site}")
        for r in rows
        for site in r.report
        if np.isfinite(r.report[site]["material_overlap"])
    ]
    return min(found) if found else (float("nan"), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(ORGANISMS), help="organism names, comma-separated")
    parser.add_argument("--samples", type=int, default=8, help="samples per organism")
    parser.add_argument("--methods", default=",".join(attribution.METHODS), help="comma-separated")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--screens", default="1,2,3", help="screen sizes as multiples of k, comma-separated")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--draws", type=int, default=100, help="random screens per row (chance baseline)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    screens = [int(times) * args.top_k for times in args.screens.split(",")]
    started = time.perf_counter()
    print(f"per site: material / strict top-{args.top_k} overlap of the screened sweep with the full one")
    rows: list[Row] = []
    for name in args.models.split(","):
        vlm = vt.load(name)
        samples = samples_for(vlm, args.samples, own=False)
        grid = organism_grid(vlm)
        rows += measure(vlm, name, samples, grid, methods, screens, args.top_k, args.tolerance, args.draws)
    print()
    labels = list(dict.fromkeys(r.method for r in rows))
    minima = {}
    for label in labels:
        for screen in screens:
            mine = [r for r in rows if r.method == label and r.screen == screen]
            minima[label, screen], where = worst(mine)
            mean = finite_mean([r.report[s]["material_overlap"] for r in mine for s in r.report])
            low = minima[label, screen]
            print(f"{label:12} screen={screen:<3}: material overlap min {low:.2f} ({where}), mean {mean:.2f}")
    print()
    print("worst site's material overlap per row, screen = " + " / ".join(str(s) for s in screens))
    print(f"{'model':14} {'corr':4} {'metric':10} " + " ".join(f"{label:>16}" for label in labels))
    for key in dict.fromkeys((r.model, r.corruption, r.metric) for r in rows):
        cells = []
        for label in labels:
            per_screen = [
                worst(
                    [
                        r
                        for r in rows
                        if (r.model, r.corruption, r.metric) == key and r.method == label and r.screen == s
                    ]
                )[0]
                for s in screens
            ]
            cells.append(" / ".join(f"{v:.2f}" for v in per_screen))
        print(f"{key[0]:14} {key[1]:4} {key[2]:10} " + " ".join(f"{c:>16}" for c in cells))
    print(f"\nchance (random screens), material overlap per site, mean over rows, screen = {screens}:")
    for model in dict.fromkeys(r.model for r in rows):
        chances = [r for r in rows if r.model == model and r.method == RANDOM]
        per_site = "  ".join(
            f"{site} "
            + "/".join(
                f"{finite_mean([r.report[site]['material_overlap'] for r in chances if r.screen == n]):.2f}"
                for n in screens
            )
            for site in chances[0].report
        )
        print(f"{model:14} {per_site}")
    largest = max(r.largest_difference for r in rows)
    print(
        f"\nlargest |screened - full| over every patched cell: {largest:.1e} (tolerance {args.tolerance:g})"
    )
    print(f"{time.perf_counter() - started:.0f} s in all")
    best = max((key for key in minima if key[0] != RANDOM), key=lambda key: (minima[key], -key[1]))
    print(
        "screened_sweep "
        + " ".join(f"{label}@{screen}={value:.2f}" for (label, screen), value in minima.items())
        + f" best={best[0]}@{best[1]} best_overlap={minima[best]:.2f}"
    )


if __name__ == "__main__":
    main()

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

    python -m benchmarks.screened_sweep                              # every organism and method
    python -m benchmarks.screened_sweep --models shapes-blip --methods atp,atp*

The summary gives, per estimator and screen size, the minimum over organisms, corruptions,
metrics and sites of the material overlap (and where), and the mean; then a table of each
row's worst site, `k / 2k / 3k` per estimator. The last line is `screened_sweep
<method>@<s>=<f> ... best=<method>@<s> best_overlap=<f>`: every minimum, and the smallest
screen of the estimator whose minimum is highest.
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


def measure(vlm: vt.VLM, name: str, samples, grid: vt.Grid, methods, screens, top_k, tolerance) -> list[Row]:
    rows = []
    for corruption_name, corruption in CORRUPTIONS.items():
        for metric_name, metric in METRICS.items():
            common = dict(corruption=corruption(), grid=grid, metric=metric(), progress=False)
            start = time.perf_counter()
            full = vt.patch(vlm, samples, verify=False, max_batch=128, **common)
            seconds = time.perf_counter() - start
            print(f"{name:14} {corruption_name:4} {metric_name:10} full sweep {seconds:.1f} s", flush=True)
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
    return rows


def line(row: Row) -> str:
    sites = "  ".join(
        f"{site} {r['material_overlap']:.2f}/{r['overlap']:.2f}" for site, r in row.report.items()
    )
    return (
        f"{row.model:14} {row.corruption:4} {row.metric:10} {row.method:12} screen={row.screen:<3} "
        f"{sites}  (max |screened - full| {row.largest_difference:.1e}, {row.seconds:.1f} s)"
    )


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
        rows += measure(vlm, name, samples, organism_grid(vlm), methods, screens, args.top_k, args.tolerance)
    print()
    labels = list(dict.fromkeys(r.method for r in rows))
    minima = {}
    for label in labels:
        for screen in screens:
            mine = [r for r in rows if r.method == label and r.screen == screen]
            minima[label, screen], where = worst(mine)
            mean = np.nanmean([r.report[s]["material_overlap"] for r in mine for s in r.report])
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
    largest = max(r.largest_difference for r in rows)
    print(
        f"\nlargest |screened - full| over every patched cell: {largest:.1e} (tolerance {args.tolerance:g})"
    )
    print(f"{time.perf_counter() - started:.0f} s in all")
    best = max(minima, key=lambda key: (minima[key], -key[1]))
    print(
        "screened_sweep "
        + " ".join(f"{label}@{screen}={value:.2f}" for (label, screen), value in minima.items())
        + f" best={best[0]}@{best[1]} best_overlap={minima[best]:.2f}"
    )


if __name__ == "__main__":
    main()

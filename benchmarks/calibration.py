"""Calibration: every localisation method scored against the planted organisms (issue 21).

    python -m benchmarks.calibration                       # both organisms, 8 samples, every method
    python -m benchmarks.calibration --n-samples 4 --out /tmp/calibration.zarr
    python -m benchmarks.calibration --table-of a.zarr b.zarr   # stores `vlmtrace calibrate` wrote

Runs `vlmtrace.calibration.calibrate` (what `vlmtrace calibrate` runs), prints one line per
method as it finishes, then the markdown table of `benchmarks/RESULTS.md` and the figures
behind each seed claim: per corruption, the best AUROC of the MLP, attention and head traces,
and the layers where each corruption's traces put their strongest cell.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import xarray as xr

from vlmtrace.calibration import Settings, calibrate
from vlmtrace.results.dataset import open_result, save


def table(ds: xr.Dataset) -> str:
    """Markdown: one row per method, AUROC / precision / recall / CPR / CMD per organism."""
    organisms = [str(o) for o in ds["organism"].values]
    head = "| method | " + " | ".join(f"{o} AUROC | P | R | CPR | CMD | top cell" for o in organisms) + " |"
    rule = "| --- |" + " ---: | ---: | ---: | ---: | ---: | --- |" * len(organisms)
    lines = [head, rule]
    for method in ds["method_name"].values:
        cells = []
        for organism in organisms:
            row = ds.sel(organism=organism, method_name=method)
            values = [float(row[k]) for k in ("auroc", "precision", "recall", "cpr", "cmd")]
            text = ["-" if np.isnan(v) else f"{v:.2f}" for v in values]
            text.append(f"L{int(row['top_layer'])} {row['top_segment'].item()}")
            cells.append(" | ".join(text))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(ds: xr.Dataset) -> str:
    """Per organism and corruption: best trace AUROC per site, and where the top cells are."""
    lines = []
    for organism in ds["organism"].values:
        one = ds.sel(organism=organism)
        for corruption in ("str", "image_pair", "noise"):
            chosen = (one["corruption"] == corruption) & one["family"].isin(["trace", "heads"])
            picked = one.isel(method_name=np.flatnonzero(chosen.values))
            if picked.sizes["method_name"] == 0:
                continue
            sites, aurocs = picked["site"].values, picked["auroc"].values
            best = {
                site: float(np.nanmax(aurocs[sites == site])) if (sites == site).any() else float("nan")
                for site in ("mlp", "attn", "attn_head", "block")
            }
            tops = sorted({int(x) for x in picked["top_layer"].values})
            lines.append(
                f"{organism} {corruption}: best AUROC "
                + ", ".join(f"{k} {v:.2f}" for k, v in best.items())
                + f"; top cells at layers {tops}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--noise-draws", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("calibration.zarr"))
    parser.add_argument(
        "--table-of",
        type=Path,
        nargs="+",
        help="print the table of these stores (one per organism); run nothing",
    )
    args = parser.parse_args()
    if args.table_of:
        ds = xr.concat([open_result(p) for p in args.table_of], dim="organism", join="outer")
    else:
        start = time.perf_counter()
        ds = calibrate(None, Settings(samples=args.n_samples, noise_draws=args.noise_draws), log=print)
        save(ds, args.out, overwrite=True)
        print(f"\n{time.perf_counter() - start:.0f} s; store: {args.out}\n")
    print(table(ds))
    print()
    print(claims(ds))


if __name__ == "__main__":
    main()

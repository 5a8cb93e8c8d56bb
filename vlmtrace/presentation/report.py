"""From a patching result to what a reader needs: effects, a headline, figures, one HTML page.

Every patching recipe ends the same way: indirect effects (patched - corrupted), averaged
by segment with bootstrap intervals, drawn per window size, and one sentence naming the
strongest cell. This module does that once for all recipes, and writes the page a reader
opens first: `write_report` puts the headline, every figure (embedded, so the file opens
offline and travels alone), the configuration and provenance, and the command that
reproduces the run into one self-contained HTML file next to the store.

    effect = indirect_effect(ds, "mlp")            # dims as ds["mlp"]
    print(headline(ds, sites=("mlp", "attn")))
    paths = patching_figures(ds, "out/trace", sites=("mlp", "attn"))
    write_report(ds, "trace.html", summary=..., figures=paths, command="vlmtrace recipe ...")
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from ..results.stats import bootstrap_mean, by_segment
from . import plots
from .titles import condition_attrs, describe_run

COLUMN = 1120
"""Pixels: the page's column (its body's width). Figures are drawn at most `plots.WIDTH` wide, so
that every one shows at full size, its text as legible as drawn, never scaled down to fit."""


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


def total_effect(ds: xr.Dataset) -> xr.DataArray:
    """|clean - corrupted| per sample: the whole effect a sweep could restore, which fixes the
    colour range of its effect maps (`plots.effect_range`)."""
    return abs(ds["clean"] - ds["corrupt"])


def patching_figures(
    ds: xr.Dataset, out_dir: str | Path, *, sites: Sequence[str], tag: str = ""
) -> list[Path]:
    """Per site: window panels by segment, a CI-annotated heatmap, and sample 0's token map.

    The one-window figures show the headline's window (`strongest`, as `headline` finds it),
    and the panels outline the headline's cell; every map's colour range is +-|clean - corrupted|
    (`plots.effect_range`), and the titles name the corruption (`titles.describe_run`).
    """
    from ..results.dataset import metric_units

    out_dir = Path(out_dir)
    paths = []
    run = describe_run(ds)
    label = f"indirect effect, patched - corrupted [{metric_units(ds)}]"
    n = ds.sizes["sample"]
    gap = total_effect(ds)
    verb = "corrupted" if condition_attrs(ds).get("direction") == "noise" else "restored"
    for site in sites:
        summary = segment_summary(ds, site)
        best = strongest(summary)  # the headline's cell
        window = best["window"]
        name = f"{tag}{site}"
        paths.append(
            plots.window_panels(
                summary["mean"],
                path=out_dir / f"{name}_windows.png",
                title=f"{site} {verb}, mean over {n} samples by segment, per window\n{run}",
                label=label,
                total=float(gap.mean()),
                mark=best,
            )
        )
        paths.append(
            plots.segment_heatmap(
                summary.sel(window=window),
                path=out_dir / f"{name}_segments_w{window}.png",
                title=f"{site} {verb}, window {window} (the headline's): mean over {n} samples [95% CI]\n"
                + run,
                label=label,
                total=float(gap.mean()),
                mark=best,
            )
        )
        first = indirect_effect(ds, site).isel(sample=0).sel(window=window)
        first = first.dropna("position", how="all")
        paths.append(
            plots.heatmap(
                first,
                path=out_dir / f"{name}_sample0_w{window}.png",
                title=f"{site} {verb}, window {window}, one sample: {ds['sample'].values[0]}\n" + run,
                label=label,
                total=float(gap.isel(sample=0)),
            )
        )
    return paths


def write_report(
    ds: xr.Dataset, path: str | Path, *, summary: str, figures: Sequence[Path], command: str
) -> Path:
    """One self-contained HTML page: headline, figures (inline PNG), variables, provenance."""
    path = Path(path)
    esc = html.escape
    recipe = ds.attrs.get("recipe", "result")
    images = "\n".join(
        f'<figure><img alt="{esc(Path(f).stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(Path(f).read_bytes()).decode()}"><figcaption>{esc(Path(f).name)}</figcaption></figure>'
        for f in figures
    )
    variables = "\n".join(
        f"<tr><td><code>{esc(str(n))}</code></td><td>{esc(', '.join(map(str, v.dims)))}</td>"
        f"<td>{esc(str(v.attrs.get('description', '')))}</td>"
        f"<td>{esc(str(v.attrs.get('units', '')))}</td></tr>"
        for n, v in ds.data_vars.items()
    )
    attrs = "\n".join(
        f"<tr><td><code>{esc(str(k))}</code></td><td><code>{esc(str(v))}</code></td></tr>"
        for k, v in ds.attrs.items()
    )
    sizes = ", ".join(f"{d}={n}" for d, n in ds.sizes.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>vlmtrace {esc(recipe)}: {esc(str(ds.attrs.get("model", "")))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: {COLUMN}px; margin: 2em auto; padding: 0 1em;
        color: #222; }}
pre {{ background: #f4f4f4; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; }}
</style></head>
<body>
<h1>{esc(recipe)} on {esc(str(ds.attrs.get("model", "?")))}</h1>
<h2 id="headline">Headline</h2>
<p>Means over samples with 95% percentile-bootstrap intervals in brackets, where given.</p>
<pre>{esc(summary)}</pre>
<h2 id="figures">Figures</h2>
{images}
<h2 id="data">Data ({esc(sizes)})</h2>
<table><tr><th>variable</th><th>dims</th><th>description</th><th>units</th></tr>
{variables}</table>
<h2 id="provenance">Configuration and provenance</h2>
<table>{attrs}</table>
<h2 id="reproduce">Reproduce</h2>
<pre id="command">{esc(command)}</pre>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path

"""From a patching result to what a reader needs: effects, a headline, figures, one HTML page.

Every patching recipe ends the same way: indirect effects (patched - corrupted), averaged
by segment with bootstrap intervals, drawn per window size, and one sentence naming the
strongest cell where it is a finding (`unnamed`: not where the corruption barely moved the
output, `Metric.gap_floor`). This module does that once for all recipes, and writes the page a reader
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


def below_floor(ds: xr.Dataset) -> str | None:
    """Why no cell of `ds` can be named, where its mean |clean - corrupted| is below the metric's
    `gap_floor` (the corruption barely changed the output); None where the gap is material."""
    from ..engine.metrics import mean_gap  # imports torch: only when a trace is read

    gap, floor, material = mean_gap(ds)
    if material:
        return None
    if not np.isfinite(gap):
        return "mean |clean - corrupted| is not a number (no sample finished?), so no cell is named"
    if not gap > 0:
        return "clean = corrupted on every sample: the corruption changed nothing, so no cell is named"
    return (
        f"mean |clean - corrupted| = {gap:.2g}, below {ds.attrs.get('metric', 'the metric')}'s gap floor "
        f"{floor:g}: the corruption barely changed the output, so no cell is named (keep the samples the "
        "model answers right, or use a stronger corruption)"
    )


def unnamed(ds: xr.Dataset, best: dict, *, below: str | None) -> str | None:
    """Why the strongest cell of a segment summary (`strongest`) is no finding, or None where it
    is one: the gap is below the floor (`below`, what `below_floor` said), the effect is under
    `plots.SIGNIFICANT` of the mean |clean - corrupted| (what the maps hatch), or its 95 %
    interval holds 0."""
    if below is not None:
        return "no gap to restore"
    if not np.isfinite(best["mean"]):
        return "not a number: no cell of this site was patched"
    gap = float(total_effect(ds).mean())
    if not abs(best["mean"]) >= plots.SIGNIFICANT * gap:
        return f"under {plots.SIGNIFICANT:.0%} of mean |clean - corrupted| = {gap:.3g}"
    if best["low"] <= 0 <= best["high"]:
        return f"indistinguishable from 0 (its 95% interval over {ds.sizes['sample']} samples holds 0)"
    return None


def headline(ds: xr.Dataset, *, sites: Sequence[str], label: str = "") -> str:
    """One sentence per site: where the largest average indirect effect sits, if it is a finding.

    A cell is named only where it is one (`unnamed`): on samples the model gets wrong, a trace
    still has a largest cell, of +0.000 [-0.000, +0.000], and naming its layer reads as a result.
    """
    n = ds.sizes["sample"]
    gap = float((ds["clean"] - ds["corrupt"]).mean())
    first = f"{label}clean - corrupted = {gap:+.3f} (mean over {n} samples, metric {ds.attrs['metric']})"
    below = below_floor(ds)
    lines = [first if below is None else f"{first}; {below}"]
    for site in sites:
        best = strongest(segment_summary(ds, site))
        effect = f"{best['mean']:+.3f} [{best['low']:+.3f}, {best['high']:+.3f}]"
        why = unnamed(ds, best, below=below)
        if why is None:
            lines.append(
                f"{label}{site}: largest mean indirect effect {effect} at layer {best['layer']}, "
                f"window {best['window']}, segment '{best['segment']}'"
            )
        elif below is not None:
            lines.append(f"{label}{site}: no cell named ({why})")
        else:
            lines.append(
                f"{label}{site}: no cell named: its largest mean indirect effect, {effect}, is {why}"
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

    The one-window figures show the window of the largest mean effect (`strongest`, as
    `headline` finds it), and the panels outline its cell where the headline names it (`unnamed`);
    every map's colour range is +-|clean - corrupted|, and at least the metric's gap floor
    (`plots.effect_range`), and the titles name the corruption (`titles.describe_run`).
    """
    from ..engine.metrics import gap_floor
    from ..results.dataset import metric_units

    out_dir = Path(out_dir)
    paths = []
    run = describe_run(ds)
    label = f"indirect effect, patched - corrupted [{metric_units(ds)}]"
    n = ds.sizes["sample"]
    gap = total_effect(ds)
    verb = "corrupted" if condition_attrs(ds).get("direction") == "noise" else "restored"
    floor, below = gap_floor(ds), below_floor(ds)
    for site in sites:
        summary = segment_summary(ds, site)
        best = strongest(summary)
        mark = best if unnamed(ds, best, below=below) is None else None  # the headline's cell, if any
        window = best["window"]
        which = "the headline's" if mark is not None else "its largest mean; the headline names no cell"
        name = f"{tag}{site}"
        paths.append(
            plots.window_panels(
                summary["mean"],
                path=out_dir / f"{name}_windows.png",
                title=f"{site} {verb}, mean over {n} samples by segment, per window\n{run}",
                label=label,
                total=float(gap.mean()),
                floor=floor,
                mark=mark,
            )
        )
        paths.append(
            plots.segment_heatmap(
                summary.sel(window=window),
                path=out_dir / f"{name}_segments_w{window}.png",
                title=f"{site} {verb}, window {window} ({which}): mean over {n} samples [95% CI]\n" + run,
                label=label,
                total=float(gap.mean()),
                floor=floor,
                mark=mark,
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
                floor=floor,
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

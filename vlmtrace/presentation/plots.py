"""Figures of causal traces, drawn from Datasets (never from a live model), that never mislead.

Plotting is kept apart from running so that `vlmtrace plot X.zarr` can redraw any figure
from a store, and a recipe's `run` stays a pure experiment.

    heatmap(effect.isel(sample=0, window=0), total=gap, path="trace.png")  # layer x token
    segment_heatmap(summary, total=gap, path="avg.png")        # layer x segment, with CIs
    window_panels(effect_by_segment, total=gap, path="w.png")  # one panel per window size
    head_grid(effect, total=1.0, path="heads.png")             # layer x head
    knockout_curves(relative.sel(window=3), path="flow.png")   # one line per block
    score_bars(mean, low, high, path="scores.png")            # accuracies per metric and condition
    image_attention(image, weights, grid=(4, 4), path="att.png")  # attention over patches
    scales("w.png")                                            # what each colour meant

What a colour means is fixed by what the quantity can be, never by the largest value drawn:

- An effect (patched - corrupted) is drawn on a symmetric range of +-|clean - corrupted|,
  `total`: the whole effect the sweep could restore. Noise of +-0.0009 against a gap of 0.5
  stays white, and cells below `SIGNIFICANT` of the gap are hatched. Only an effect beyond the
  gap widens the range, and the colour bar's label says what the range is and why. A gap below
  the metric's `gap_floor` (the model barely changed its answer) never narrows the range below
  +-floor, so effects of 5e-05 on a gap of 5e-05 stay white too.
- A probability or attention weight is drawn on 0..1. Where the data fill less than
  `STRETCHED` of that, the scale is stretched to the data and the title says so and by how
  much ("colour scale stretched: max 3.2e-11 of 1"), so 1e-10 never looks like a strong map.
- A relative change is drawn only as `engine.metrics.relative_change` floors it.

Every PNG records what its colours meant (`scales`): each panel's colour range and colour-bar
label, and where its titles and labels lie, so a test (or a reader) can check a figure against
its data without reading pixels. Figures fit the HTML report's width (`WIDTH`).
"""

from __future__ import annotations

import io
import json
import math
import struct
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image  # noqa: E402

CMAP = "RdBu_r"
DPI = 120
WIDTH = 8.8
"""Inches: the widest figure, 1056 px at `DPI` plus the saving margin, within the report's column."""
SIGNIFICANT = 0.05
"""Effects below this share of |clean - corrupted| are hatched: too small to read as a finding."""
STRETCHED = 0.1
"""A probability map whose largest value is below this share of 1 is stretched, and says so."""
RECORD = "vlmtrace:scales"
"""The PNG text key under which `scales` finds what a figure's colours meant."""


@dataclass(frozen=True)
class EffectRange:
    """The symmetric colour range of an effect map, and the threshold below which cells are hatched."""

    limit: float  # colours run from -limit to +limit
    hatched_below: float | None  # |effect| under this is hatched; None where no gap is known
    note: str  # how the range was chosen, for the colour bar's label


def effect_range(
    values: np.ndarray, total: float | None, *, gap: str = "|clean - corrupted|", floor: float = 0.0
) -> EffectRange:
    """The colour range for effects `values` of a sweep whose clean - corrupted gap is `total`.

    +-|total|, the whole effect the sweep could restore, unless some effect goes beyond it
    (then the largest |effect|). A gap below `floor` (the metric's `Metric.gap_floor`) is noise,
    so the range is at least +-floor: a gap of 5e-05 in P(answer) would otherwise draw effects of
    5e-05 in full colour. Without a gap (None, 0 or NaN) the range is the largest |effect|, and
    the note says that nothing ties it to the gap. `gap` names the gap in the note ("mean
    |clean - corrupted|" for a map of means).
    """
    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite)]
    largest = float(finite.max()) if finite.size else 0.0
    if total is not None and np.isfinite(total) and abs(total) < floor:
        limit = max(floor, largest)
        chosen = (
            "the largest |effect|, beyond the metric's gap floor"
            if largest > floor
            else "the metric's gap floor"
        )
        return EffectRange(
            limit,
            SIGNIFICANT * floor,
            f"range ±{limit:.2g}, {chosen}: {gap} = {abs(total):.2g} is below it, too small to "
            f"localise; hatched: |effect| < {SIGNIFICANT:.0%} of the floor",
        )
    if total is None or not np.isfinite(total) or total == 0:
        why = (
            "no clean - corrupted gap given"
            if total is None
            else "clean = corrupted, nothing to restore"
            if total == 0
            else "the clean - corrupted gap is not a number"
        )
        limit = largest if largest > 0 else 1.0
        return EffectRange(limit, None, f"range ±{limit:.2g}, the largest |effect| ({why})")
    total = abs(float(total))
    hatched = f"hatched: |effect| < {SIGNIFICANT:.0%} of it"
    if largest > 1.02 * total:  # an effect within 2% of the gap saturates the colour: "all of it"
        return EffectRange(
            largest,
            SIGNIFICANT * total,
            f"range ±{largest:.2g}, the largest |effect|, beyond {gap} = {total:.2g}; {hatched}",
        )
    return EffectRange(total, SIGNIFICANT * total, f"range ±{total:.2g} = {gap}; {hatched}")


def stretched_note(values: np.ndarray, *, top: float = 1.0, what: str = "") -> tuple[float, str]:
    """(top of the colour scale, a note for the title): `top`, or the data's largest value and a note."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    largest = float(finite.max()) if finite.size else 0.0
    if largest >= STRETCHED * top:
        return top, ""
    if largest <= 0:
        return top, f"colour scale 0 to {top:g}: every value is 0"
    return largest, f"colour scale stretched {top / largest:.2g}x: max {largest:.2g} of {top:g}{what}"


def scales(path: str | Path) -> dict:
    """What the figure at `path` drew: per panel its title, colour range (`clim`), colour-bar
    label, y range (`ylim`) and hatched cells; and, in pixels (x0, y0, x1, y1), the boxes of its
    titles and of each colour bar with its label and tick offset text ("1e-11"), if any."""
    return json.loads(Image.open(path).text[RECORD])


def _record(figure) -> str:
    """The JSON `scales` reads back; taken after the figure was drawn (and so laid out)."""
    renderer = figure.canvas.get_renderer()

    def box(artist) -> list[float] | None:
        return list(artist.get_window_extent(renderer).extents) if artist.get_visible() else None

    bars = [ax for ax in figure.axes if hasattr(ax, "_colorbar")]
    labels = [bar.yaxis.label.get_text() for bar in bars]
    titles = [figure._suptitle] if figure.get_suptitle() else []
    panels = []
    for ax in figure.axes:
        if ax in bars or not ax.get_visible():
            continue
        panel = {"title": ax.get_title(), "ylim": [float(v) for v in ax.get_ylim()]}
        coloured = [m for m in [*ax.collections, *ax.images] if _colour_mapped(m)]
        if coloured:
            panel["clim"] = [float(v) for v in coloured[-1].get_clim()]
            own = getattr(coloured[-1], "colorbar", None)
            if own is not None or len(labels) == 1:  # panels sharing one bar share its label
                panel["label"] = own.ax.get_ylabel() if own is not None else labels[0]
        hatched = [[int(p.get_y()), int(p.get_x())] for p in ax.patches if p.get_hatch()]
        if hatched:
            panel["hatched"] = hatched  # (row, column) cells, row 0 at the top
        panels.append(panel)
        if ax.get_title():
            titles.append(ax.title)
    colour_bars = [
        {
            "bar": box(bar),
            "label": box(bar.yaxis.label) if bar.yaxis.label.get_text() else None,
            "offset": box(bar.yaxis.offsetText) if bar.yaxis.offsetText.get_text() else None,
        }
        for bar in bars
    ]
    record = {
        "suptitle": figure.get_suptitle(),
        "panels": panels,
        "boxes": {"titles": [box(t) for t in titles], "colour_bars": colour_bars},
    }
    return json.dumps(record)


def _colour_mapped(artist) -> bool:
    """Whether an artist maps values to colours (a heatmap's mesh, an image of values, not of RGB)."""
    values = artist.get_array()
    return values is not None and values.ndim <= 2


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
    path.write_bytes(_with_text(png.getvalue(), RECORD, _record(figure)))
    plt.close(figure)
    return path


def _with_text(png: bytes, key: str, text: str) -> bytes:
    """A PNG with one more text chunk before its end (the record is known only once the figure is drawn)."""
    data = key.encode("latin-1") + b"\0" + text.encode("latin-1")  # JSON's default output is ASCII
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    end = png.rindex(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    return png[:end] + chunk + png[end:]


def _figure(width: float, height: float, **grid):
    """A figure at most `WIDTH` wide, laid out so that titles, panels and colour bars never overlap."""
    return plt.subplots(figsize=(min(width, WIDTH), height), layout="constrained", **grid)


def _colour_bar(figure, mappable, ax, label: str, *, height: float):
    """A colour bar whose label is wrapped to its height (so it never runs into a title), with plain ticks."""
    per_line = max(24, int((height - 1.6) * 72 / 4.6))  # 8-pt characters along the bar, titles aside
    bar = figure.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02, aspect=30)
    bar.set_label(textwrap.fill(label, per_line), fontsize=8)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
    bar.ax.tick_params(labelsize=8)
    return bar


def _title(target, text: str, *, fontsize: float = 9, suptitle: bool = False) -> None:
    """Set an axes' title (or the figure's, `suptitle`), each line wrapped to the figure's width."""
    figure = target if suptitle else target.figure
    per_line = max(30, int(figure.get_figwidth() * 72 / (fontsize * 0.56)))
    lines = [textwrap.fill(line, per_line) for line in text.split("\n")]
    if suptitle:
        target.suptitle("\n".join(lines), fontsize=fontsize)
    else:
        target.set_title("\n".join(lines), fontsize=fontsize)


def _every(labels, most: int = 24) -> list[str]:
    """Tick labels, every k-th kept so that at most `most` show (32 layers stay legible)."""
    labels = [str(label) for label in labels]
    step = max(1, math.ceil(len(labels) / most))
    return [label if i % step == 0 else "" for i, label in enumerate(labels)]


def _cells(ax, values: np.ndarray, columns, rows, *, cmap: str, vmin: float, vmax: float, notes=None):
    """A grid of coloured cells, row 0 at the top, each labelled by `notes` (an array of text) if given.

    NaN cells (positions a sample lacks) stay blank. Note text is white on dark cells.
    """
    values = np.asarray(values, dtype=float)
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xlim(0, values.shape[1])
    ax.set_ylim(values.shape[0], 0)
    ax.set_xticks(np.arange(values.shape[1]) + 0.5, _every(columns))
    ax.set_yticks(np.arange(values.shape[0]) + 0.5, _every(rows))
    long = max((len(str(c)) for c in columns), default=0) * values.shape[1] > 60
    ax.tick_params(axis="x", labelrotation=90 if long else 0, length=0)
    ax.tick_params(axis="y", labelrotation=0, length=0)
    if notes is not None:
        for (i, j), note in np.ndenumerate(np.asarray(notes, dtype=object)):
            if np.isfinite(values[i, j]) and note:
                red, green, blue, _ = mesh.to_rgba(values[i, j])
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(
                    j + 0.5,
                    i + 0.5,
                    note,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    return mesh


def _effect_map(ax, values: np.ndarray, columns, rows, scale: EffectRange, notes=None):
    """Effects centred on zero (restoring helps: red; hurts: blue) on +-scale.limit, small ones hatched."""
    mesh = _cells(ax, values, columns, rows, cmap=CMAP, vmin=-scale.limit, vmax=scale.limit, notes=notes)
    if scale.hatched_below is not None:
        small = np.isfinite(values) & (np.abs(values) < scale.hatched_below)
        for i, j in zip(*np.nonzero(small), strict=True):
            ax.add_patch(
                Rectangle((j, i), 1, 1, fill=False, hatch="///", edgecolor="0.72", lw=0, hatch_linewidth=0.6)
            )
    return mesh


def _mark(ax, row: int, column: int) -> None:
    """Outline one cell (the headline's)."""
    ax.add_patch(Rectangle((column, row), 1, 1, fill=False, edgecolor="black", linewidth=2))


def heatmap(
    da: xr.DataArray,
    *,
    path: str | Path,
    title: str = "",
    label: str = "",
    total: float | None = None,
    floor: float = 0.0,
) -> Path:
    """Layer x position for one sample, positions labelled with their tokens.

    `total`: the sample's |clean - corrupted|, which fixes the colour range, at least +-`floor`
    (`effect_range`).
    `label` names the colour bar's quantity and unit (default: the DataArray's name).
    """
    da = da.transpose("layer", ...)
    columns = da.dims[1]
    labels = [str(t) for t in (da["token"].values if "token" in da.coords else da[columns].values)]
    height = max(4.0, 0.3 * da.sizes["layer"] + 2.6)
    figure, ax = _figure(max(4.5, 0.45 * len(labels) + 2.5), height)
    scale = effect_range(da.values, total, floor=floor)
    mesh = _effect_map(ax, da.values, labels, da["layer"].values, scale)
    _colour_bar(figure, mesh, ax, f"{label or str(da.name or 'effect')}; {scale.note}", height=height)
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    _title(ax, title)
    return _save(figure, path)


def segment_heatmap(
    summary: xr.Dataset,
    *,
    path: str | Path,
    title: str = "",
    label: str = "mean effect",
    total: float | None = None,
    floor: float = 0.0,
    mark: dict | None = None,
) -> Path:
    """Layer x segment of a bootstrap summary: the mean, annotated with its interval.

    `total`: the mean |clean - corrupted| and `floor` the metric's gap floor (`effect_range`);
    `mark`: {"layer", "segment"} of a cell to outline, the headline's.
    """
    mean = summary["mean"].transpose("layer", "segment")
    low = summary["low"].transpose("layer", "segment").values
    high = summary["high"].transpose("layer", "segment").values
    notes = np.vectorize(lambda m, lo, hi: f"{m:.2f}\n[{lo:.2f},{hi:.2f}]")(mean.values, low, high)
    height = 0.45 * mean.sizes["layer"] + 2.4
    figure, ax = _figure(1.3 * mean.sizes["segment"] + 3.0, height)
    scale = effect_range(mean.values, total, gap="mean |clean - corrupted|", floor=floor)
    mesh = _effect_map(ax, mean.values, mean["segment"].values, mean["layer"].values, scale, notes=notes)
    if mark is not None:
        _mark(ax, _index(mean, "layer", mark["layer"]), _index(mean, "segment", mark["segment"]))
    _colour_bar(figure, mesh, ax, f"{label}; {scale.note}", height=height)
    ax.set_xlabel("segment")
    ax.set_ylabel("layer")
    _title(ax, title or f"mean over {summary.attrs.get('over', 'samples')} (95% bootstrap CI)")
    return _save(figure, path)


def _index(da: xr.DataArray, dim: str, value) -> int:
    return [str(v) for v in da[dim].values].index(str(value))


def window_panels(
    da: xr.DataArray,
    *,
    path: str | Path,
    title: str = "",
    by: str = "window",
    label: str = "mean effect",
    total: float | None = None,
    floor: float = 0.0,
    mark: dict | None = None,
) -> Path:
    """One layer x segment heatmap per value of `by` (default: window size), in a grid of at most
    three columns, on one colour range for all panels.

    `total`: the mean |clean - corrupted| and `floor` the metric's gap floor (`effect_range`);
    `mark`: {by, "layer", "segment"} of the cell to outline, the headline's, whose panel's title
    says so.
    """
    values = list(da[by].values)
    columns = min(3, len(values))
    rows = math.ceil(len(values) / columns)
    layers = da.sizes["layer"]
    height = rows * ((0.3 if layers <= 16 else 0.2) * layers + 1.4) + 1.0  # 32 layers: two screens, not three
    figure, axes = _figure(2.6 * columns + 1.4, height, nrows=rows, ncols=columns, squeeze=False)
    scale = effect_range(da.values, total, gap="mean |clean - corrupted|", floor=floor)
    shown = axes.ravel()[: len(values)]
    for ax, value in zip(shown, values, strict=True):
        panel = da.sel({by: value}).transpose("layer", "segment")
        mesh = _effect_map(ax, panel.values, panel["segment"].values, panel["layer"].values, scale)
        headline = mark is not None and str(mark.get(by)) == str(value)
        if headline:
            _mark(ax, _index(panel, "layer", mark["layer"]), _index(panel, "segment", mark["segment"]))
        ax.set_title(f"{by} {value}" + (" (headline, outlined)" if headline else ""), fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("layer" if ax in axes[:, 0] else "")
        ax.tick_params(labelsize=8)
        ax.tick_params(axis="y", labelrotation=0)
    for ax in axes.ravel()[len(values) :]:
        ax.set_visible(False)
    _colour_bar(figure, mesh, list(shown), f"{label}; {scale.note}", height=height)
    _title(figure, title, fontsize=10, suptitle=True)
    return _save(figure, path)


def head_grid(
    da: xr.DataArray,
    *,
    path: str | Path,
    title: str = "",
    label: str = "effect",
    counts: bool = False,
    total: float | None = None,
    most: int | None = None,
) -> Path:
    """Layer x head values (da: layer, head): signed effects on +-|clean - corrupted| (`total`;
    1 for normalised effects), or, with `counts`, non-negative counts on a sequential scale from 0
    to `most`, the largest count possible (default: the largest count drawn)."""
    da = da.transpose("layer", "head")
    height = 0.4 * da.sizes["layer"] + 2.2
    figure, ax = _figure(0.5 * da.sizes["head"] + 4.0, height)
    annotate = da.sizes["head"] <= 16
    if counts:
        drawn = float(np.nanmax(da.values)) if np.isfinite(da.values).any() else 1.0
        top = float(most) if most is not None else max(1.0, drawn)
        notes = np.vectorize(lambda v: f"{v:.0f}")(da.values) if annotate else None
        mesh = _cells(
            ax, da.values, da["head"].values, da["layer"].values, cmap="Blues", vmin=0, vmax=top, notes=notes
        )
        note = label
    else:
        scale = effect_range(da.values, total)
        notes = np.vectorize(lambda v: f"{v:.2f}")(da.values) if annotate else None
        mesh = _effect_map(ax, da.values, da["head"].values, da["layer"].values, scale, notes=notes)
        note = f"{label}; {scale.note}"
    _colour_bar(figure, mesh, ax, note, height=height)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    _title(ax, title)
    return _save(figure, path)


LETTERS = {"object_detection": "D", "object_suppression": "S", "outlier_suppression": "O"}
"""How `head_functions` marks NOTICE's head functions in a cell: D(etection), S(uppression), O(utliers)."""


def head_functions(
    effect: xr.DataArray,
    shares: xr.DataArray,
    *,
    path: str | Path,
    title: str = "",
    label: str = "effect",
    total: float | None = None,
) -> Path:
    """Head effects (layer, head) on +-`total` (1 for normalised effects), each cell marked with
    the head functions (shares: function, layer, head; the share of samples labelled) held by at
    least half the samples."""
    effect = effect.transpose("layer", "head")
    height = 0.5 * effect.sizes["layer"] + 2.4
    figure, ax = _figure(0.6 * effect.sizes["head"] + 4.0, height)
    scale = effect_range(effect.values, total)
    mesh = _effect_map(ax, effect.values, effect["head"].values, effect["layer"].values, scale)
    for i, layer in enumerate(effect["layer"].values):
        for j, head in enumerate(effect["head"].values):
            held = {
                str(f): float(shares.sel(function=f, layer=layer, head=head))
                for f in shares["function"].values
            }
            marks = [
                f"{LETTERS.get(f, f[:1].upper())}{share:.0%}" for f, share in held.items() if share >= 0.5
            ]
            value = effect.values[i, j]
            text = (f"{value:.2f}" if np.isfinite(value) else "") + ("\n" + " ".join(marks) if marks else "")
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=7)
    _colour_bar(figure, mesh, ax, f"{label}; {scale.note}", height=height)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    _title(
        ax, title + "\nD: object detection, S: object suppression, O: outlier suppression (share of samples)"
    )
    return _save(figure, path)


class UnflooredRelativeChange(ValueError):
    """A relative change that `engine.metrics.relative_change` did not floor (it would divide by ~0)."""


def knockout_curves(relative: xr.DataArray, *, path: str | Path, title: str = "") -> Path:
    """Relative change in P(answer) per layer (relative: sample, block, layer), averaged over
    samples: one line, with its 95% bootstrap band, per block.

    Only a relative change floored by `engine.metrics.relative_change` is drawn (its
    `clean_floor` attr): samples whose clean probability is below the floor have none, and
    the figure says how many are left; a change above (1 - floor) / floor cannot come from a
    floored probability and is refused.
    """
    from ..results.stats import bootstrap_mean

    floor = relative.attrs.get("clean_floor")
    if floor is None:
        raise UnflooredRelativeChange(
            "knockout_curves draws only relative changes from vlmtrace.engine.metrics.relative_change, "
            "which leaves out samples whose clean P(answer) is below a floor; compute it with that."
        )
    largest = float(np.nanmax(relative.values)) if np.isfinite(relative.values).any() else 0.0
    if largest > (1 - floor) / floor + 1e-9:
        raise UnflooredRelativeChange(
            f"a relative change of {largest:+.3g} cannot come from a clean P(answer) >= {floor:g}; "
            "recompute it with vlmtrace.engine.metrics.relative_change."
        )
    summary = bootstrap_mean(relative)
    figure, ax = _figure(6.5, 4.0)
    layers = summary["layer"].values
    if not np.isfinite(summary["mean"].values).any():
        ax.text(
            0.5,
            0.5,
            f"not shown: no sample's clean P(answer) reaches {floor:g}",
            transform=ax.transAxes,
            ha="center",
        )
    else:
        for block in summary["block"].values:
            ax.plot(layers, summary["mean"].sel(block=block).values, marker="o", label=str(block))
            ax.fill_between(
                layers,
                summary["low"].sel(block=block).values,
                summary["high"].sel(block=block).values,
                alpha=0.2,
            )
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.text(
        0.01,
        0.02,
        f"lines: mean over samples with clean P >= {floor:g}; bands: 95% bootstrap interval",
        transform=ax.transAxes,
        fontsize=7,
        color="grey",
    )
    ax.set_xlabel("layer (window centre)")
    ax.set_ylabel("relative change in P(answer)\n(-1 = answer lost)")
    _title(ax, title)
    return _save(figure, path)


def score_bars(
    mean: xr.DataArray,
    low: xr.DataArray,
    high: xr.DataArray,
    *,
    path: str | Path,
    title: str = "",
    label: str = "score (95% CI)",
) -> Path:
    """Scores in 0..1 (accuracies) per `metric` and `condition`: one group of bars per metric, one
    bar per condition, each with its interval `low`..`high`; the y range is 0..1 whatever the
    bars reach, so a score of 0.02 looks like one."""
    conditions, metrics = [str(c) for c in mean["condition"].values], [str(m) for m in mean["metric"].values]
    figure, ax = _figure(WIDTH, 3.8)
    width = 0.8 / len(conditions)
    for i, condition in enumerate(conditions):
        m = mean.sel(condition=condition).transpose("metric").values
        lo = low.sel(condition=condition).transpose("metric").values
        hi = high.sel(condition=condition).transpose("metric").values
        ax.bar(np.arange(len(metrics)) + i * width, m, width, yerr=[m - lo, hi - m], label=condition)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set(ylim=(0, 1.05), ylabel=label)
    figure.legend(fontsize=7, ncol=1, loc="outside right upper")
    _title(ax, title)
    return _save(figure, path)


def image_attention(
    image,
    weights: np.ndarray,
    *,
    grid: tuple[int, int],
    path: str | Path,
    title: str = "",
    label: str = "attention weight (0 to 1)",
) -> Path:
    """Attention over image patches (weights: one per patch, row-major) drawn on the image.

    On 0..1, or, where the largest weight is below `STRETCHED`, on 0..max with the title
    saying so, and how much attention all the patches hold together.
    """
    picture = np.asarray(image.convert("RGB"))
    heat = np.asarray(weights, dtype=float).reshape(grid)
    held = float(np.nansum(heat))
    top, note = stretched_note(heat, what=f"; all patches together hold {held:.2g}")
    figure, ax = _figure(4.6, 4.4)
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    ax.imshow(picture, extent=extent)
    shown = ax.imshow(
        heat, cmap="magma", alpha=0.55, vmin=0, vmax=top, extent=extent, interpolation="nearest"
    )
    _colour_bar(figure, shown, ax, label, height=4.0)
    ax.set_axis_off()
    _title(ax, "\n".join(line for line in (title, note) if line))
    return _save(figure, path)

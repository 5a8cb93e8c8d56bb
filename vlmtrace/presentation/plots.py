"""Figures of causal traces, drawn from Datasets (never from a live model).

Plotting is kept apart from running so that `vlmtrace plot X.zarr` can redraw any figure
from a store, and a recipe's `run` stays a pure experiment.

    heatmap(effect.isel(sample=0, window=0), path="trace.png")   # layer x token, one sample
    segment_heatmap(summary, path="avg.png")                     # layer x segment, with CIs
    window_panels(effect_by_segment, path="windows.png")         # one panel per window size
    head_grid(effect, path="heads.png")                          # layer x head
    knockout_curves(relative, path="flow.png")                   # one line per block
    image_attention(image, weights, grid=(4, 4), path="att.png") # attention over patches
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402

CMAP = "RdBu_r"


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")  # long titles and labels are never cut off
    plt.close(figure)
    return path


def _limits(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _diverging(ax, values: np.ndarray, columns, rows, *, limit: float | None = None, **extra) -> None:
    """A heatmap centred on zero (restoring helps: red; hurts: blue), on a symmetric scale."""
    limit = _limits(values) if limit is None else limit
    sns.heatmap(
        values,
        ax=ax,
        cmap=CMAP,
        vmin=-limit,
        vmax=limit,
        xticklabels=list(columns),
        yticklabels=list(rows),
        **extra,
    )


def heatmap(da: xr.DataArray, *, path: str | Path, title: str = "", label: str = "") -> Path:
    """Layer x position for one sample, positions labelled with their tokens.

    `label` names the colour bar's quantity and unit (default: the DataArray's name).
    """
    da = da.transpose("layer", ...)
    columns = da.dims[1]
    labels = [str(t) for t in (da["token"].values if "token" in da.coords else da[columns].values)]
    figure, ax = plt.subplots(figsize=(max(4, 0.45 * len(labels) + 2), 0.45 * da.sizes["layer"] + 1.8))
    cbar = {"label": label or str(da.name or "effect")}
    _diverging(ax, da.values, labels, da["layer"].values, cbar_kws=cbar)
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return _save(figure, path)


def segment_heatmap(
    summary: xr.Dataset, *, path: str | Path, title: str = "", label: str = "mean effect"
) -> Path:
    """Layer x segment of a bootstrap summary: the mean, annotated with its interval."""
    mean = summary["mean"].transpose("layer", "segment")
    low = summary["low"].transpose("layer", "segment").values
    high = summary["high"].transpose("layer", "segment").values
    notes = np.vectorize(lambda m, lo, hi: f"{m:.2f}\n[{lo:.2f},{hi:.2f}]")(mean.values, low, high)
    width = 1.5 * mean.sizes["segment"] + 2
    figure, ax = plt.subplots(figsize=(width, 0.6 * mean.sizes["layer"] + 1.8))
    _diverging(
        ax,
        mean.values,
        mean["segment"].values,
        mean["layer"].values,
        annot=notes,
        fmt="",
        annot_kws={"fontsize": 7},
        cbar_kws={"label": label},
    )
    ax.set_xlabel("segment")
    ax.set_ylabel("layer")
    ax.set_title(title or f"mean over {summary.attrs.get('over', 'samples')} (95% bootstrap CI)")
    return _save(figure, path)


def window_panels(
    da: xr.DataArray, *, path: str | Path, title: str = "", by: str = "window", label: str = "mean effect"
) -> Path:
    """One layer x segment heatmap per value of `by` (default: window size)."""
    windows = list(da[by].values)
    figure, axes = plt.subplots(1, len(windows), figsize=(3.2 * len(windows), 3.6), squeeze=False)
    limit = _limits(da.values)
    for ax, window in zip(axes[0], windows, strict=True):
        panel = da.sel({by: window}).transpose("layer", "segment")
        _diverging(
            ax,
            panel.values,
            panel["segment"].values,
            panel["layer"].values,
            limit=limit,  # one scale for all panels
            cbar=window == windows[-1],
            cbar_kws={"label": label} if window == windows[-1] else None,
        )
        ax.set_title(f"{by} {window}")
        ax.set_xlabel("")
    axes[0][0].set_ylabel("layer")
    figure.suptitle(title)
    return _save(figure, path)


def head_grid(
    da: xr.DataArray, *, path: str | Path, title: str = "", label: str = "effect", counts: bool = False
) -> Path:
    """Layer x head values (da: layer, head): signed effects on a diverging scale, or, with
    `counts`, non-negative counts on a sequential one from 0."""
    da = da.transpose("layer", "head")
    figure, ax = plt.subplots(figsize=(0.5 * da.sizes["head"] + 3.5, 0.45 * da.sizes["layer"] + 1.8))
    annotate = {"annot": da.sizes["head"] <= 16, "cbar_kws": {"label": label}}
    if counts:
        top = max(1.0, float(np.nanmax(da.values)) if np.isfinite(da.values).any() else 1.0)
        sns.heatmap(
            da.values,
            ax=ax,
            cmap="Blues",
            vmin=0,
            vmax=top,
            xticklabels=list(da["head"].values),
            yticklabels=list(da["layer"].values),
            fmt=".0f",
            **annotate,
        )
    else:
        _diverging(ax, da.values, da["head"].values, da["layer"].values, fmt=".2f", **annotate)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return _save(figure, path)


LETTERS = {"object_detection": "D", "object_suppression": "S", "outlier_suppression": "O"}
"""How `head_functions` marks NOTICE's head functions in a cell: D(etection), S(uppression), O(utliers)."""


def head_functions(
    effect: xr.DataArray, shares: xr.DataArray, *, path: str | Path, title: str = "", label: str = "effect"
) -> Path:
    """Head effects (layer, head) on a diverging scale, each cell marked with the head functions
    (shares: function, layer, head; the share of samples labelled) held by at least half the samples."""
    effect = effect.transpose("layer", "head")
    figure, ax = plt.subplots(figsize=(0.6 * effect.sizes["head"] + 3.5, 0.5 * effect.sizes["layer"] + 2.0))
    _diverging(
        ax,
        effect.values,
        effect["head"].values,
        effect["layer"].values,
        annot=False,
        cbar_kws={"label": label},
    )
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
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(
        title + "\nD: object detection, S: object suppression, O: outlier suppression (share of samples)"
    )
    return _save(figure, path)


def knockout_curves(
    summary: xr.Dataset, *, path: str | Path, title: str = "", floor: float | None = None
) -> Path:
    """Relative change in the metric per layer, one line (with CI band) per block.

    `floor`: the clean probability below which samples have no relative change
    (`engine.metrics.relative_change`); the figure says so, and draws no line when none is left.
    """
    figure, ax = plt.subplots(figsize=(6, 3.6))
    layers = summary["layer"].values
    over = "samples" if floor is None else f"samples with clean P >= {floor:g}"
    if not np.isfinite(summary["mean"].values).any():
        ax.text(
            0.5,
            0.5,
            f"not shown: no sample's clean P(answer) reaches {floor:g}" if floor is not None else "no values",
            transform=ax.transAxes,
            ha="center",
        )
    else:
        for block in summary["block"].values:
            mean = summary["mean"].sel(block=block).values
            ax.plot(layers, mean, marker="o", label=str(block))
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
        f"lines: mean over {over}; bands: 95% bootstrap interval",
        transform=ax.transAxes,
        fontsize=7,
        color="grey",
    )
    ax.set_xlabel("layer (window centre)")
    ax.set_ylabel("relative change in P(answer)")
    ax.set_title(title)
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
    """Attention over image patches (weights: one per patch, row-major) drawn on the image."""
    picture = np.asarray(image.convert("RGB"))
    heat = np.asarray(weights, dtype=float).reshape(grid)
    figure, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(picture)
    height, width = picture.shape[:2]
    shown = ax.imshow(heat, cmap="magma", alpha=0.55, extent=(0, width, height, 0), interpolation="nearest")
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return _save(figure, path)

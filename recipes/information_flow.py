"""Cross-modal information flow, traced by cutting attention edges (attention knockout).

Zhang et al., "Cross-modal Information Flow in Multimodal Large Language Models" (2025).

Hypothesis. The model first moves general visual features of the whole image into the
question tokens (lower layers), then the features of the question-relevant object (middle
layers), and finally the fused representation reaches the last position (higher layers).

Intervention. Attention knockout over a window of layers: queries of one position set may
not attend to keys of another. Blocks: whole image -> question; the selected object's image
patches -> question; image + question -> last position.

Metric. Relative change in P(answer): (P_knockout - P_clean) / P_clean, per layer (window
centre), averaged over samples with a 95% bootstrap interval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace import plots
from vlmtrace.data import synthetic_samples
from vlmtrace.options import Options
from vlmtrace.positions import Segments
from vlmtrace.progress import sweeping
from vlmtrace.recipes import Needs
from vlmtrace.stats import bootstrap_mean

DESCRIPTION = "Zhang et al.: attention knockout image->question, object->question, image+question->last"
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava",)
NEEDS = Needs()
FAMILY = "fact"
WINDOWS = (1, 3)
QUESTION = ("question", "visual", "textual")


def object_region(sample: vt.Sample, segments: Segments) -> list[int]:
    """Image-token positions of the patch that holds the selected object (synthetic scenes).

    Scenes place each object's centre in one cell of the vision tower's patch grid, and image
    tokens follow the patches in row-major order, so the cell names the token.
    """
    from vlmtrace.data.drawing import GRID

    if "selected" not in sample.meta:
        return []
    row, column = sample.meta["scene"][sample.meta["selected"]]["cell"]
    image = segments.positions("image")
    return [image[row * GRID + column]]


BLOCKS = {
    "image->question": ("image", QUESTION),
    "object->question": (object_region, QUESTION),
    "image+question->last": (("image",) + QUESTION, "last"),
}


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    return synthetic_samples(vlm, FAMILY, n, seed=seed)


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    windows=WINDOWS,
    seed: int = 0,
    options: Options = Options(),
) -> xr.Dataset:
    with sweeping(f"information_flow: knock out {', '.join(BLOCKS)}"):
        ds = vt.knockout(
            vlm,
            samples,
            blocks=BLOCKS,
            windows=windows,
            **options.knockout(),
            recipe="information_flow",
        )
    ds["relative"] = (ds["knockout"] - ds["clean"]) / ds["clean"]
    ds["relative"].attrs = {
        "description": "relative change in P(answer) when the block is knocked out: "
        "(knockout - clean) / clean",
        "units": "fraction of the clean probability (-1 = answer lost)",
    }
    return ds


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    summary = bootstrap_mean(ds["relative"])
    return [
        plots.knockout_curves(
            summary.sel(window=w),
            path=Path(out_dir) / f"knockout_w{w}.png",
            title=f"{ds.attrs.get('model', '')}: attention knockout over a window of {w} layers, "
            f"{ds.sizes['sample']} samples",
        )
        for w in summary["window"].values
    ]


def summary(ds: xr.Dataset) -> str:
    mean = bootstrap_mean(ds["relative"])["mean"]
    window = int(mean["window"].values[-1])
    lines = [f"clean P = {float(ds['clean'].mean()):.3f}; relative change in P, window {window}:"]
    for block in mean["block"].values:
        curve = mean.sel(block=block, window=window)
        worst = int(np.nanargmin(curve.values))
        lines.append(
            f"  {block}: largest drop {float(curve[worst]):+.2f} at layer {int(curve['layer'][worst])}; "
            + " ".join(
                f"L{int(layer)}:{float(v):+.2f}" for layer, v in zip(curve["layer"], curve, strict=True)
            )
        )
    return "\n".join(lines)

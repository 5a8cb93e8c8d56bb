"""Multi-constraint questions: a visual and a textual constraint, retrieved at different depths.

Basu et al. (2024), multi-constraint questions ("Name a movie directed by this director in
2006"): information for the textual constraint is retrieved from a broader set of layers
(early and middle), and traces appear only with windows of at least 6 layers.

Hypothesis. In "which city did the red shape represent in year 2006 ?", restoring the
visual-constraint tokens and restoring the textual-constraint tokens matter at different
layers, and wider windows are needed to see the effect of either.

Corruption. Two runs: replace the visual constraint ("the red shape" -> "the blue shape"),
and replace the textual constraint ("year 2006" -> "year 2008"), each with its own answer.

Intervention. Restore clean MLP and self-attention outputs at (token, layer) over windows of
1 .. 6 layers (clipped to the model's depth).

Metric. Indirect effect P(answer | restored) - P(answer | corrupted); the result has a
`constraint` dimension ("visual", "textual").
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.options import Options
from vlmtrace.presentation.progress import sweeping
from vlmtrace.presentation.report import headline, patching_figures
from vlmtrace.recipes import Needs
from vlmtrace.results.dataset import combine

DESCRIPTION = (
    "Basu et al.: visual + textual constraints, each corrupted; windows 1..6 show where each is retrieved"
)
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava", "shapes-blip", "shapes-qwen")
NEEDS = Needs(replacements=("visual", "textual"))
FAMILY = "multi"
CONSTRAINTS = ("visual", "textual")
SITES = ("mlp", "attn")
WINDOWS = (1, 2, 3, 4, 5, 6)


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
    layers = vlm.shape.layers[vlm.adapter.default_stack]
    grid = vt.Grid(sites=SITES, windows=tuple(w for w in windows if w <= layers), skip=("image",))
    traces = {}
    for constraint in CONSTRAINTS:
        with sweeping(f"multi_constraint: {constraint} constraint replaced, restore mlp / attn, P(answer)"):
            traces[constraint] = vt.patch(
                vlm,
                samples,
                corruption=vt.ReplaceSpan(constraint),
                grid=grid,
                metric=vt.Probability(),
                **options.sweep(constraint),
                recipe="multi_constraint",
            )
    return combine(traces, dim="constraint")


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    paths = []
    for constraint in ds["constraint"].values:
        part = ds.sel(constraint=constraint)
        paths += patching_figures(part, out_dir, sites=SITES, tag=f"{constraint}_")
    return paths


def summary(ds: xr.Dataset) -> str:
    return "\n".join(
        headline(ds.sel(constraint=c), sites=SITES, label=f"[{c} constraint] ")
        for c in ds["constraint"].values
    )

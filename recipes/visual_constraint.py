"""MultimodalCausalTrace: where a VLM retrieves the knowledge a visual question needs.

Basu et al., "Understanding Information Storage and Transfer in Multi-modal Large Language
Models" (2024).

Hypothesis. To answer "the red shape is the mascot of which city ?" the model must retrieve a
fact about the entity the *visual constraint* ("the red shape") picks out of the image. That
retrieval happens in early MLP and self-attention blocks at the constraint's tokens.

Corruption. Replace the visual constraint's token ids with another phrase's (the sample's
counterfactual phrase, e.g. "the blue shape"), so the image no longer selects the entity.

Intervention. Restore the clean MLP output, or the clean self-attention output, at one
(token, layer), over a window of layers centred on that layer (sizes 1, 3, 5).

Metric. Indirect effect = P(answer | restored) - P(answer | corrupted), averaged over samples
by segment with 95% bootstrap intervals.
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

DESCRIPTION = (
    "Basu et al.: corrupt the visual-constraint phrase; restore MLP / attention per (token, layer, window)"
)
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava", "shapes-blip", "shapes-qwen")
NEEDS = Needs(replacements=("visual",))
FAMILY = "fact"
SITES = ("mlp", "attn")
WINDOWS = (1, 3, 5)


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
    with sweeping("visual_constraint: visual phrase replaced, restore mlp / attn, P(answer)"):
        return vt.patch(
            vlm,
            samples,
            corruption=vt.ReplaceSpan("visual"),
            grid=vt.Grid(sites=SITES, windows=tuple(w for w in windows if w <= layers), skip=("image",)),
            metric=vt.Probability(),
            **options.sweep("visual"),
            recipe="visual_constraint",
        )


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    return patching_figures(ds, out_dir, sites=SITES)


def summary(ds: xr.Dataset) -> str:
    return headline(ds, sites=SITES)

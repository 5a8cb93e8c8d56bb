"""Visual complex concepts: where a conjunction or a disjunction of two attributes is composed.

The seed's "visual complex concepts" (B_s / B_d sets; `vlmtrace.data.concepts`).

Hypothesis. A model that answers "Is there a red cylinder?" reads colour and shape from the
object's image tokens and composes them somewhere on the way to the answer; "Is there a metal
thing or a cube?" composes a disjunction. Pairs that change one attribute or both show where
each is read and where the composition lives.

Data. AND: B_s = {red AND cylinder}, B_d = {red AND NOT cylinder, NOT red AND cylinder, NOT red
AND NOT cylinder}; OR: B_s = {metal AND NOT cube, NOT metal AND cube, metal AND cube}, B_d = {NOT
metal AND NOT cube}, from CLEVR's scenes with `--data CLEVR_v1.0/` (`load_data`; CLEVR has no
cone, the cylinder stands in). Each sample pairs a B_s image (yes) with a B_d image (no); the
members of the varying side take turns, AND and OR take turns, and each sample's `concept` and
`member` become coordinates. On the organisms' scenes (colour red, kind square for both), which
were never trained on yes / no, each pair asks for the one attribute its member changes ("what kind
is the red shape ?"), and the members that change both attributes are left out
(`vlmtrace.data.concepts.synthetic_concept_samples`).

Corruption. The image pair (SIP).

Intervention. Restore the clean block output at every (position, layer), image tokens included.

Metric. Logit difference answer - foil (yes - no on CLEVR), normalised (1 = the clean answer
restored). The composition layer of a member is the first layer at which restoring the last
position alone recovers half.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data.concepts import Concept, clevr_concept_samples, interleaved, synthetic_concept_samples
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.presentation.titles import describe_run
from vlmtrace.recipes import Needs
from vlmtrace.results.stats import bootstrap_mean, by_segment

DESCRIPTION = "Visual complex concepts: AND / OR sets (B_s vs B_d image pairs); where the concept is composed"
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava", "shapes-qwen")
NEEDS = Needs(image_pair=True, foil=True)  # scored by logit difference
CLEVR_CONCEPTS = (
    Concept.conjunction("color", "red", "shape", "cylinder"),
    Concept.disjunction("material", "metal", "shape", "cube"),
)
"""The seed's sets on CLEVR's attributes (CLEVR has no cone: cylinder stands in for it)."""
SYNTHETIC_CONCEPTS = (
    Concept.conjunction("colour", "red", "kind", "square"),
    Concept.disjunction("colour", "red", "kind", "square"),
)
HALF = 0.5


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    """`n` pairs over the organisms' scenes, AND and OR taking turns, prompts in the form `vlm` reads."""
    from vlmtrace.prompts import for_model

    each = -(-n // len(SYNTHETIC_CONCEPTS))
    groups = [synthetic_concept_samples(concept, each, seed=seed) for concept in SYNTHETIC_CONCEPTS]
    return for_model(vlm, interleaved(groups, n))


def load_data(path: Path, n: int, seed: int) -> list[vt.Sample]:
    """`n` pairs from CLEVR's scenes under `path` (CLEVR_v1.0 as unpacked), AND and OR taking turns.

    The CLI reads `--data` with this instead of the question loaders: the pairs come from the scenes.
    """
    each = -(-n // len(CLEVR_CONCEPTS))
    groups = [clevr_concept_samples(concept, path, each, seed=seed) for concept in CLEVR_CONCEPTS]
    return interleaved(groups, n)


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    seed: int = 0,
    options: Options = Options(),
) -> xr.Dataset:
    with sweeping("concepts: image pairs across B_s / B_d, restore block outputs, logit difference"):
        ds = vt.patch(
            vlm,
            samples,
            corruption=vt.ImagePair(),
            grid=vt.Grid(sites=("block",)),
            metric=vt.LogitDiff(),
            **options.sweep("concepts"),
            recipe="concepts",
        )
    by_id = {s.id: s for s in samples}
    ids = [str(i) for i in ds["sample"].values]
    ds = ds.assign_coords(
        concept=("sample", [str(by_id[i].meta.get("concept", "")) for i in ids]),
        member=("sample", [str(by_id[i].meta.get("member", "")) for i in ids]),
    )
    ds["normalised"] = vt.normalised(ds, "block")
    ds["normalised"].attrs |= {  # beside its gap floor (`vt.normalised`)
        "description": "normalised effect of restoring the clean block output under the B_s / B_d image pair",
        "units": "fraction of the clean-corrupted gap (0 = corrupted, 1 = clean)",
    }
    return ds


def by_member(ds: xr.Dataset) -> xr.Dataset:
    """Mean normalised effect (and 95% interval) per (concept, member, layer, segment), window 1."""
    effect = by_segment(ds["normalised"].sel(window=1))
    groups = {}
    for concept in dict.fromkeys(ds["concept"].values):
        for member in dict.fromkeys(ds["member"].values[ds["concept"].values == concept]):
            chosen = (ds["concept"].values == concept) & (ds["member"].values == member)
            groups[f"{concept}: {member}"] = bootstrap_mean(effect.isel(sample=np.flatnonzero(chosen)))
    return xr.concat(list(groups.values()), dim="group").assign_coords(group=list(groups))


def composition_layers(ds: xr.Dataset) -> dict[str, int | None]:
    """Per group, the first layer at which restoring the last position recovers half the answer."""
    means = by_member(ds)["mean"]
    found = {}
    for group in means["group"].values:
        last = means.sel(group=group, segment="last").values if "last" in means["segment"] else []
        above = np.flatnonzero(np.nan_to_num(last, nan=-np.inf) >= HALF)
        found[str(group)] = int(means["layer"].values[above[0]]) if above.size else None
    return found


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    groups = by_member(ds)
    labels = ds["concept"] + ": " + ds["member"]
    kept = vt.above_floor(ds)  # samples with a gap above the metric's floor: the others have no effect
    return [
        plots.segment_heatmap(
            groups.sel(group=group),
            path=Path(out_dir) / f"group_{i}.png",
            title=f"{group}: block output restored (window 1), B_s / B_d image pairs, mean over "
            f"{int((kept & (labels == group)).sum())} of {int((labels == group).sum())} samples (the others' "
            f"gap is below the metric's floor)\n{describe_run(ds)}",
            label="normalised logit difference (0 = corrupted, 1 = clean)",
            total=1.0,  # normalised: 1 is the whole clean - corrupted gap
        )
        for i, group in enumerate(groups["group"].values)
    ]


def summary(ds: xr.Dataset) -> str:
    gap = ds["clean"] - ds["corrupt"]
    if not bool((gap != 0).any()):
        return (
            "no effect to localise: the model scores yes and no alike on every pair (clean - corrupted = 0); "
            "the concept questions need a model that answers yes / no."
        )
    means = by_member(ds)["mean"]
    layers = composition_layers(ds)
    lines = [f"clean - corrupted = {float(gap.mean()):+.3f} (mean over {gap.size} pairs, logit difference)"]
    for group in means["group"].values:
        part = means.sel(group=group)
        if not np.isfinite(part.values).any():
            lines.append(f"{group}: no pair of this member changes the answer (effects undefined)")
            continue
        peak = np.unravel_index(int(np.nanargmax(np.nan_to_num(part.values, nan=-np.inf))), part.shape)
        layer, where = layers[str(group)], int(part["layer"][peak[0]])
        lines.append(
            f"{group}: largest effect {float(part.values[peak]):+.2f} at layer {where}, "
            f"segment {str(part['segment'].values[peak[1]])!r}; composed at the last position from "
            + (f"layer {layer}" if layer is not None else "no layer (never half)")
        )
    return "\n".join(lines)

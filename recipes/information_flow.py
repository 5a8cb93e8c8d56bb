"""Cross-modal information flow, traced by cutting attention edges (attention knockout).

Zhang et al., "Cross-modal Information Flow in Multimodal Large Language Models" (2025).

Hypothesis. The model first moves general visual features of the whole image into the
question tokens (lower layers), then the features of the question-relevant object (middle
layers), and finally the fused representation reaches the last position (higher layers).

Intervention. Attention knockout over a window of layers: queries of one position set may
not attend to keys of another. Blocks: whole image -> question; the selected object's image
patches -> question; image + question -> last position. Data without object regions (VQA v2,
COCO-QA) runs the two knockouts that need none, and the result says the object one was skipped.

Metric. Relative change in P(answer): (P_knockout - P_clean) / P_clean, per layer (window
centre), averaged over samples with a 95% bootstrap interval. As in the paper, only samples the
model answers correctly are traced (the CLI leaves the others out), and a sample whose clean
P(answer) is below a floor (`CLEAN_FLOOR`, 0.05) gets no relative change: a ratio to a
near-zero probability measures nothing.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.metrics import CLEAN_FLOOR, relative_change
from vlmtrace.engine.positions import Segments
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.presentation.titles import describe_run
from vlmtrace.recipes import Needs
from vlmtrace.results.stats import bootstrap_mean

DESCRIPTION = "Zhang et al.: attention knockout image->question, object->question, image+question->last"
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava", "shapes-qwen")
NEEDS = Needs()
FAMILY = "fact"
WINDOWS = (1, 3)
QUESTION = ("question", "visual", "textual")
OBJECT_REGIONS = True  # --data maps each sample's object region onto the model's image tokens


def has_region(sample: vt.Sample) -> bool:
    """Whether the sample names its object's region (mapped on loading, or boxes to map)."""
    return any(key in sample.meta for key in ("region_tokens", "region_cells", "regions"))


def object_region(vlm: vt.VLM, sample: vt.Sample, segments: Segments) -> list[int]:
    """Image-token positions of the patches that hold the question's object.

    The sample's boxes (a dataset's, or the exact boxes of a synthetic scene) are mapped onto the
    model's image tokens by the family's declared image grid (`vlmtrace.data.regions`).
    """
    from vlmtrace.data.regions import RegionError, cell_positions, region_tokens, token_positions

    if "region_tokens" in sample.meta:  # real data: mapped when it was loaded (vlmtrace.data.preparation)
        return token_positions(
            sample.meta["region_tokens"], sample.meta["image_tokens"], segments, sample_id=sample.id
        )
    if "region_cells" in sample.meta:  # cells of a square grid, written by hand
        return cell_positions(
            sample.meta["region_cells"], sample.meta["region_grid"], segments, sample_id=sample.id
        )
    if not sample.meta.get("regions"):
        raise RegionError(
            f"sample {sample.id!r} names no object region, so object->question would block nothing; "
            "load GQA with its scene graphs or CLEVR with its scenes (see README, Your own data)."
        )
    return token_positions(*region_tokens(vlm, sample), segments, sample_id=sample.id)


WHOLE = {
    "image->question": ("image", QUESTION),
    "image+question->last": (("image",) + QUESTION, "last"),
}
"""The knockouts that need no object region."""
OBJECT = "object->question"
BLOCKS = ("image->question", OBJECT, "image+question->last")


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    return synthetic_samples(vlm, FAMILY, n, seed=seed)


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    windows=WINDOWS,
    seed: int = 0,
    relative_floor: float = CLEAN_FLOOR,
    options: Options = Options(),
) -> xr.Dataset:
    located = [sample for sample in samples if has_region(sample)]
    blocks = {**WHOLE, OBJECT: (partial(object_region, vlm), QUESTION)}
    common = dict(windows=windows, **options.knockout(), recipe="information_flow")
    if len(located) == len(samples):
        with sweeping(f"information_flow: knock out {', '.join(BLOCKS)}"):
            ds = vt.knockout(vlm, samples, blocks={name: blocks[name] for name in BLOCKS}, **common)
    else:  # the whole-image and last-position knockouts need no region; the object one is skipped
        with sweeping(f"information_flow: knock out {', '.join(WHOLE)}"):
            ds = vt.knockout(vlm, samples, blocks=WHOLE, **common)
        if located:
            with sweeping(f"information_flow: knock out {OBJECT} ({len(located)} samples with a region)"):
                found = vt.knockout(vlm, located, blocks={OBJECT: blocks[OBJECT]}, **common)
            ds = xr.concat(
                [ds, found.reindex(sample=ds["sample"])],
                dim="block",
                data_vars="minimal",
                coords="minimal",
                compat="override",
                join="outer",
                combine_attrs="override",
            ).reindex(block=list(BLOCKS))
        ds.attrs["skipped"] = skipped_note(samples, located)
    ds["relative"] = relative_change(ds, "knockout", floor=relative_floor)
    ds.attrs["relative_floor"] = relative_floor
    return ds


def skipped_note(samples: list[vt.Sample], located: list[vt.Sample]) -> str:
    """Which samples the object knockout skipped, and why (the reasons preparation recorded)."""
    reasons: dict[str, int] = {}
    for sample in samples:
        if not has_region(sample):
            reason = sample.meta.get("region_skipped", "no object region")
            reasons[reason] = reasons.get(reason, 0) + 1
    why = "; ".join(f"{count} with {reason}" for reason, count in reasons.items())
    return (
        f"{OBJECT} skipped for {len(samples) - len(located)} of {len(samples)} samples ({why}); "
        "image->question and image+question->last ran on all of them"
    )


def relative(ds: xr.Dataset) -> xr.DataArray:
    """The stored relative change; recomputed under the default floor for a store that has none."""
    if "clean_floor" in ds["relative"].attrs:
        return ds["relative"]
    return relative_change(ds, "knockout")


def floor_note(ds: xr.Dataset) -> str:
    """How many samples have a relative change: those whose clean P(answer) reaches the floor."""
    floor = relative(ds).attrs["clean_floor"]
    above = int((ds["clean"] >= floor).sum())
    return f"{above} of {ds.sizes['sample']} samples with clean P(answer) >= {floor:g}"


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    floored = relative(ds)  # floored at the clean probability, as the headline's
    return [
        plots.knockout_curves(
            floored.sel(window=w),
            path=Path(out_dir) / f"knockout_w{w}.png",
            title=f"{describe_run(ds)}\nover a window of {w} layers, {floor_note(ds)}",
        )
        for w in floored["window"].values
    ]


def summary(ds: xr.Dataset) -> str:
    mean = bootstrap_mean(relative(ds))["mean"]
    window = int(mean["window"].values[-1])
    floor = relative(ds).attrs["clean_floor"]
    clean = float(ds["clean"].mean())
    lines = [f"clean P = {clean:.3f}; relative change in P, window {window} ({floor_note(ds)}):"]
    if ds.attrs.get("skipped"):  # said whatever else is reported: the object knockout did not run for all
        lines.append(f"  note: {ds.attrs['skipped']}")
    if not np.isfinite(mean.values).any():
        lines.append(
            f"  not reported: no sample's clean P(answer) reaches the floor {floor:g}, so a relative change "
            "would divide by a probability the model barely gives its answer."
        )
        return "\n".join(lines)
    for block in mean["block"].values:
        curve = mean.sel(block=block, window=window)
        if not np.isfinite(curve.values).any():
            continue
        worst = int(np.nanargmin(curve.values))
        lowest = float(curve[worst])
        at = f"at layer {int(curve['layer'][worst])}"
        found = f"largest drop {lowest:+.2f} {at}" if lowest < 0 else f"no drop (least {lowest:+.2f} {at})"
        lines.append(
            f"  {block}: {found}; "
            + " ".join(
                f"L{int(layer)}:{float(v):+.2f}" for layer, v in zip(curve["layer"], curve, strict=True)
            )
        )
    return "\n".join(lines)

"""Universal attention heads: heads that matter across tasks and both corruption kinds.

Golovanevsky et al. (NOTICE, 2025), "Universal attention heads exist across corruption
schemes and tasks".

Hypothesis. A few heads have a high patching effect whatever the task (visual questions,
fact retrieval, multi-constraint) and whatever is corrupted (text by STR, image by SIP).

Corruption. STR on the visual-constraint phrase; semantic image pairs.

Intervention. Restore one attention head at the answer position (LLaVA: self-attention
heads at the last token; BLIP: cross-attention heads over the question).

Metric. Normalised logit difference per head, averaged over samples; a head is "top" for a
(task, corruption) condition if it is among the `k` strongest; universal heads are top in
every condition. What each head does with the image ("Universal attention heads perform
distinct functions"): every sample's heads are labelled object detection, object suppression
or outlier suppression by their attention over image patches at the answer position, each
statistic stored with its permutation null (`vlmtrace.engine.head_functions`); the share of
samples per label is drawn next to the head effects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.head_functions import FUNCTIONS, head_functions
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.recipes import Needs, draw
from vlmtrace.results.dataset import combine

DESCRIPTION = "NOTICE: heads with high patching effect across tasks and both corruption kinds; their overlap"
DEFAULT_MODEL = "shapes-llava"
TASKS = ("visual", "fact", "multi")
TOP_K = 3
ORGANISMS = ("shapes-llava", "shapes-blip", "shapes-qwen")
NEEDS = Needs(replacements=("visual",), image_pair=True, foil=True)  # STR swaps the phrase; SIP the image


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    """`n` questions of each task that name a shape ("how many shapes" has no phrase to swap)."""
    return [
        sample
        for task in TASKS
        for sample in draw(NEEDS, lambda count, task=task: synthetic_samples(vlm, task, count, seed=seed), n)
    ]


def head_grid(vlm: vt.VLM) -> vt.Grid:
    if vlm.adapter.image_in_sequence:
        return vt.Grid(sites=("attn_head",), segments=("last",), positions="segments")
    return vt.Grid(sites=("cross_attn_head",), skip=("special",), positions="all")


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    seed: int = 0,
    options: Options = Options(),
) -> xr.Dataset:
    grid = head_grid(vlm)
    tasks: dict[str, list[vt.Sample]] = {}
    for sample in samples:
        tasks.setdefault(sample.meta.get("family", "all"), []).append(sample)
    corruptions = {"str": vt.SymmetricTokenReplacement("visual"), "sip": vt.ImagePair()}
    by_task = {}
    for task, group in tasks.items():
        by_corruption = {}
        for name, corruption in corruptions.items():
            with sweeping(f"universal_heads: {task} questions, {name}, restore single heads"):
                ds = vt.patch(
                    vlm,
                    group,
                    corruption=corruption,
                    grid=grid,
                    metric=vt.LogitDiff(),
                    **options.sweep(f"{task}.{name}"),
                    recipe="universal_heads",
                )
            effect = vt.normalised(ds, grid.sites[0]).squeeze(["segment", "window"], drop=True)
            condition = effect.mean("sample").to_dataset(name="head_effect").assign_attrs(ds.attrs)
            # the mean runs over the samples whose gap reaches the metric's floor (the others' is NaN)
            condition["samples_above_floor"] = int(vt.above_floor(ds).sum())
            condition["samples"] = ds.sizes["sample"]
            by_corruption[name] = condition
        by_task[task] = combine(by_corruption, dim="corruption")
    ds = combine(by_task, dim="task")
    ds["head_effect"].attrs = {
        "description": "normalised logit difference of restoring one head at the answer position, "
        "mean over the task's samples whose clean - corrupted gap reaches the metric's floor "
        "(samples_above_floor of samples): (patched - corrupt) / (clean - corrupt)",
        "units": "fraction of the clean-corrupted gap (0 = corrupted, 1 = clean)",
    }
    ds["samples_above_floor"].attrs = {
        "description": "samples of the condition whose clean - corrupted gap reaches the logit "
        "difference's gap floor: the samples head_effect averages",
        "units": "samples",
    }
    ds["samples"].attrs = {"description": "samples of the condition", "units": "samples"}
    ds["top"] = top_mask(ds["head_effect"], TOP_K)
    ds["top"].attrs = {
        "description": f"True where the head is among the {TOP_K} strongest of its (task, corruption)",
        "units": "boolean",
    }
    ds["universal"] = ds["top"].all(["task", "corruption"])
    ds["universal"].attrs = {
        "description": "True where the head is top in every condition",
        "units": "boolean",
    }
    ds.attrs["top_k"] = TOP_K
    functions = head_functions(vlm, samples, seed=seed, backend=options.backend)
    ds = xr.merge([ds, functions], combine_attrs="override")
    ds["function_fraction"] = xr.concat(
        [(functions["function_label"] == name).mean("sample") for name in FUNCTIONS], dim="function"
    ).assign_coords(function=list(FUNCTIONS))
    ds["function_fraction"].attrs = {
        "description": "share of all samples (every task) on which the head is labelled with the function",
        "units": "fraction (0 to 1)",
    }
    ds.attrs["head_functions"] = functions.attrs["head_functions"]
    return ds


def top_mask(effect: xr.DataArray, k: int) -> xr.DataArray:
    """True where a head is among the k largest effects of its (task, corruption) condition."""
    ordered = effect.transpose(..., "layer", "head")
    values = np.nan_to_num(ordered.values, nan=-np.inf)
    flat = values.reshape(*values.shape[:-2], -1)
    threshold = -np.sort(-flat, axis=-1)[..., k - 1 : k]
    top = (flat >= threshold) & np.isfinite(flat)
    return ordered.copy(data=top.reshape(values.shape))


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    overlap = ds["top"].sum(["task", "corruption"]).astype(float)
    conditions = ds.sizes["task"] * ds.sizes["corruption"]
    tasks, corruptions = (list(map(str, ds[dim].values)) for dim in ("task", "corruption"))
    return [
        plots.head_grid(
            overlap,
            path=Path(out_dir) / "head_overlap.png",
            title=f"{ds.attrs.get('model', '')}: conditions (of {conditions} task x corruption) where a head "
            f"is top-{ds.attrs['top_k']}",
            label=f"conditions (0 to {conditions})",
            counts=True,
            most=conditions,  # the colour scale runs over every count a head can have
        ),
        plots.head_functions(
            ds["head_effect"].mean(["task", "corruption"]),
            ds["function_fraction"],
            path=Path(out_dir) / "head_functions.png",
            title=f"{ds.attrs.get('model', '')}: head effect, mean over tasks ({', '.join(tasks)}) "
            f"and corruptions ({', '.join(corruptions)}) of each condition's mean over its samples above "
            f"the gap floor ({samples_line(ds)}); letters: head functions",
            label="normalised logit difference (0 = corrupted, 1 = clean)",
            total=1.0,  # normalised: 1 is the whole clean - corrupted gap
        ),
    ]


def samples_line(ds: xr.Dataset) -> str:
    """Over how many samples each condition's mean head effect runs ("visual/str 8 of 8, ...")."""
    return ", ".join(
        f"{task}/{corruption} {int(ds['samples_above_floor'].sel(task=task, corruption=corruption))} of "
        f"{int(ds['samples'].sel(task=task, corruption=corruption))}"
        for task in ds["task"].values
        for corruption in ds["corruption"].values
    )


def summary(ds: xr.Dataset) -> str:
    conditions = ds.sizes["task"] * ds.sizes["corruption"]
    counts = (
        f"head effects are means over the samples whose gap reaches the logit difference's floor: "
        f"{samples_line(ds)}"
    )
    empty = [
        f"{task}/{corruption}"
        for task in ds["task"].values
        for corruption in ds["corruption"].values
        if int(ds["samples_above_floor"].sel(task=task, corruption=corruption)) == 0
    ]
    universal = [
        (int(layer), int(head)) for layer, head in zip(*np.nonzero(ds["universal"].values), strict=True)
    ]
    overlap = ds["top"].sum(["task", "corruption"])
    names = ", ".join(f"L{ds['layer'].values[la]}.H{ds['head'].values[h]}" for la, h in universal) or "none"
    if empty:
        names += (
            f" ({', '.join(empty)}: no sample's corruption moved the answer past the floor, so no head "
            "can be top there)"
        )
    top_k = ds.attrs["top_k"]
    head = f"universal heads (top-{top_k} in all {conditions} task x corruption conditions): {names}"
    if int(overlap.max()) == 0:
        return f"{head}; no head is top in any condition ({counts})"
    best = np.unravel_index(int(np.argmax(overlap.values)), overlap.shape)
    layer, head_index = ds["layer"].values[best[0]], ds["head"].values[best[1]]
    fraction = ds["function_fraction"].sel(layer=layer, head=head_index)
    strongest = int(fraction.argmax("function"))
    function = (
        f"{FUNCTIONS[strongest].replace('_', ' ')} on {float(fraction[strongest]):.0%} of samples"
        if float(fraction[strongest]) > 0
        else "no head function"
    )
    return (
        f"{head}; most shared: L{layer}.H{head_index} in {int(overlap.values[best])} conditions "
        f"({function}); {counts}"
    )

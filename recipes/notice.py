"""NOTICE: Gaussian-noise-free corruption, module-wise patching, then attention heads.

Golovanevsky et al., "What Do VLMs NOTICE? A Mechanistic Interpretability Pipeline for
Gaussian-Noise-free Text-Image Corruption and Evaluation" (2025).

Hypothesis. With in-distribution corruptions, image corruption emphasises middle-layer MLPs
and text corruption early-to-middle ones; a few attention heads carry vision-language
integration (LLaVA: self-attention at the answer position; BLIP: cross-attention).

Corruption. STR on text (the visual-constraint phrase swapped for one of the same token
count) and semantic image pairs (SIP: the same scene with one attribute of the selected
object changed), each with its own answer.

Intervention. (1) Restore MLP, self-attention and cross-attention outputs (those the model
has) at every text (token, layer). (2) Restore single attention heads at the answer position
(LLaVA: the last prompt token; BLIP: cross-attention heads over the whole question).

Metric. Logit difference between the answer and the corrupted side's answer, normalised to
1 = fully restored. Attention of the answer position over image patches is stored for the
figures (`attention`, `image`), and labels every head per sample with NOTICE's head functions
(object detection, object suppression, outlier suppression; `vlmtrace.engine.head_functions`),
with each statistic and its permutation null, drawn next to the head effects.

With `Options(inpaint=...)` (CLI `--inpaint opencv` or a diffusers pipeline id) a third image
corruption runs: the object's region inpainted (Visual Jenga's counterfactual inpainting; the
masks and inpainted images are stored as `inpaint_mask` and `inpainted`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.attention import attention_over_image
from vlmtrace.engine.head_functions import FUNCTIONS, head_functions
from vlmtrace.engine.inpainting import as_inpainting, inpainting_record
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.presentation.report import headline, patching_figures
from vlmtrace.presentation.titles import condition_attrs, corruption_words, describe_run
from vlmtrace.recipes import Needs, draw
from vlmtrace.results.dataset import combine

DESCRIPTION = (
    "NOTICE: STR and semantic image pairs; patch MLP / attention / cross-attention, then single heads"
)
DEFAULT_MODEL = "shapes-llava"
FAMILY = "visual"
ORGANISMS = ("shapes-llava", "shapes-blip", "shapes-qwen")
NEEDS = Needs(replacements=("visual",), image_pair=True, foil=True)  # STR swaps the phrase; SIP the image
MODULES = ("mlp", "attn", "cross_attn")
INPAINTS = True  # Options.inpaint adds the seed's SIP with generative models


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    """Visual questions that name a shape ("how many shapes" has no phrase to swap)."""
    return draw(NEEDS, lambda count: synthetic_samples(vlm, FAMILY, count, seed=seed), n)


def plan(vlm: vt.VLM) -> tuple[tuple[str, ...], vt.Grid]:
    """Module sites the model has, and where its heads are patched (data-driven, not by name)."""
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    modules = tuple(site for site in MODULES if site in stack.sites)
    if vlm.adapter.image_in_sequence:
        heads = vt.Grid(sites=("attn_head",), segments=("last",), positions="segments")
    else:
        heads = vt.Grid(sites=("cross_attn_head",), skip=("special",), positions="all")
    return modules, heads


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    seed: int = 0,
    options: Options = Options(),
) -> xr.Dataset:
    modules, head_grid = plan(vlm)
    corruptions = {"str": vt.SymmetricTokenReplacement("visual"), "sip": vt.ImagePair()}
    if options.inpaint:  # Visual Jenga's "SIP with generative models": the object's region painted over
        corruptions["inpaint"] = as_inpainting(options.inpaint, seed=seed)
    parts = {}
    for name, corruption in corruptions.items():
        common = dict(corruption=corruption, metric=vt.LogitDiff(), recipe="notice")
        with sweeping(f"notice: {name}, restore {' / '.join(modules)}, logit difference"):
            modular = vt.patch(
                vlm,
                samples,
                grid=vt.Grid(sites=modules, skip=("image",)),
                **common,
                **options.sweep(f"{name}.modules"),
            )
        with sweeping(f"notice: {name}, restore single {head_grid.sites[0]}s, logit difference"):
            heads = vt.patch(vlm, samples, grid=head_grid, **common, **options.sweep(f"{name}.heads"))
        heads = heads.squeeze("segment", drop=True)
        parts[name] = xr.merge(
            [modular, heads.drop_vars(["clean", "corrupt"])], compat="no_conflicts", combine_attrs="override"
        )
    ds = combine(parts, dim="corruption")
    head_site = head_grid.sites[0]
    ds["head_effect"] = vt.normalised(ds, head_site).sel(window=1)
    ds["head_effect"].attrs |= {  # beside its gap floor (`vt.normalised`)
        "description": f"normalised logit difference of restoring one {head_site} at the answer position: "
        "(patched - corrupt) / (clean - corrupt)",
        "units": "fraction of the clean-corrupted gap (0 = corrupted, 1 = clean)",
    }
    ds["attention"], ds["image"] = image_attention(vlm, samples, backend=options.backend)
    ds["attention"].attrs = {
        "description": "attention weight of the answer position on each image patch (clean run)",
        "units": "softmax weight (0 to 1)",
    }
    ds["image"].attrs = {"description": "the sample's image, RGB", "units": "8-bit intensity (0 to 255)"}
    functions = head_functions(vlm, samples, attention=ds["attention"], seed=seed, backend=options.backend)
    ds = xr.merge([ds, functions], combine_attrs="override")
    ds.attrs["head_functions"] = functions.attrs["head_functions"]
    if "inpaint" in corruptions:
        record = inpainting_record(corruptions["inpaint"], samples)
        ds = xr.merge([ds, record.drop_vars(["image_height", "image_width"])], combine_attrs="override")
        ds.attrs["inpainting"] = record.attrs["inpainting"]
    return ds


def image_attention(vlm: vt.VLM, samples: list[vt.Sample], backend=None):
    """Attention of the answer position over image patches (sample, layer, head, patch), and the images."""
    attention = attention_over_image(vlm, samples, backend=backend).drop_vars("sample")
    image = xr.DataArray(
        np.stack([np.asarray(s.image.convert("RGB")) for s in samples]), dims=("sample", "y", "x", "rgb")
    )
    return attention, image


def top_heads(ds: xr.Dataset, k: int = 3) -> list[tuple[str, int, int, float]]:
    """(corruption, layer, head, mean normalised effect) of the k strongest heads per corruption,
    among the heads with an effect: none where every sample's gap is below the metric's floor
    (`vt.normalised` is NaN there), rather than the first heads of an all-NaN ranking."""
    found = []
    for corruption in ds["corruption"].values:
        mean = ds["head_effect"].sel(corruption=corruption).mean("sample")
        finite = np.flatnonzero(np.isfinite(mean.values.ravel()))
        order = finite[np.argsort(-mean.values.ravel()[finite], kind="stable")][:k]
        for flat in order:
            layer, head = np.unravel_index(flat, mean.shape)
            found.append(
                (
                    str(corruption),
                    int(mean["layer"][layer]),
                    int(mean["head"][head]),
                    float(mean.values[layer, head]),
                )
            )
    return found


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    modules = [s for s in MODULES if s in ds]
    paths = []
    for corruption in ds["corruption"].values:
        part = ds.sel(corruption=corruption)
        paths += patching_figures(part, out_dir, sites=modules, tag=f"{corruption}_")
        paths.append(
            plots.head_functions(
                part["head_effect"].mean("sample"),
                function_shares(ds),
                path=out_dir / f"{corruption}_heads.png",
                title=f"single heads restored at the answer position, mean over "
                f"{int(vt.above_floor(part).sum())} of {ds.sizes['sample']} samples (the others' gap is "
                f"below the metric's floor); letters: head functions\n{describe_run(part)}",
                label="normalised logit difference (0 = corrupted, 1 = clean)",
                total=1.0,  # normalised: 1 is the whole clean - corrupted gap
            )
        )
    strongest = top_heads(ds, k=1)
    if not strongest:  # no head has an effect: no attention map to single out
        return paths
    corruption, layer, head, _ = strongest[0]
    side = int(np.sqrt(ds.sizes["patch"]))
    from PIL import Image

    picture = Image.fromarray(ds["image"].isel(sample=0).values.astype(np.uint8))
    weights = ds["attention"].isel(sample=0).sel(layer=layer, head=head).values
    paths.append(
        plots.image_attention(
            picture,
            weights,
            grid=(side, side),
            path=out_dir / "top_head_attention.png",
            title=f"{ds.attrs.get('model', '')} L{layer}.H{head}, top head under {corruption} "
            f"({corruption_words(condition_attrs(ds.sel(corruption=corruption)).get('corruption'))}):\n"
            f"clean-run attention of the answer position over image patches, sample {ds['sample'].values[0]}",
        )
    )
    return paths


def function_shares(ds: xr.Dataset) -> xr.DataArray:
    """Share of samples on which each head is labelled with each function (function, layer, head)."""
    labels = ds["function_label"]
    return xr.concat([(labels == name).mean("sample") for name in FUNCTIONS], dim="function").assign_coords(
        function=list(FUNCTIONS)
    )


def summary(ds: xr.Dataset) -> str:
    modules = [s for s in MODULES if s in ds]
    lines = [headline(ds.sel(corruption=c), sites=modules, label=f"[{c}] ") for c in ds["corruption"].values]
    shares = function_shares(ds)

    def what(layer: int, head: int) -> str:
        share = shares.sel(layer=layer, head=head)
        best = int(share.argmax("function"))
        if float(share[best]) == 0:
            return "no function"
        return f"{FUNCTIONS[best].replace('_', ' ')} on {float(share[best]):.0%} of samples"

    heads = ", ".join(
        f"{c}: L{layer}.H{head} ({v:+.2f}; {what(layer, head)})" for c, layer, head, v in top_heads(ds)
    )
    if not heads:
        return "\n".join(
            [*lines, "strongest heads: none named (no sample's gap is above the metric's floor)"]
        )
    return "\n".join(lines + [f"strongest heads: {heads}"])

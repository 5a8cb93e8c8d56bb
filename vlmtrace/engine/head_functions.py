"""What a head does with the image: NOTICE's three head functions, each tested against a null.

Golovanevsky et al. (NOTICE) describe universal heads by the attention of the answer position
over image patches: some look at the object the question is about (*object detection*), some
look everywhere but at it (*object suppression*), and some put their attention on the few
high-norm "outlier" patches that vision transformers use as registers (*outlier suppression*).
Patching says a head matters; these labels say how it reads the image.

    found = head_functions(vlm, samples)              # attention from the model, regions from the data
    found["label"].sel(layer=3, head=1)               # per sample: "object_detection", ... or "none"
    found = classify(attention, objects, outliers)    # the statistics alone, on arrays you already have

Each function is one statistic, the share of the head's attention over the image's tokens
that lands on a set of patches, compared with a permutation null: the same head's attention,
the same number of patches drawn at random (`draws` seeded draws, stored):

- object detection: the set is the object's region; the share is far above the null
  (z >= `z`) and at least `fold` times the region's share of the patches;
- object suppression: the same set; the share is far below the null (z <= -`z`) and at most
  1 / `fold` of the region's share: attention is moved off the object the question is about;
- outlier suppression: the set is the outlier patches of the head's layer, those whose key-side
  hidden state (the residual stream entering the layer; BLIP: the vision encoder's output) has a
  norm more than `outlier_z` robust standard deviations (median, MAD) above the median and at
  least twice the median; the share is far above the null and at least `fold` times theirs.

z is (statistic - null mean) / null std, from the null's exact moments (the mean is the share; the
variance that of a sum of k of n weights drawn without replacement), so it carries no Monte Carlo
noise; the permutation p-value of the stored draws is kept next to it. With a
region of k of n patches a permutation test cannot reach p below about 1 / C(n, k) (1/16 for one
patch of the organisms' 4 x 4 grid), which is why the label rests on z and the fold, and the
p-value says how far the null itself can resolve. A head can meet several criteria; `label`
names the one with the largest |z|. A sample without an object region gets NaN for the object
functions; a layer without outliers, NaN for outlier suppression.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..models.load import VLM
from .attention import attention_over_image
from .corruptions import clean_side
from .forward import SEQUENCE_FIELDS, driver, envoy_at, stack_rows
from .inputs import scored_answer_ids

FUNCTIONS = ("object_detection", "object_suppression", "outlier_suppression")
"""The functions, in the order of the `function` dimension."""
NONE = "none"


def head_functions(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    attention: xr.DataArray | None = None,
    draws: int = 200,
    seed: int = 0,
    z: float = 3.0,
    fold: float = 2.0,
    outlier_z: float = 3.5,
    backend: Any = None,
) -> xr.Dataset:
    """Label every (sample, layer, head) by its attention over image patches at the answer position.

    `attention` (sample, layer, head, patch) as NOTICE's recipe stores it (the answer position over
    the image's tokens; BLIP: over the vision encoder's patches, without CLS); None reads it here.
    """
    if attention is None:
        attention = attention_over_image(vlm, list(samples), backend=backend)
    patches = attention.sizes["patch"]
    objects = np.stack([object_patches(vlm, sample, patches) for sample in samples])
    norms = np.stack([key_norms(vlm, sample, backend=backend) for sample in samples])
    if norms.shape[-1] != patches:
        raise ValueError(
            f"{vlm.name}: {norms.shape[-1]} image keys but the attention holds {patches} patches; "
            "attention and norms must cover the same image tokens."
        )
    found = classify(
        attention,
        xr.DataArray(objects, dims=("sample", "patch")),
        outlier_patches(xr.DataArray(norms, dims=("sample", "layer", "patch")), z=outlier_z),
        draws=draws,
        seed=seed,
        z=z,
        fold=fold,
    )
    found["key_norm"] = xr.DataArray(norms, dims=("sample", "layer", "patch"))
    found["key_norm"].attrs = {
        "description": "norm of each image token's key-side hidden state: the residual stream entering the "
        "layer (BLIP: the vision encoder's output, the same for every layer)",
        "units": "L2 norm",
    }
    return found.assign_coords(sample=attention["sample"].values) if "sample" in attention.coords else found


def object_patches(vlm: VLM, sample: Sample, patches: int) -> np.ndarray:
    """A boolean mask over the image's tokens: those the sample's object region covers (none without one)."""
    from ..data.regions import RegionError, region_tokens

    mask = np.zeros(patches, dtype=bool)
    if not sample.meta.get("regions") or sample.image is None:
        return mask
    tokens, count = region_tokens(vlm, sample)
    if count != patches:
        raise RegionError(
            f"sample {sample.id!r}: its image has {count} tokens on {vlm.name}'s image grid, the attention "
            f"covers {patches}; the grid declaration (Adapter.image_grid) does not match."
        )
    mask[tokens] = True
    return mask


def outlier_patches(norms: xr.DataArray, *, z: float = 3.5, ratio: float = 2.0) -> xr.DataArray:
    """True where a patch's norm is more than `z` robust standard deviations above its layer's median
    and at least `ratio` times that median: the massive-norm tokens of Darcet et al. ("Vision
    Transformers Need Registers") are many times the typical norm, not merely its tail."""
    median = norms.median("patch")
    mad = np.abs(norms - median).median("patch")
    scale = np.maximum(1.4826 * mad, 1e-6 * np.abs(median) + 1e-12)
    return (((norms - median) / scale) > z) & (norms >= ratio * median)


def classify(
    attention: xr.DataArray,
    objects: xr.DataArray,
    outliers: xr.DataArray,
    *,
    draws: int = 200,
    seed: int = 0,
    z: float = 3.0,
    fold: float = 2.0,
) -> xr.Dataset:
    """The three statistics, their permutation nulls, z, p and labels (module docstring).

    `attention` (sample, layer, head, patch): any non-negative weights (renormalised over patches);
    `objects` (sample, patch) and `outliers` (sample, layer, patch): boolean masks.
    """
    weights = attention.transpose("sample", "layer", "head", "patch").values.astype(np.float64)
    total = weights.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = weights / total
    n_samples, n_layers, n_heads, n_patches = weights.shape
    object_mask = np.broadcast_to(
        objects.transpose("sample", "patch").values[:, None, :], (n_samples, n_layers, n_patches)
    )
    outlier_mask = outliers.transpose("sample", "layer", "patch").values
    rng = np.random.default_rng(seed)
    sets = {
        "object_detection": object_mask,
        "object_suppression": object_mask,
        "outlier_suppression": outlier_mask,
    }
    shape = (len(FUNCTIONS), n_samples, n_layers, n_heads)
    statistic, share = np.full(shape, np.nan), np.full(shape, np.nan)
    null = np.full((*shape, draws), np.nan, dtype=np.float32)
    orders = np.argsort(rng.random((n_samples, draws, n_patches)), axis=-1)  # one permutation per draw
    for f, name in enumerate(FUNCTIONS):
        if name == "object_suppression":  # the same set as detection: the same statistic and null
            statistic[f], share[f], null[f] = statistic[0], share[0], null[0]
            continue
        for s in range(n_samples):
            for layer in range(n_layers):
                chosen = sets[name][s, layer]
                k = int(chosen.sum())
                if k == 0 or k == n_patches:
                    continue
                statistic[f, s, layer] = weights[s, layer] @ chosen
                share[f, s, layer] = k / n_patches
                drawn = np.zeros((draws, n_patches))
                np.put_along_axis(drawn, orders[s, :, :k], 1.0, axis=-1)
                null[f, s, layer] = weights[s, layer] @ drawn.T
    # z from the null's exact moments (k of n patches drawn without replacement), not the draws' noise
    n = n_patches
    k = share * n
    centred = weights - weights.mean(-1, keepdims=True)
    variance = (centred**2).mean(-1)[None] * k * (n - k) / (n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.sqrt(variance)
        zscore = np.where(spread > 1e-12, (statistic - share) / spread, np.nan)
        above = (1 + (null >= statistic[..., None] - 1e-12).sum(-1)) / (draws + 1)
        below = (1 + (null <= statistic[..., None] + 1e-12).sum(-1)) / (draws + 1)
    lower = np.array([name == "object_suppression" for name in FUNCTIONS])[:, None, None, None]
    p_value = np.where(lower, below, above)
    p_value = np.where(np.isfinite(statistic), p_value, np.nan)
    with np.errstate(invalid="ignore"):
        labelled = np.where(
            lower, (zscore <= -z) & (statistic <= share / fold), (zscore >= z) & (statistic >= fold * share)
        )
    labelled &= np.isfinite(zscore)
    strength = np.where(labelled, np.abs(np.nan_to_num(zscore)), -1.0)
    best = strength.argmax(0)
    label = np.where(labelled.any(0), np.array(FUNCTIONS, dtype=object)[best], NONE).astype(str)
    coords = {
        "function": list(FUNCTIONS),
        "layer": attention["layer"].values,
        "head": attention["head"].values,
    }
    if "sample" in attention.coords:
        coords["sample"] = attention["sample"].values
    dims = ("function", "sample", "layer", "head")
    found = xr.Dataset(
        {
            "function_statistic": (dims, statistic),
            "function_share": (dims, share),
            "function_null": ((*dims, "draw"), null),
            "function_z": (dims, zscore),
            "function_p": (dims, p_value),
            "function_labelled": (dims, labelled),
            "function_label": (("sample", "layer", "head"), label),
            "object_patches": (("sample", "patch"), objects.transpose("sample", "patch").values),
            "outlier_patches": (("sample", "layer", "patch"), outlier_mask),
        },
        coords=coords,
    )
    found.attrs["head_functions"] = {"draws": draws, "seed": seed, "z": z, "fold": fold}
    _describe(found, draws, z, fold)
    return found


def _describe(found: xr.Dataset, draws: int, z: float, fold: float) -> None:
    described = {
        "function_statistic": (
            "share of the head's attention over the image's tokens that lands on the "
            "function's patches (object region, or outlier patches)",
            "fraction (0 to 1)",
        ),
        "function_share": (
            "the function's patches as a share of the image's tokens (the statistic of uniform attention)",
            "fraction (0 to 1)",
        ),
        "function_null": (
            f"the statistic for {draws} seeded random sets of as many patches (permutation null)",
            "fraction (0 to 1)",
        ),
        "function_z": (
            "(statistic - share) / std of the permutation null (exact moments)",
            "standard deviations of the null",
        ),
        "function_p": (
            "permutation p-value: upper tail for detection and outliers, lower for suppression",
            "probability",
        ),
        "function_labelled": (
            f"True where |z| >= {z} in the function's direction and the statistic is at "
            f"least {fold}x (detection, outliers) or at most 1/{fold} (suppression) of "
            "the share",
            "boolean",
        ),
        "function_label": (
            "the function of the (sample, layer, head) with the largest |z| among those labelled, or 'none'",
            "name",
        ),
        "object_patches": ("image tokens covered by the sample's object region", "boolean"),
        "outlier_patches": ("image tokens whose key-side norm is a robust outlier of their layer", "boolean"),
    }
    for name, (description, units) in described.items():
        found[name].attrs = {"description": description, "units": units}


def key_norms(vlm: VLM, sample: Sample, *, backend: Any = None) -> np.ndarray:
    """(layer, patch) norms of the hidden states the image's keys are made from.

    Early fusion: the residual stream entering each layer of the default stack, at the image
    positions. Cross-attention (BLIP): the vision encoder's output patches (CLS dropped), the same
    for every layer.
    """
    stack_name = vlm.adapter.default_stack
    stack = vlm.adapter.stacks[stack_name]
    answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
    encoded = clean_side(vlm, sample, answer)
    widths = {s: len(encoded.inputs[ids]) for s, (ids, _) in SEQUENCE_FIELDS.items() if ids in encoded.inputs}
    batch = stack_rows(vlm, [encoded.inputs], widths)
    n_layers = vlm.shape.layers[stack_name]
    envoy = vlm.envoy
    if vlm.adapter.image_in_sequence:
        image = encoded.segments(stack.sequence).positions("image")
        layers = envoy_at(envoy, stack.layers)
        with torch.no_grad(), envoy.trace(fn=driver(vlm), backend=backend, **batch):
            rows = [layers[i].input[0, image].float().norm(dim=-1).cpu() for i in range(n_layers)]
            found = torch.stack(rows).save()
        return found.numpy()
    hook = vlm.adapter.embeddings["image"]
    with torch.no_grad(), envoy.trace(fn=driver(vlm), backend=backend, **batch):
        value = envoy_at(envoy, hook.path).output
        value = value[hook.index] if hook.index is not None else value
        found = value[0, 1:].float().norm(dim=-1).cpu().save()  # the encoder's first token is CLS
    return np.repeat(found.numpy()[None, :], n_layers, axis=0)

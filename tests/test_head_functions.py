"""NOTICE's head functions are found where they were put: on arrays built for the organisms' scenes, and in
a tiny LLaVA whose head 2 of layer 0 is constructed, by setting its weights, to look at the red object.

The synthetic scenes draw every object exactly, so the object's image token is known without any
detector: the shape's grid cell (row-major on the organisms' 4 x 4 patch grid).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import xarray as xr

import vlmtrace as vt
from vlmtrace.data.scenes import VOCABULARY, make_samples
from vlmtrace.engine.head_functions import classify, head_functions, object_patches, outlier_patches
from vlmtrace.models.build import build_llava, word_tokenizer


@functools.cache
def organism() -> vt.VLM:
    return vt.load("shapes-llava")


def scene_samples(n: int = 8) -> list[vt.Sample]:
    """Questions that select one shape (they carry its exact box); "how many" questions select none."""
    return [s for s in make_samples("visual", 2 * n, seed=3) if "regions" in s.meta][:n]


def selected_token(sample: vt.Sample) -> int:
    row, column = sample.meta["scene"][sample.meta["selected"]]["cell"]
    return row * 4 + column


def test_the_exact_box_of_a_synthetic_object_covers_its_one_image_token():
    samples = scene_samples()
    masks = [object_patches(organism(), s, 16) for s in samples]
    assert all(np.flatnonzero(m).tolist() == [selected_token(s)] for m, s in zip(masks, samples, strict=True))


OUTLIER = 5  # a patch of large norm; constructed scenes keep the object elsewhere


def constructed(samples: list[vt.Sample]) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Attention of four heads per sample: on the object (0), everywhere but on it (1), on the outlier
    patch (2), uniform (3); norms 1 everywhere except the outlier patch."""
    weights = np.zeros((len(samples), 1, 4, 16))
    objects = np.zeros((len(samples), 16), dtype=bool)
    for i, sample in enumerate(samples):
        target = selected_token(sample)
        objects[i, target] = True
        weights[i, 0, 0] = 0.15 / 15
        weights[i, 0, 0, target] = 0.85
        weights[i, 0, 1] = 1 / 15
        weights[i, 0, 1, target] = 0.0
        weights[i, 0, 2] = 0.15 / 15
        weights[i, 0, 2, OUTLIER] = 0.85
        weights[i, 0, 3] = 1 / 16
    norms = np.ones((len(samples), 1, 16))
    norms[:, :, OUTLIER] = 10.0
    attention = xr.DataArray(
        weights, dims=("sample", "layer", "head", "patch"), coords={"layer": [0], "head": [0, 1, 2, 3]}
    )
    return (
        attention,
        xr.DataArray(objects, dims=("sample", "patch")),
        xr.DataArray(norms, dims=("sample", "layer", "patch")),
    )


@pytest.fixture(scope="module")
def labelled() -> xr.Dataset:
    samples = [s for s in scene_samples(16) if selected_token(s) != OUTLIER][:8]
    attention, objects, norms = constructed(samples)
    return classify(attention, objects, outlier_patches(norms), draws=200, seed=0)


def test_each_constructed_head_gets_its_function_on_every_scene(labelled):
    labels = labelled["function_label"].sel(layer=0)
    expected = ["object_detection", "object_suppression", "outlier_suppression", "none"]
    assert [set(labels.sel(head=h).values.tolist()) for h in range(4)] == [{name} for name in expected]


def test_the_null_is_stored_with_the_statistic_and_brackets_uniform_attention(labelled):
    null = labelled["function_null"].sel(function="object_detection", layer=0, head=3)
    statistic = labelled["function_statistic"].sel(function="object_detection", layer=0, head=3)
    assert labelled.sizes["draw"] == 200 and np.allclose(null, 1 / 16) and np.allclose(statistic, 1 / 16)


def test_detection_is_far_from_the_null_though_one_patch_of_16_bounds_its_p_value(labelled):
    found = labelled.sel(function="object_detection", layer=0, head=0)
    p_values = found["function_p"].values  # random single patches hit the object in about 1 of 16 draws
    assert bool((found["function_z"] >= 3).all()) and ((p_values > 0.02) & (p_values < 0.12)).all()


def test_the_outlier_patch_is_found_from_the_norms(labelled):
    assert np.flatnonzero(labelled["outlier_patches"].isel(sample=0, layer=0).values).tolist() == [OUTLIER]


def test_a_sample_without_an_object_region_has_no_object_statistic():
    attention, objects, norms = constructed(scene_samples(1))
    found = classify(attention, objects & False, outlier_patches(norms), draws=20)
    assert np.isnan(found["function_statistic"].sel(function="object_detection").values).all()


# --- a head constructed to attend to the object -------------------------------------------------------------

HEAD = 2
OBJECT_CHANNEL, QUERY_CHANNEL = 5, 6  # residual-stream dimensions the construction uses


BASELINE = 7  # every image token holds 3.0 here, so the red object's norm is not an outlier


def red_seeing_llava() -> vt.VLM:
    """A tiny LLaVA whose layer-0 head 2 attends from every text position to the image tokens that hold
    red, and nowhere else: set by weights, no training.

    Vision: the patch embedding writes each patch's mean of R - G - B (normalised pixels) into channel 0,
    the position embedding subtracts black's value; the encoder layers pass their input through (their
    output projections zeroed). Projector: channel 0 -> GELU -> residual channel OBJECT_CHANNEL, plus a
    constant 3 in channel BASELINE. Language model: every text token has 1 in QUERY_CHANNEL and 0 in
    OBJECT_CHANNEL; head 2's query reads QUERY_CHANNEL and its key OBJECT_CHANNEL, in the lowest-frequency
    rotary pair (which turns by less than 0.01 rad over the prompt), so its logits are large for red
    patches and about zero or negative everywhere else.
    """
    model, processor = build_llava(word_tokenizer(VOCABULARY), layers=2, seed=11)
    vision = model.model.vision_tower
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    signs = torch.tensor([1.0, -1.0, -1.0])
    black = float((signs * (-mean / std)).sum())  # R - G - B of a black pixel, normalised
    text = model.model.language_model
    head_dim = text.config.hidden_size // text.config.num_attention_heads
    pair = head_dim // 2 - 1  # the lowest rotary frequency of the first half
    with torch.no_grad():
        embeddings = vision.embeddings
        embeddings.patch_embedding.weight.zero_()
        pixels = embeddings.patch_embedding.weight.shape[-1] ** 2
        embeddings.patch_embedding.weight[0] = signs[:, None, None] / pixels
        embeddings.position_embedding.weight.zero_()
        embeddings.position_embedding.weight[:, 0] = -black
        embeddings.position_embedding.weight[:, 1] = 1.0
        embeddings.class_embedding.zero_()
        for layer in vision.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        projector = model.model.multi_modal_projector
        for linear in (projector.linear_1, projector.linear_2):
            linear.weight.zero_()
            linear.bias.zero_()
        projector.linear_1.weight[0, 0] = 8.0
        projector.linear_2.weight[OBJECT_CHANNEL, 0] = 0.05
        projector.linear_2.bias[BASELINE] = 3.0
        embed = text.embed_tokens.weight
        embed[:, OBJECT_CHANNEL] = 0.0
        embed[:, QUERY_CHANNEL] = 1.0
        attention = text.layers[0].self_attn
        rows = slice(HEAD * head_dim, (HEAD + 1) * head_dim)
        attention.q_proj.weight[rows] = 0.0
        attention.k_proj.weight[rows] = 0.0
        attention.q_proj.weight[HEAD * head_dim + pair, QUERY_CHANNEL] = 30.0
        attention.k_proj.weight[HEAD * head_dim + pair, OBJECT_CHANNEL] = 3.0
    return vt.wrap(model, processor, name="red-seeing-llava")


def red_selected(n: int = 8) -> list[vt.Sample]:
    """Questions about the red shape of a scene (the other shape is never red: colours are distinct)."""
    drawn = [s for s in make_samples("visual", 80, seed=5) if "regions" in s.meta]
    return [s for s in drawn if s.meta["scene"][s.meta["selected"]]["colour"] == "red"][:n]


@pytest.fixture(scope="module")
def found() -> xr.Dataset:
    samples = red_selected()
    assert len(samples) == 8
    return head_functions(red_seeing_llava(), samples, draws=100, seed=0)


def test_the_constructed_head_is_labelled_object_detection_on_every_scene(found):
    assert set(found["function_label"].sel(layer=0, head=HEAD).values.tolist()) == {"object_detection"}


def test_the_constructed_head_puts_most_of_its_image_attention_on_the_object(found):
    assert float(found["function_statistic"].sel(function="object_detection", layer=0, head=HEAD).min()) > 0.5


def test_the_other_heads_of_its_layer_are_not_object_detectors(found):
    others = found["function_label"].sel(layer=0).drop_sel(head=HEAD)
    assert not (others == "object_detection").any()

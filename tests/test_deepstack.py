"""Qwen3-VL's DeepStack: the `resid_pre` site holds the residual after DeepStack's addition.

DeepStack adds a second merger's image features to the image positions after language layer 0,
outside the layer modules. Read with plain hooks, the input of layer 1 is layer 0's output plus
those features; and through the engine, restoring the residual entering layer 1 restores the clean
run (the clean DeepStack features came with it), while restoring layer 0's output does not (the
corrupted image's DeepStack features are added on top of it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import qwen3_vl
from PIL import Image

import vlmtrace as vt


@pytest.fixture(scope="module")
def tiny_qwen3() -> vt.VLM:
    model, processor = qwen3_vl.FAMILY.build()
    return vt.wrap(model, processor, name="tiny-qwen3_vl")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=(32, 32, 3), dtype=np.uint8))


def test_the_input_of_layer_1_is_layer_0s_output_plus_the_deepstack_features(tiny_qwen3):
    model = tiny_qwen3.model
    inputs = dict(
        tiny_qwen3.processor(text=[qwen3_vl.FAMILY.prompt], images=[picture(0)], return_tensors="pt")
    )
    seen = {}
    layers = model.model.language_model.layers
    handles = [
        layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("block0", out.detach().clone())),
        layers[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("input1", a[0].detach().clone())),
        model.model.visual.deepstack_merger_list[0].register_forward_hook(
            lambda m, a, out: seen.__setitem__("deepstack", out.detach().clone())
        ),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    image = inputs["input_ids"][0] == model.config.image_token_id
    assert int(image.sum()) == len(seen["deepstack"]) > 0
    torch.testing.assert_close(seen["input1"][0, image], seen["block0"][0, image] + seen["deepstack"])
    torch.testing.assert_close(seen["input1"][0, ~image], seen["block0"][0, ~image])


def test_restoring_the_residual_after_deepstack_restores_the_clean_run_and_the_block_does_not(tiny_qwen3):
    sample = vt.Sample(
        prompt=qwen3_vl.FAMILY.prompt, answer="paris", image=picture(0), image_pair=picture(1), id="pair"
    )
    ds = vt.patch(
        tiny_qwen3,
        [sample],
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("block", "resid_pre"), positions="all"),
        metric=vt.LogProb(),
        progress=False,
    )
    clean, corrupt = float(ds["clean"][0]), float(ds["corrupt"][0])
    assert abs(clean - corrupt) > 1e-2, "the image pair does not move the answer: nothing is tested"
    after_deepstack = float(ds["resid_pre"].sel(layer=1, window=1).squeeze())
    before_deepstack = float(ds["block"].sel(layer=0, window=1).squeeze())
    assert after_deepstack == pytest.approx(clean, abs=1e-5)
    assert abs(before_deepstack - clean) > 1e-3

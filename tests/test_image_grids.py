"""Object regions land on the image tokens that see them, on families with dynamic, pooled and tiled grids.

The reference never uses `vlmtrace.models.image_grid`: a white box is painted on a black image, the
family's real processor turns it into pixel values, and a token "sees" the box when some pixel of
its patches is more than half-way from black to white. Which token holds which patches is written
here from each model's own code: Qwen2-VL's merger takes `merge**2` consecutive flat patches;
Gemma 3 average-pools a square of patches per token, the pan-and-scan crops after the image;
LLaVA-NeXT's order (base view, then the unpadded tiles with a newline token per row) comes from the
model's own `pack_image_features`, fed with a per-patch indicator instead of features.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from families import gemma3, llava, llava_next, qwen2_vl
from PIL import Image, ImageDraw

import vlmtrace as vt
from vlmtrace.data.regions import RegionError, region_tokens, token_positions
from vlmtrace.engine.corruptions import clean_side
from vlmtrace.engine.inputs import scored_answer_ids
from vlmtrace.models.image_grid import ImageGridError, box_tokens, token_blocks, token_count


@functools.cache
def tiny(name: str) -> vt.VLM:
    module = {"qwen2_vl": qwen2_vl, "gemma3": gemma3, "llava_next": llava_next, "llava": llava}[name]
    model, processor = module.FAMILY.build()
    return vt.wrap(model, processor, name=f"tiny-{name}")


def painted(size: tuple[int, int], box: tuple[int, int, int, int], colour=(255, 255, 255)) -> Image.Image:
    picture = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(picture).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
    return picture


def pixel_values(vlm: vt.VLM, prompt: str, image: Image.Image) -> tuple[np.ndarray, dict]:
    inputs = vlm.processor(text=[prompt], images=[image], return_tensors="pt")
    return inputs["pixel_values"].float().numpy(), inputs


def whiteness(vlm: vt.VLM, prompt: str, image: Image.Image) -> tuple[np.ndarray, dict]:
    """Per pixel value, 0 where the processor's black is and 1 where its white is."""
    values, inputs = pixel_values(vlm, prompt, image)
    black, _ = pixel_values(vlm, prompt, Image.new("RGB", image.size, (0, 0, 0)))
    white, _ = pixel_values(vlm, prompt, Image.new("RGB", image.size, (255, 255, 255)))
    return (values - black) / (white - black), inputs


def image_token_count(vlm: vt.VLM, inputs: dict) -> int:
    return int((inputs["input_ids"][0] == vlm.shape.image_token_id).sum())


def qwen_reference(vlm: vt.VLM, image: Image.Image) -> tuple[set[int], int]:
    """Qwen2-VL: flat patches [patch, 3 * t * p * p]; the merger joins merge**2 consecutive ones."""
    share, inputs = whiteness(vlm, qwen2_vl.PROMPT, image)
    merge = vlm.processor.image_processor.merge_size
    seen = (share > 0.5).any(-1).reshape(-1, merge * merge).any(-1)
    return set(np.nonzero(seen)[0].tolist()), image_token_count(vlm, inputs)


def gemma_reference(vlm: vt.VLM, image: Image.Image) -> tuple[set[int], int]:
    """Gemma 3: each image entry (the image, then its crops) is S x S pixels, pooled to k x k tokens."""
    share, inputs = whiteness(vlm, gemma3.FAMILY.prompt, image)
    k = math.isqrt(vlm.model.config.mm_tokens_per_image)
    entries, _, size, _ = share.shape
    block = size // k
    seen = (share > 0.5).any(1).reshape(entries, k, block, k, block).any((2, 4))
    return set(np.nonzero(seen.reshape(-1))[0].tolist()), image_token_count(vlm, inputs)


def llava_next_reference(vlm: vt.VLM, image: Image.Image) -> tuple[set[int], int]:
    """LLaVA-NeXT: per-patch indicators of every tile, packed by the model itself."""
    share, inputs = whiteness(vlm, llava_next.FAMILY.prompt, image)
    patch = vlm.model.config.vision_config.patch_size
    tiles, _, size, _ = share[0].shape
    side = size // patch
    seen = (share[0] > 0.5).any(1).reshape(tiles, side, patch, side, patch).any((2, 4))
    features = torch.tensor(seen.reshape(tiles, side * side, 1), dtype=torch.float32)
    packed, _ = vlm.model.model.pack_image_features(
        [features], inputs["image_sizes"], "default", image_newline=torch.zeros(1)
    )
    order = torch.cat(list(packed))[:, 0].numpy()
    return set(np.nonzero(order > 0)[0].tolist()), image_token_count(vlm, inputs)


def mapped(vlm: vt.VLM, image: Image.Image, box) -> tuple[set[int], int]:
    blocks = token_blocks(vlm, image)
    return set(box_tokens(blocks, box)), token_count(blocks)


CASES = {
    "qwen2_vl": (
        qwen_reference,
        [((96, 48), (22, 4, 60, 20)), ((48, 64), (3, 30, 20, 60)), ((32, 32), (9, 9, 22, 14))],
    ),
    "gemma3": (
        gemma_reference,
        [((32, 32), (9, 2, 17, 14)), ((64, 32), (34, 18, 62, 30)), ((64, 32), (3, 3, 30, 9))],
    ),
    "llava_next": (
        llava_next_reference,
        [((64, 32), (20, 4, 44, 12)), ((60, 36), (10, 20, 30, 34)), ((36, 60), (2, 40, 30, 58))],
    ),
}


@pytest.mark.parametrize("family", list(CASES))
def test_a_box_maps_to_the_image_tokens_whose_pixels_it_covers(family):
    vlm = tiny(family)
    reference, boxes = CASES[family]
    for size, box in boxes:
        image = painted(size, box)
        expected, count = reference(vlm, image)
        assert expected, (family, size, box)  # the reference sees the box at all
        assert mapped(vlm, image, box) == (expected, count), (family, size, box)


def test_gemma_pan_and_scan_crops_each_get_their_own_tokens():
    vlm = tiny("gemma3")
    blocks = token_blocks(vlm, Image.new("RGB", (64, 32)))
    assert [b.name for b in blocks] == ["image", "crop 1", "crop 2"] and [b.offset for b in blocks] == [
        0,
        16,
        32,
    ]


def sample_for(vlm: vt.VLM, prompt: str, image: Image.Image, box) -> vt.Sample:
    return vt.Sample(prompt=prompt, answer="paris", image=image, id="boxed", meta={"regions": [box]})


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "llava_next"])
def test_region_tokens_are_placed_on_the_prompts_image_positions(family):
    vlm = tiny(family)
    prompt = {
        "qwen2_vl": qwen2_vl.PROMPT,
        "gemma3": gemma3.FAMILY.prompt,
        "llava_next": llava_next.FAMILY.prompt,
    }
    size, box = CASES[family][1][1]
    sample = sample_for(vlm, prompt[family], painted(size, box), box)
    tokens, count = region_tokens(vlm, sample)
    encoded = clean_side(vlm, sample, scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False))
    segments = encoded.segments("prompt")
    positions = token_positions(tokens, count, segments)
    ids = encoded.inputs["input_ids"]
    assert all(int(ids[p]) == vlm.shape.image_token_id for p in positions) and len(positions) == len(tokens)


def test_a_mapping_that_miscounts_the_image_tokens_is_refused():
    vlm = tiny("qwen2_vl")
    sample = sample_for(vlm, qwen2_vl.PROMPT, painted((32, 32), (8, 8, 16, 16)), (8, 8, 16, 16))
    tokens, count = region_tokens(vlm, sample)
    encoded = clean_side(vlm, sample, scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False))
    with pytest.raises(RegionError, match="image tokens"):
        token_positions(tokens, count + 1, encoded.segments("prompt"))


def test_a_family_without_a_declared_grid_says_so():
    from dataclasses import replace

    vlm = tiny("llava")
    undeclared = replace(vlm, adapter=replace(vlm.adapter, image_grid=None))
    with pytest.raises(ImageGridError, match="declares no image grid"):
        token_blocks(undeclared, Image.new("RGB", (32, 32)))

"""Qwen3-VL: DeepStack. Vision block 0 feeds a second merger whose output is added to the image
positions after language layer 0, outside the layer module; image noise goes on the patch
embedding [patch, hidden], upstream of both paths, so that the image is corrupted everywhere."""

from __future__ import annotations

from reference import At
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from families.qwen2_vl import PROMPT, SITES, VISION, build_with, text_config, tokenizer
from families.spec import Family


def build():
    vision = VISION | dict(
        num_position_embeddings=64,  # an 8x8 learned grid, resampled to each image's grid
        deepstack_visual_indexes=[0],
    )
    text = text_config(tokenizer(), head_dim=16)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    return build_with(
        Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, vision=vision, seed=3, text=text
    )


FAMILY = Family(
    name="qwen3_vl",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.visual.patch_embed"),
    attention="model.language_model.layers.{i}.self_attn",
)

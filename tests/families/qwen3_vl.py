"""Qwen3-VL: DeepStack. Vision block 0 feeds a second merger whose output is added to the image
positions after language layer 0, outside the layer module: `block` at layer 0 is the layer's
output before that addition, `resid_pre` (the residual entering a layer, its input) at layer 1 the
residual after it. Image noise is on the main merger's output [image token, hidden], in the units
the language model reads; the DeepStack features stay clean under it."""

from __future__ import annotations

from reference import At
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from families.qwen2_vl import LAYER, PROMPT, SITES, VISION, build_with, text_config, tokenizer
from families.spec import Family

DEEPSTACK_VISION = VISION | dict(
    num_position_embeddings=64,  # an 8x8 learned grid, resampled to each image's grid
    deepstack_visual_indexes=[0],
)
DEEPSTACK_SITES = {"resid_pre": At(LAYER, side="input"), **SITES}


def interleaved_text(**extra) -> dict:
    text = text_config(tokenizer(), head_dim=16, **extra)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    return text


def build():
    return build_with(
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        vision=DEEPSTACK_VISION,
        seed=3,
        text=interleaved_text(),
    )


FAMILY = Family(
    name="qwen3_vl",
    build=build,
    prompt=PROMPT,
    sites=DEEPSTACK_SITES,
    image=At("model.visual.merger"),
    attention=LAYER + ".self_attn",
)

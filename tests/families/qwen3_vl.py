"""Qwen3-VL: DeepStack. Vision block 0 feeds a second merger whose output is added to the image
positions after language layer 0, outside the layer module; image noise goes on the patch
embedding [patch, hidden], upstream of both paths, so that the image is corrupted everywhere."""

from __future__ import annotations

from reference import At
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from families.qwen2_vl import PROMPT, SITES, build_model, processor, text_config, token_ids, tokenizer
from families.spec import Family


def build():
    words = tokenizer()
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        num_position_embeddings=64,  # an 8x8 learned grid, resampled to each image's grid
        deepstack_visual_indexes=[0],
    )
    text = text_config(words, head_dim=16)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids(words)
    )
    return build_model(Qwen3VLForConditionalGeneration, config, seed=3), processor(Qwen3VLProcessor, words)


FAMILY = Family(
    name="qwen3_vl",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.visual.patch_embed"),
    attention="model.language_model.layers.{i}.self_attn",
)

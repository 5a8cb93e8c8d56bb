"""Qwen2.5-VL: Qwen2-VL's language side and inputs; a vision tower with windowed attention
(4 windows of 2x2 merged tokens here, block 1 full attention) and an RMSNorm/SwiGLU merger."""

from __future__ import annotations

from reference import At
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

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
        window_size=16,  # 16 px = 2x2 merged tokens of 2x2 patches of 4 px
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config(words), vision_config=vision, tie_word_embeddings=False, **token_ids(words)
    )
    return build_model(Qwen2_5_VLForConditionalGeneration, config, seed=2), processor(
        Qwen2_5_VLProcessor, words
    )


FAMILY = Family(
    name="qwen2_5_vl",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.visual.merger"),
    attention="model.language_model.layers.{i}.self_attn",
)

"""Qwen2.5-VL: Qwen2-VL's language side and inputs; a vision tower with windowed attention
(4 windows of 2x2 merged tokens here, block 1 full attention) and an RMSNorm/SwiGLU merger."""

from __future__ import annotations

from reference import At
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from families.qwen2_vl import PROMPT, SITES, VISION, build_with
from families.spec import Family


def build():
    vision = VISION | dict(
        window_size=16,  # 16 px = 2x2 merged tokens of 2x2 patches of 4 px
        fullatt_block_indexes=[1],
    )
    return build_with(
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision=vision, seed=2
    )


FAMILY = Family(
    name="qwen2_5_vl",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.visual.merger"),
    attention="model.language_model.layers.{i}.self_attn",
)

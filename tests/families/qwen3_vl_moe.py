"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B): Qwen3-VL with sparse mixture-of-experts MLPs. Layer 0 routes each
token to 2 of 4 experts, layer 1 is a dense MLP (`mlp_only_layers`), so the MLP site is checked on
both kinds; the MoE block returns [row, position, hidden] like a dense one."""

from __future__ import annotations

from dataclasses import replace

from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor

from families.qwen2_vl import build_with
from families.qwen3_vl import DEEPSTACK_VISION, interleaved_text
from families.qwen3_vl import FAMILY as QWEN3_VL


def build():
    text = interleaved_text(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )
    return build_with(
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,  # Qwen3-VL-MoE checkpoints ship Qwen3-VL's processor
        vision=DEEPSTACK_VISION,
        seed=3,
        text=text,
    )


FAMILY = replace(QWEN3_VL, name="qwen3_vl_moe", build=build)

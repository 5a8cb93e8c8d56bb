"""PaliGemma 2: SigLIP tower, linear projector, Gemma 2 decoder as a prefix LM.

Image and prompt attend to each other in both directions (`token_type_ids` 0), so a patch at
a late prompt position changes earlier ones. Gemma 2 alternates sliding-window (layer 0,
window 8, shorter than the prompt) and full layers and soft-caps attention and final logits.
The model numbers positions from 1; the reference lets it (no position ids are passed here).
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    Gemma2Config,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from families.spec import Family
from vlmtrace.models.build import word_tokenizer

WORDS = "which city did this shape represent in year 2006 ? the circle paris rome".split()
LAYER = "model.language_model.layers.{i}"


def build(seed: int = 7):
    tokens = word_tokenizer(WORDS)
    image_processor = SiglipImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    image_processor.image_seq_length = 16  # as in PaliGemma's preprocessor_config.json
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokens)  # adds 1,152 tokens
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = Gemma2Config(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        max_position_embeddings=512,
        pad_token_id=tokens.pad_token_id,
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokens.image_token_id,
        vocab_size=len(tokens),
        projection_dim=64,
        hidden_size=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    return model, processor


FAMILY = Family(
    name="paligemma",
    build=build,
    prompt="<image> which city did this shape represent in year 2006 ?",
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "mlp": At(LAYER + ".mlp"),
        "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
    },
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
)

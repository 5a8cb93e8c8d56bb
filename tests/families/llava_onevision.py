"""LLaVA-OneVision: SigLIP tower, any-resolution tiles, Qwen2 decoder.

A 64x32 image gives a base view plus two tiles per row (the projector returns [tile, patch,
hidden] for the batch); the 32x64 image pair gives a base view plus two tiles of the other
orientation, whose unpadded features and newlines make another number of image tokens.
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from families.spec import Family
from vlmtrace.models.build import IMAGE_TOKEN, word_tokenizer

WORDS = "which city did this shape represent in year 2006 ? the circle paris rome".split()
LAYER = "model.language_model.layers.{i}"
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def build(seed: int = 5):
    tokens = word_tokenizer(WORDS)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = Qwen2Config(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokens.pad_token_id,
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokens.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return model, processor(image_processor, tokens)


def processor(image_processor, tokens) -> LlavaOnevisionProcessor:
    """The real processor class, built without its video processor.

    Its constructor insists on one, every video processor needs torchvision (not installable
    beside torch 2.13), and without torchvision transformers 5.24 fails inside the argument class
    check (`VIDEO_PROCESSOR_MAPPING._extra_content`). Only that check is skipped, for the absent
    video processor; images never reach it.
    """
    made = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    check = made.check_argument_for_proper_class
    made.check_argument_for_proper_class = lambda name, value: None if value is None else check(name, value)
    LlavaOnevisionProcessor.__init__(
        made,
        image_processor=image_processor,
        tokenizer=tokens,
        video_processor=None,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
    )
    del made.check_argument_for_proper_class
    return made


FAMILY = Family(
    name="llava_onevision",
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
    image_size=(64, 32),
    pair_size=(32, 64),
)

"""Qwen2-VL: M-RoPE positions made by the model, flat patches, merger output [image token, hidden].

The tiny tokenizer, processor and configs below also build Qwen2.5-VL and Qwen3-VL
(`qwen2_5_vl.py`, `qwen3_vl.py`). A 32x32 image with 4-pixel patches gives grid (1, 8, 8): 64
patches, merged 2x2 into 16 image tokens.
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from families.spec import Family
from vlmtrace.models.build import word_tokenizer

WORDS = "which city did this shape represent in year 2006 ? the circle paris rome user assistant".split()
SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LAYER = "model.language_model.layers.{i}"
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "which city did this shape represent in year 2006 ?<|im_end|>\n<|im_start|>assistant\n"
)
CHAT_TEMPLATE = (  # Qwen2-VL's, without the default system turn (its words are not in the vocabulary)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer():
    tokenizer = word_tokenizer(WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.image_token = "<|image_pad|>"
    return tokenizer


def processor(cls, tokenizer, patch_size: int = 4, mean=None):
    """The family's real processor class, built without a video processor.

    Its constructor insists on one, and every Qwen video processor needs torchvision, which does
    not install beside torch 2.13 (transformers 5.24 then fails inside its argument class check,
    `VIDEO_PROCESSOR_MAPPING._extra_content`). Only that one check is skipped; images never reach
    the video processor.
    """
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=16 * patch_size**2,
        max_pixels=64 * patch_size**2,
        **({} if mean is None else {"image_mean": mean, "image_std": mean}),
    )
    made = cls.__new__(cls)
    check = made.check_argument_for_proper_class
    made.check_argument_for_proper_class = lambda name, value: None if value is None else check(name, value)
    cls.__init__(made, image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    del made.check_argument_for_proper_class
    made.chat_template = CHAT_TEMPLATE
    return made


def token_ids(tokenizer) -> dict:
    ids = dict(zip(SPECIAL, tokenizer.convert_tokens_to_ids(SPECIAL), strict=True))
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def text_config(tokenizer, **extra) -> dict:
    """2 layers, hidden 64, 4 heads of 16 (M-RoPE sections 2+3+3 = 16 / 2), 2 key/value heads."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_model(model_class, config, seed: int):
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_class(config).eval()


def build():
    words = tokenizer()
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, mlp_ratio=2)
    config = Qwen2VLConfig(
        text_config=text_config(words), vision_config=vision, tie_word_embeddings=False, **token_ids(words)
    )
    return build_model(Qwen2VLForConditionalGeneration, config, seed=0), processor(Qwen2VLProcessor, words)


SITES = {
    "block": At(LAYER),
    "attn": At(LAYER + ".self_attn", index=0),
    "mlp": At(LAYER + ".mlp"),
    "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
}

FAMILY = Family(
    name="qwen2_vl",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.visual.merger"),
    attention=LAYER + ".self_attn",
)

"""Qwen2-VL: M-RoPE positions made by the model, flat patches, merger output [image token, hidden].

The tiny tokenizer, processor and configs below also build Qwen2.5-VL and Qwen3-VL
(`qwen2_5_vl.py`, `qwen3_vl.py`). A 32x32 image with 4-pixel patches gives grid (1, 8, 8): 64
patches, merged 2x2 into 16 image tokens.
"""

from __future__ import annotations

from reference import At
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from families.spec import (
    QUESTION,
    WORDS,
    Family,
    decoder_sites,
    tiny_model,
    tiny_text,
    without_video_processor,
)
from vlmtrace.models.build import word_tokenizer

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
    f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
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
    tokenizer = word_tokenizer([*WORDS, "user", "assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.image_token = "<|image_pad|>"
    return tokenizer


def processor(cls, tokenizer, patch_size: int = 4, mean=None):
    """The family's real processor class (`without_video_processor`) with the chat template."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=16 * patch_size**2,
        max_pixels=64 * patch_size**2,
        **({} if mean is None else {"image_mean": mean, "image_std": mean}),
    )
    made = without_video_processor(cls, image_processor=image_processor, tokenizer=tokenizer)
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
    return tiny_text(
        tokenizer,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **extra,
    )


VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4)
"""The Qwen2.5-VL and Qwen3-VL towers' sizes (Qwen2-VL's tower names them otherwise)."""


def build_with(config_class, model_class, processor_class, *, vision: dict, seed: int, text=None):
    """One of the three families from its classes: this tokenizer, processor and decoder sizes."""
    words = tokenizer()
    config = config_class(
        text_config=text or text_config(words),
        vision_config=vision,
        tie_word_embeddings=False,
        **token_ids(words),
    )
    return tiny_model(model_class, config, seed), processor(processor_class, words)


def build():
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, mlp_ratio=2)
    return build_with(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision=vision, seed=0)


SITES = decoder_sites(LAYER)

FAMILY = Family(
    name="qwen2_vl",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.visual.merger"),
    attention=LAYER + ".self_attn",
)

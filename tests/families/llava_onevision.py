"""LLaVA-OneVision: SigLIP tower, any-resolution tiles, Qwen2 decoder.

A 64x32 image gives a base view plus two tiles per row (the projector returns [tile, patch,
hidden] for the batch); the 32x64 image pair gives a base view plus two tiles of the other
orientation, whose unpadded features and newlines make another number of image tokens.
"""

from __future__ import annotations

from reference import At
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from families.spec import (
    QUESTION,
    WORDS,
    Family,
    decoder_sites,
    tiny_model,
    tiny_text,
    tiny_vision,
    without_video_processor,
)
from vlmtrace.models.build import IMAGE_TOKEN, word_tokenizer

LAYER = "model.language_model.layers.{i}"
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def build(seed: int = 5):
    tokens = word_tokenizer(WORDS)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**tiny_vision()),
        text_config=Qwen2Config(**tiny_text(tokens)),
        image_token_index=tokens.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = tiny_model(LlavaOnevisionForConditionalGeneration, config, seed)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = without_video_processor(
        LlavaOnevisionProcessor,
        image_processor=image_processor,
        tokenizer=tokens,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
    )
    return model, processor


FAMILY = Family(
    name="llava_onevision",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    image_size=(64, 32),
    pair_size=(32, 64),
)

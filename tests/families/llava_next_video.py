"""LLaVA-NeXT-Video on images: LLaVA-NeXT's tiles (a 64x32 image: a base view and two tiles per row,
the projector's output [tile, patch, hidden] over the batch); the video half is never run. Its
processor is built without a video processor (`without_video_processor`: torchvision is missing)."""

from __future__ import annotations

from reference import At
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessorPil,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
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
from vlmtrace.models.build import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, word_tokenizer

LAYER = "model.language_model.layers.{i}"
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def build():
    words = word_tokenizer([*WORDS, "<video>"])
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**tiny_vision()),
        text_config=LlamaConfig(**tiny_text(words), tie_word_embeddings=False),
        image_token_index=words.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=words.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = without_video_processor(
        LlavaNextVideoProcessor,
        image_processor=image_processor,
        tokenizer=words,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        video_token="<video>",
    )
    return tiny_model(LlavaNextVideoForConditionalGeneration, config, seed=4), processor


FAMILY = Family(
    name="llava_next_video",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    image_size=(64, 32),
)

"""InternVL: InternViT tower, pixel shuffle + MLP projector [tile, token, hidden], Qwen2 decoder.

`pixel_values` has no row dimension ([tile, 3, H, W], rows concatenated). A 64x32 image is
cropped into 2 tiles plus a thumbnail (12 image tokens); its 32x32 pair is 1 tile (4 tokens),
so the image pair changes the number of tiles and of image tokens.

`InternVLProcessor` takes a video processor that needs torchvision, which does not install
beside torch 2.13; passing None fails too (transformers checks its class). `ImageProcessor`
below is InternVL's own processor class with only the video processor left out: its `__call__`
and image-token expansion are inherited unchanged.
"""

from __future__ import annotations

import re

import torch
from reference import At
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.processing_utils import ProcessorMixin

from families.spec import QUESTION, WORDS, Family, decoder_sites, tiny_model, tiny_text, tiny_vision
from vlmtrace.models.build import word_tokenizer

LAYER = "model.language_model.layers.{i}"
PROMPT = f"<|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


class ImageProcessor(InternVLProcessor):
    """`InternVLProcessor` without a video processor (InternVL's `__init__`, minus videos)."""

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template=None):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token, self.image_token_id = (
            tokenizer.context_image_token,
            tokenizer.context_image_token_id,
        )
        self.video_token = tokenizer.video_token
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


def tokenizer():
    words = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(["user", "assistant", *WORDS])._tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    words.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return words


def build():
    words = tokenizer()
    vision = InternVLVisionConfig(
        **tiny_vision(num_attention_heads=4, image_size=[32, 32], patch_size=[8, 8])
    )
    text = Qwen2Config(**tiny_text(words, max_position_embeddings=256, tie_word_embeddings=False))
    config = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=words.context_image_token_id,
        image_seq_length=4,  # (32 / 8)^2 patches, pixel-shuffled by 0.5 -> 4 tokens per tile
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    model = tiny_model(InternVLForConditionalGeneration, config, seed=0)
    images = GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=4, size={"height": 32, "width": 32}
    )
    return model, ImageProcessor(images, words, image_seq_length=4)


FAMILY = Family(
    name="internvl",
    build=build,
    prompt=PROMPT,
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    image_size=(64, 32),
    pair_size=(32, 32),
)

torch.set_num_threads(1)

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

from families.spec import Family
from vlmtrace.models.build import word_tokenizer

WORDS = "user assistant which city did this shape represent in year 2006 ? the circle paris rome".split()
LAYER = "model.language_model.layers.{i}"
PROMPT = (
    "<|im_start|>user\n<IMG_CONTEXT>\nwhich city did this shape represent in year 2006 ?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


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
        tokenizer_object=word_tokenizer(WORDS)._tokenizer,
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
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=[32, 32],
        patch_size=[8, 8],
    )
    text = Qwen2Config(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=words.pad_token_id,
        tie_word_embeddings=False,
    )
    config = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=words.context_image_token_id,
        image_seq_length=4,  # (32 / 8)^2 patches, pixel-shuffled by 0.5 -> 4 tokens per tile
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    images = GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=4, size={"height": 32, "width": 32}
    )
    return model, ImageProcessor(images, words, image_seq_length=4)


FAMILY = Family(
    name="internvl",
    build=build,
    prompt=PROMPT,
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "mlp": At(LAYER + ".mlp"),
        "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
    },
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    image_size=(64, 32),
    pair_size=(32, 32),
)

torch.set_num_threads(1)

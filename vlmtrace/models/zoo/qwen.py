"""The Qwen2-VL organism's architecture: a tiny `Qwen2VLForConditionalGeneration` and its processor.

Modern VLMs differ from LLaVA-1.5 in how the image enters: Qwen2-VL cuts it into 4-pixel
patches (two frames of each, `temporal_patch_size=2`), flattens them into one row per patch
with no batch dimension, merges 2x2 neighbours after the vision tower, and gives the language
model 3-D positions (M-RoPE: time, height, width) computed from `image_grid_thw`. The organism
keeps all of that and the sizes of `shapes-llava`: a 32x32 image is a (1, 8, 8) grid of 64
patches, merged into 16 image tokens, one per cell of the scene grid (`vlmtrace.data.drawing`),
read by a 6-layer Qwen2 decoder with d=64 and 4 heads. The vision tower is 2 layers of d=32:
it reads four times as many patches as LLaVA's, so half the width keeps a training step's cost
near LLaVA's.

    model, processor = build_qwen2_vl(word_tokenizer(VOCABULARY), layers=6, seed=0)
    inputs = processor(text=["<image> what colour is the cross shape ?"], images=[picture])
    flat_patches(pixels)   # [question * 64, 96]: what the processor makes of normalised pixels

The prompt is the organisms' own ("<image> question", no Qwen chat markup, whose words the
organism does not know); `<image>` is the processor's image token and expands to 16 copies.
The processor has no video processor (they all need torchvision): see `vlmtrace.models.processor`.
"""

from __future__ import annotations

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from vlmtrace.models.build import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, random_model
from vlmtrace.models.processor import image_only

PATCH = 4  # pixels per patch side: a 32x32 image is 8x8 patches
TEMPORAL_PATCH = 2  # a still image is repeated into two frames, as Qwen2-VL does
MERGE = 2  # 2x2 patches -> one image token (8 pixels: one scene cell)


def build_qwen2_vl(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 32,
    vision_layers: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 6,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A Qwen2-VL (vision tower with patch merger, Qwen2 decoder with M-RoPE), random weights from `seed`."""
    head_dim = hidden // heads
    if head_dim % 2 or head_dim // 2 < 3:
        raise ValueError(f"hidden / heads = {head_dim}: M-RoPE needs an even head size of at least 6")
    half = head_dim // 2  # rotary frequencies, split over (time, height, width) like Qwen's 16/24/24
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unused = tokenizer.unk_token_id  # the organism's prompts carry no video or vision markers
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        depth=vision_layers,
        embed_dim=vision_hidden,  # half LLaVA's: Qwen's tower reads 4x as many (smaller) patches
        hidden_size=hidden,  # the merger's output: the decoder's width
        num_heads=vision_heads,
        mlp_ratio=2,
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=MERGE,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token,
        video_token_id=unused,
        vision_start_token_id=unused,
        vision_end_token_id=unused,
        tie_word_embeddings=False,
    )
    model = random_model(
        Qwen2VLForConditionalGeneration, config, seed=seed, attn_implementation=attn_implementation
    )
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        min_pixels=pixels,  # never resized: the scene grid stays aligned with the patches
        max_pixels=pixels,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = image_only(Qwen2VLProcessor, image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def flat_patches(pixels: torch.Tensor) -> torch.Tensor:
    """[image * patches, channel * frame * PATCH * PATCH] from [image, channel, height, width]
    normalised pixels: `Qwen2VLImageProcessor`'s layout (patches of a 2x2 merge group together)."""
    images, channels, height, width = pixels.shape
    h, w = height // PATCH, width // PATCH
    frames = pixels[:, None].expand(images, TEMPORAL_PATCH, channels, height, width)
    grid = frames.reshape(
        images, TEMPORAL_PATCH, channels, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH
    )
    grid = grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return grid.reshape(images * h * w, channels * TEMPORAL_PATCH * PATCH * PATCH)


def grid_thw(images: int, image_size: int = 32) -> torch.Tensor:
    """[image, 3] (time, height, width) patch grid of each image, as the processor returns it."""
    side = image_size // PATCH
    return torch.tensor([[1, side, side]], dtype=torch.long).expand(images, 3).clone()

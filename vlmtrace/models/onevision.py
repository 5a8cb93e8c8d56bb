"""LLaVA-OneVision: LLaVA-NeXT's any-resolution tiles over a SigLIP tower and a Qwen2 decoder.

The processor returns `pixel_values` [tile, 3, H, W] per image (a base view plus the tiles of
the best grid, zero-padded across rows) with `image_sizes` and `batch_num_images` (images per
row: one image per row is tiled, several are not). The projector returns [tile, patch, hidden]
over the whole batch, each row owning its image's tiles (`image_tiles`, as LLaVA-NeXT); the
model then unpads the tiles and appends a learned newline after each row of patches, which
image noise (on the projector) does not touch.

    vlm = vt.load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
"""

from __future__ import annotations

from .adapter import IDS, MASK, ROW, ROW_PADDED, Adapter, Hook
from .llava import LANGUAGE_MODEL, encode, forward, tiles

ONEVISION = Adapter(
    family="llava_onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    stacks={"lm": LANGUAGE_MODEL},
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector", layout="image_tiles"),
    },
    inputs={
        "input_ids": IDS,
        "attention_mask": MASK,
        "pixel_values": ROW_PADDED,
        "image_sizes": ROW,
        "batch_num_images": ROW,
    },
    image_units=tiles,
    keeps_last_logits=True,
    image_in_sequence=True,
    encode=encode,
    forward=forward,
    image_token_config="image_token_id",
    image_encoder=Hook("model.vision_tower", layout="image_tiles"),
    prompt_template="<|im_start|>user {image}\n{question}<|im_end|><|im_start|>assistant\n",
)

ADAPTERS = (ONEVISION,)

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

from dataclasses import replace

from .adapter import ROW
from .llava import LLAVA_NEXT

ONEVISION = replace(
    LLAVA_NEXT,  # its paths, tiles and image encoder; one more per-row input
    family="llava_onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    inputs={**LLAVA_NEXT.inputs, "batch_num_images": ROW},
    language_model=None,
    image_grid=None,  # anyres_max packing (features interpolated past a budget) is not declared yet
    prompt_template="<|im_start|>user {image}\n{question}<|im_end|><|im_start|>assistant\n",
)

ADAPTERS = (ONEVISION,)

"""LLaVA-NeXT-Video, traced on images: LLaVA-NeXT's any-resolution tiles, and a video path unused.

With an image, the model computes exactly what LLaVA-NeXT computes: the vision tower on the base
view and tiles, the projector to [tile, patch, hidden] (each row owning its image's tiles), the
features unpadded and placed at the `<image>` tokens. Its video half (a pooling resampler before
the same projector, `<video>` tokens) runs only on `pixel_values_videos`, which vlmtrace never
passes. So the adapter is LLaVA-NeXT's, renamed; videos are not supported.

Its processor holds a video processor, which needs torchvision: vlmtrace loads it image-only
where torchvision is missing (`vlmtrace.models.processor`).

    vlm = vt.load("llava-hf/LLaVA-NeXT-Video-7B-hf")
"""

from __future__ import annotations

from dataclasses import replace

from .llava import LLAVA_NEXT

LLAVA_NEXT_VIDEO = replace(
    LLAVA_NEXT,
    family="llava_next_video",
    architectures=("LlavaNextVideoForConditionalGeneration",),
    prompt_template="USER: {image}\n{question} ASSISTANT:",  # the model card's chat markup
    notes="images only: the video path (resampler, <video> tokens) is never run",
)

ADAPTERS = (LLAVA_NEXT_VIDEO,)

"""VipLlava: LLaVA-1.5 with its projector reading several CLIP layers at once.

The vision tower's hidden states of several layers (`vision_feature_layers`) are concatenated per
patch and projected to the language model's width; everything the engine touches is LLaVA's: the
projector's output is [row, patch, hidden], the image tokens sit in the prompt, one per patch, and
the decoder is a Llama under `model.language_model`. So the adapter is LLaVA's, renamed.

    vlm = vt.load("llava-hf/vip-llava-7b-hf")
"""

from __future__ import annotations

from dataclasses import replace

from .llava import LLAVA

VIPLLAVA = replace(
    LLAVA,
    family="vipllava",
    architectures=("VipLlavaForConditionalGeneration",),
    prompt_template=(  # the llava-hf/vip-llava-7b-hf model card's
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions.###Human: "
        "{image}\n{question}###Assistant:"
    ),
)

ADAPTERS = (VIPLLAVA,)

"""SmolVLM: Idefics3's architecture under its own classes (sub-images, connector, Llama decoder).

`SmolVLMProcessor` cannot be built here: its video processor is a required argument and needs
torchvision, which does not install beside torch 2.13. For images it writes exactly what
`Idefics3Processor` writes (both expand `<image>` into `<fake_token_around_image><row_i_col_j>`
+ `image_seq_len` x `<image>` per sub-image, then the `<global-img>` view), so the test pairs
SmolVLM's real image processor with `Idefics3Processor`.
"""

from __future__ import annotations

import torch
from transformers import (
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

from families import idefics3
from families.spec import Family


def build():
    return idefics3.build_with(
        SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    )


FAMILY = Family(
    name="smolvlm",
    build=build,
    prompt=idefics3.PROMPT,
    sites=idefics3.SITES,
    image=idefics3.FAMILY.image,
    attention=idefics3.FAMILY.attention,
    pair_size=(64, 32),
)

torch.set_num_threads(1)

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
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

from families import idefics3
from families.spec import Family


def build():
    words = idefics3.tokenizer()
    parts = idefics3.configs(words)
    config = SmolVLMConfig(
        **{**parts, "vision_config": SmolVLMVisionConfig(**parts["vision_config"]).to_dict()}
    )
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    model = SmolVLMForConditionalGeneration(config).eval()
    images = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=words, image_seq_len=4)
    return model, processor


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

"""Mistral3 (Pixtral vision): one flat patch sequence for all images, a patch merger, Mistral.

The Pixtral tower encodes every image of the batch as one sequence [1, patch, hidden] (block-
diagonal attention), the projector's patch merger folds 2x2 patches into one token, and its
output is [image token, hidden] for the whole batch: each row owns its image's tokens
(`image_tokens`). The processor writes [IMG] per merged patch, [IMG_BREAK] after each row of
them and [IMG_END] last; image features land on the [IMG] tokens only.
"""

from __future__ import annotations

import importlib
import sys

import torch
from reference import At
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
)

from families.spec import Family
from vlmtrace.models.build import word_tokenizer

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
WORDS = "which city did this shape represent in year 2006 ? the circle paris rome".split()
LAYER = "model.language_model.layers.{i}"


def pixtral_processor_class() -> type:
    """The real `PixtralProcessor`, imported without torchvision.

    Its module imports one helper, `get_resize_output_image_size` (used only to count tokens for
    serving engines), from the torchvision image processor, which cannot be imported here
    (torchvision does not install beside torch 2.13). The PIL image processor's module defines the
    same helper; it stands in for that one import and is removed again afterwards.
    """
    torchvision_module = "transformers.models.pixtral.image_processing_pixtral"
    pil_module = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    absent = torchvision_module not in sys.modules
    sys.modules.setdefault(torchvision_module, pil_module)
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if absent:
            del sys.modules[torchvision_module]


def build(seed: int = 6):
    tokens = word_tokenizer([*IMAGE_TOKENS, *WORDS])
    tokens.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS}, replace_extra_special_tokens=False)
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        image_size=32,
        patch_size=8,
    )
    text = MistralConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokens.pad_token_id,
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokens.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": 32},
        patch_size=8,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = pixtral_processor_class()(
        image_processor=image_processor, tokenizer=tokens, patch_size=8, spatial_merge_size=2
    )
    return model, processor


FAMILY = Family(
    name="mistral3",
    build=build,
    prompt="[IMG] which city did this shape represent in year 2006 ?",
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "mlp": At(LAYER + ".mlp"),
        "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
    },
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
)

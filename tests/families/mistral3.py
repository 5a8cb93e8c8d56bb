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

from reference import At
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
)

from families.spec import QUESTION, WORDS, Family, decoder_sites, tiny_model, tiny_text, tiny_vision
from vlmtrace.models.build import word_tokenizer

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
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
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**tiny_vision(head_dim=16)),
        text_config=MistralConfig(**tiny_text(tokens, head_dim=16)),
        image_token_index=tokens.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    model = tiny_model(Mistral3ForConditionalGeneration, config, seed)
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
    prompt=f"[IMG] {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    pair_size=(64, 32),  # another aspect ratio: 2x1 image tokens and one [IMG_BREAK] fewer
)

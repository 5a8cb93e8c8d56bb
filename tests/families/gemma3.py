"""Gemma 3: SigLIP tower, pooled projector, per-token token_type_ids, sliding and full layers.

Layer 0 slides (window 12, shorter than the prompt: the last token cannot see the image
there), layer 1 attends fully. Pan-and-scan is on: the square image stays one entry, the 64x32
image pair becomes the image plus two crops, so rows own unequal numbers of projector entries.
The projector's weight initialises to zero (the image would have no effect): drawn here.
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from families.spec import QUESTION, WORDS, Family, decoder_sites, tiny_model, tiny_text, tiny_vision
from vlmtrace.models.build import word_tokenizer

SPECIAL = {
    "boi_token": "<start_of_image>",
    "image_token": "<image_soft_token>",
    "eoi_token": "<end_of_image>",
}
PAN_AND_SCAN = "Here here is original image and are some crops to help you see better".split()
LAYER = "model.language_model.layers.{i}"


def tokenizer() -> PreTrainedTokenizerFast:
    """The word tokenizer with Gemma 3's image tokens as named special tokens."""
    words = word_tokenizer([*SPECIAL.values(), "<start_of_turn>", "<end_of_turn>", *WORDS, *PAN_AND_SCAN])
    named = PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=SPECIAL,
        padding_side="left",
    )
    named.add_special_tokens({"additional_special_tokens": list(SPECIAL.values())})
    return named


def build(seed: int = 2):
    tokens = tokenizer()
    vision = SiglipVisionConfig(**tiny_vision(patch_size=4))
    text = Gemma3TextConfig(
        **tiny_text(
            tokens,
            head_dim=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=12,
        )
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=16,  # 8x8 patches pooled 2x2
        boi_token_index=tokens.boi_token_id,
        eoi_token_index=tokens.convert_tokens_to_ids(SPECIAL["eoi_token"]),
        image_token_index=tokens.image_token_id,
    )
    model = tiny_model(Gemma3ForConditionalGeneration, config, seed)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokens, image_seq_length=16)
    # Pan-and-scan is a call option of the processor (off by default); its instance defaults
    # turn it on for every call, which is how a vlmtrace user enables it.
    processor.images_kwargs = {
        **Gemma3Processor.images_kwargs,
        "do_pan_and_scan": True,
        "pan_and_scan_min_crop_size": 16,
    }
    return model, processor


FAMILY = Family(
    name="gemma3",
    build=build,
    prompt=f"<start_of_image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    pair_size=(64, 32),
)

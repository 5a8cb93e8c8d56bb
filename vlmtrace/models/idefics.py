"""Idefics3 and SmolVLM adapters: LLaVA-like early fusion over sub-images of a split image.

Both processors split an image into sub-images of the vision tower's size (rows x columns)
and add a downscaled global view, so one image is `n` sub-images and `pixel_values` is
[row, sub-image, 3, H, W], rows zero-padded to the same count (`pixel_attention_mask` alike).
The model drops the all-zero padding sub-images, encodes the rest and pixel-shuffles each into
`image_seq_len` tokens: the connector returns [sub-image, token, hidden] over the whole batch,
each row owning as many sub-images as its processor returned (`image_units`, layout
`image_tiles`). Indexing that as [row, ...] would noise another row's sub-images.

Text layers sit at `model.text_model.layers` (a Llama decoder); otherwise sites are LLaVA's.
SmolVLM is the same architecture under another class name (its processor also takes videos).
"""

from __future__ import annotations

from dataclasses import replace

from .adapter import IDS, MASK, ROW_PADDED, Adapter, Hook
from .llava import LANGUAGE_MODEL, encode, forward

TEXT_MODEL = replace(LANGUAGE_MODEL, layers="model.text_model.layers")
"""LLaVA's decoder layers, under `model.text_model`."""

INPUTS = {
    "input_ids": IDS,
    "attention_mask": MASK,
    "pixel_values": ROW_PADDED,  # [sub-image, 3, H, W] per row; padding sub-images are all zero
    "pixel_attention_mask": ROW_PADDED,  # [sub-image, H, W] per row, padded alike
}


def sub_images(row: dict) -> int:
    """Sub-images (split views + global view) of one row's image, as its processor returned them."""
    return int(row["pixel_values"].shape[0])


def _adapter(family: str, architecture: str, prompt: str) -> Adapter:
    return Adapter(
        family=family,
        architectures=(architecture,),
        stacks={"lm": TEXT_MODEL},
        embeddings={
            "tokens": Hook("model.text_model.embed_tokens"),
            "image": Hook("model.connector", layout="image_tiles"),
        },
        inputs=INPUTS,
        image_units=sub_images,
        keeps_last_logits=True,
        image_in_sequence=True,
        encode=encode,
        forward=forward,
        image_token_config="image_token_id",
        image_encoder=Hook("model.vision_model", layout="image_tiles"),
        prompt_template=prompt,
    )


IDEFICS3 = _adapter(
    "idefics3",
    "Idefics3ForConditionalGeneration",
    "User:{image}{question}<end_of_utterance>\nAssistant:",  # HuggingFaceM4/Idefics3-8B-Llama3
)
SMOLVLM = _adapter(
    "smolvlm",
    "SmolVLMForConditionalGeneration",
    "<|im_start|>User:{image}{question}<end_of_utterance>\nAssistant:",  # HuggingFaceTB/SmolVLM-*
)

ADAPTERS = (IDEFICS3, SMOLVLM)

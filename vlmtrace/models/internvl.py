"""InternVL adapter: early fusion over dynamic-resolution tiles given as one flat pixel batch.

The processor crops an image into tiles of the vision tower's size (plus a thumbnail when there
is more than one) and returns `pixel_values` as [tile, 3, H, W] with *no* row dimension: rows
of a batch are concatenated (`FLAT`), and the tiles of a row are known only from its own
`pixel_values`. The tower encodes every tile, a pixel shuffle and the projector turn each into
`image_seq_length` tokens, so `model.multi_modal_projector` returns [tile, token, hidden] over the
whole batch, each row owning its own tiles (`image_units`, layout `image_tiles`). Each tile's
tokens replace `<IMG_CONTEXT>` placeholders, which the processor writes between `<img>` and
`</img>`.

Text layers sit at `model.language_model.layers` (Qwen2 in the InternVL3 checkpoints).
"""

from __future__ import annotations

from typing import Any

from ..engine.positions import MissingImageTokenError
from .adapter import FLAT, IDS, MASK, Adapter, Hook
from .llava import LANGUAGE_MODEL, forward

INPUTS = {"input_ids": IDS, "attention_mask": MASK, "pixel_values": FLAT}


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row of inputs: token inputs lose the batch dim; `pixel_values` (one entry per tile) stays whole."""
    if processor.image_token not in prompt:
        raise MissingImageTokenError(
            f"the prompt {prompt!r} has no {processor.image_token!r}; InternVL reads the image only where "
            f"the prompt says. Put the processor's image placeholder ({processor.image_token!r}) in it."
        )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    return {name: value if INPUTS.get(name) is FLAT else value[0] for name, value in inputs.items()}


def tiles(row: dict) -> int:
    """Tiles of one row's image (crops plus thumbnail), as its processor returned them."""
    return int(row["pixel_values"].shape[0])


INTERNVL = Adapter(
    family="internvl",
    architectures=("InternVLForConditionalGeneration",),
    stacks={"lm": LANGUAGE_MODEL},  # LLaVA's paths: model.language_model.layers[i]
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector", layout="image_tiles"),
    },
    inputs=INPUTS,
    image_units=tiles,
    keeps_last_logits=True,
    image_in_sequence=True,
    encode=encode,
    forward=forward,
    image_token_config="image_token_id",
    image_encoder=Hook("model.vision_tower", layout="image_tiles"),
    prompt_template="<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n",
)

ADAPTERS = (INTERNVL,)

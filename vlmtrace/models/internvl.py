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

from dataclasses import replace
from typing import Any

from ..engine.positions import MissingImageTokenError
from .adapter import FLAT, IDS, MASK
from .llava import LLAVA_NEXT

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


INTERNVL = replace(
    LLAVA_NEXT,  # LLaVA's paths (model.language_model.layers[i]) and tiles, flat pixels
    family="internvl",
    architectures=("InternVLForConditionalGeneration",),
    inputs=INPUTS,
    encode=encode,
    language_model=None,
    prompt_template="<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n",
)

ADAPTERS = (INTERNVL,)

"""Mistral3 (Mistral Small 3.x, Pixtral vision): flat image tokens from a patch merger.

The Pixtral tower encodes all images of the batch as one sequence of patches [1, patch,
hidden], and the projector's patch merger folds each 2x2 block of patches into one token:
its output is [image token, hidden] over the whole batch, each row owning its image's tokens
in row order (`image_tokens`; a row's count is its number of `[IMG]` tokens, the engine's
default). The processor writes `[IMG]` per merged patch, `[IMG_BREAK]` after each row of
patches and `[IMG_END]` last; features land on `[IMG]` only. An image of another aspect ratio
has other numbers of both: the breaks are processor markup, paired by content
(`vlmtrace.engine.alignment`), and its `pixel_values` [3, H, W] are zero-padded at the bottom
and right to the largest row; `image_sizes` (one per row) tell the tower which part is the image.

The tower's output is one sequence for the batch, not one entry per row, so it is not declared
as the image encoder: prefix reuse recomputes it.

    vlm = vt.load("mistralai/Mistral-Small-3.1-24B-Instruct-2503")
"""

from __future__ import annotations

from dataclasses import replace

from .adapter import LLAVA_INPUTS, ROW, ROW_PADDED, Hook
from .llava import LLAVA

MISTRAL3 = replace(
    LLAVA,  # its paths, encode and forward; flat image tokens and no image encoder
    family="mistral3",
    architectures=("Mistral3ForConditionalGeneration",),
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector", layout="image_tokens"),
    },
    # an image of another aspect ratio has another [3, H, W]: padded at the bottom and right, as
    # the processor pads a batch; `image_sizes` tells the tower which part is the image
    inputs={**LLAVA_INPUTS, "pixel_values": ROW_PADDED, "image_sizes": ROW},
    image_encoder=None,
    language_model=None,
    prompt_template="[INST]{image}{question}[/INST]",
)

ADAPTERS = (MISTRAL3,)

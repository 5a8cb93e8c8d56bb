"""LLaVA-family adapters: early fusion, image tokens placed inside the prompt.

The projector's output replaces the `<image>` placeholder tokens (expanded by the processor
to one token per patch), so image tokens are ordinary positions of the language model's
sequence and every site (block, attention, MLP, heads) exists at them.

LLaVA-1.5 encodes one 336 px view per image: its projector output is [row, patch, hidden].
LLaVA-NeXT encodes a base view plus any-resolution tiles: `pixel_values` is [row, tile, 3, H, W]
(tiles zero-padded across rows), and the projector returns [tile, patch, hidden] over the whole
batch, each row owning as many tiles as its image has (`image_units`).

Module paths are those of transformers 5.x (`model.model.language_model.layers[i]`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine.positions import MissingImageTokenError
from .adapter import IDS, LLAVA_INPUTS, MASK, ROTARY_SCORES, ROW, ROW_PADDED, Adapter, Hook, Stack
from .image_grid import ImageGrid


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row of inputs; the processor expands `<image>` into the right number of tokens."""
    placeholder = getattr(processor, "image_token", "<image>")
    if placeholder not in prompt:
        raise MissingImageTokenError(
            f"the prompt {prompt!r} has no {placeholder!r}; LLaVA reads the image only where the "
            f"prompt says. Put the processor's image placeholder ({placeholder!r}) in the prompt."
        )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    return {name: value[0] for name, value in inputs.items()}


def forward(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Logits over the prompt; the answer is predicted at the last position.

    Without a KV cache: a sweep's forward is never continued, and the cache a model builds by
    default holds every layer's keys and values for every row, 2 x width x hidden per layer:
    on LLaVA-1.5-7B in bfloat16 that is 300 MiB a row, twice the rest of a row's peak
    (`benchmarks/chunk_memory.py`). Prefix reuse asks for its cache explicitly."""
    return model(**batch, use_cache=False).logits


LANGUAGE_MODEL_SITES = {
    "attn_head": Hook("self_attn.o_proj", "input"),
    "attn": Hook("self_attn", "output", index=0),
    "mlp": Hook("mlp"),
    "block": Hook(""),
}

LANGUAGE_MODEL = Stack(
    layers="model.language_model.layers",
    sequence="prompt",
    sites=LANGUAGE_MODEL_SITES,
    attention="self_attn",
    patterns={"self": Hook("self_attn", index=1)},
    heads_config="text_config.num_attention_heads",
    layers_config="text_config.num_hidden_layers",
    scores=ROTARY_SCORES,
)

PROMPT = "USER: {image}\n{question} ASSISTANT:"
"""LLaVA-1.5's documented prompt (llava-hf model cards)."""

LLAVA = Adapter(
    family="llava",
    architectures=("LlavaForConditionalGeneration",),
    stacks={"lm": LANGUAGE_MODEL},
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector"),
    },
    inputs=LLAVA_INPUTS,
    keeps_last_logits=True,
    image_in_sequence=True,
    encode=encode,
    forward=forward,
    image_token_config="image_token_id",
    image_encoder=Hook("model.vision_tower"),
    language_model="model.language_model",
    prompt_template=PROMPT,
    image_grid=ImageGrid(view="crop"),  # shortest edge resized, centre crop, row-major patches
)


def tiles(row: dict) -> int:
    """Tiles of one row's image: the processor returns exactly its own tiles for one image."""
    return int(row["pixel_values"].shape[0])


LLAVA_NEXT = Adapter(
    family="llava_next",
    architectures=("LlavaNextForConditionalGeneration",),
    stacks={"lm": LANGUAGE_MODEL},
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector", layout="image_tiles"),
    },
    inputs={"input_ids": IDS, "attention_mask": MASK, "pixel_values": ROW_PADDED, "image_sizes": ROW},
    image_units=tiles,
    keeps_last_logits=True,
    image_in_sequence=True,
    encode=encode,
    forward=forward,
    image_token_config="image_token_id",
    image_encoder=Hook("model.vision_tower", layout="image_tiles"),
    language_model="model.language_model",
    prompt_template="[INST] {image}\n{question} [/INST]",
    image_grid=ImageGrid(view="anyres", newline=True),  # base view, then unpadded tiles, newline per row
)

ADAPTERS = (LLAVA, LLAVA_NEXT)

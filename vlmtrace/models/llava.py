"""LLaVA-family adapter: early fusion, image tokens placed inside the prompt.

The projector's output replaces the `<image>` placeholder tokens (expanded by the processor
to one token per patch), so image tokens are ordinary positions of the language model's
sequence and every site (block, attention, MLP, heads) exists at them.

Module paths are those of transformers 5.x (`model.model.language_model.layers[i]`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..positions import MissingImageTokenError
from .adapter import Adapter, Hook, Stack, register


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
    """Logits over the prompt; the answer is predicted at the last position."""
    return model(**batch).logits


LANGUAGE_MODEL_SITES = {
    "attn_head": Hook("self_attn.o_proj", "input"),
    "attn": Hook("self_attn", "output", index=0),
    "mlp": Hook("mlp"),
    "block": Hook(""),
}

LLAVA = register(
    Adapter(
        family="llava",
        architectures=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
        stacks={
            "lm": Stack(
                layers="model.language_model.layers",
                sequence="prompt",
                sites=LANGUAGE_MODEL_SITES,
                attention="self_attn",
                patterns={"self": Hook("self_attn", index=1)},
                heads_config="text_config.num_attention_heads",
                layers_config="text_config.num_hidden_layers",
            )
        },
        embeddings={
            "tokens": Hook("model.language_model.embed_tokens"),
            "image": Hook("model.multi_modal_projector"),
        },
        keeps_last_logits=True,
        image_in_sequence=True,
        encode=encode,
        forward=forward,
        image_token_config="image_token_id",
        image_encoder="model.vision_tower",
    )
)

"""Mllama (Llama-3.2-Vision) adapter: the image reaches the text through gated cross-attention layers.

Unlike LLaVA, the image is not a run of positions in the prompt. The prompt holds one `<|image|>`
placeholder token; the vision tower's features become the keys and values of the cross-attention
layers (`MllamaCrossAttentionDecoderLayer`) that sit between ordinary self-attention layers
(`MllamaSelfAttentionDecoderLayer`, e.g. layers 3, 8, 13, ... of the 11B model). So:

- sites differ by layer: `attn` / `attn_head` exist in self-attention layers only, `cross_attn` /
  `cross_attn_head` in cross-attention layers only; `mlp` and `block` everywhere (the engine reads
  where each exists from the modules, `Shape.site_layers`, and leaves the other cells NaN);
- `cross_attention_mask` [token, image, tile] says which tokens read which image tiles: it is
  per-token, left-padded with the prompt (padding reads no image);
- the cross-attention layers' gates are tanh-gated residual additions (a model built from a config
  has them at zero, i.e. without any effect of the image);
- a self-attention knockout edits the `attention_mask` keyword each *decoder layer* receives: both
  layer kinds get it, the self-attention layer hands it to `self_attn`, the cross-attention layer
  ignores it (there is no self-attention to knock out there);
- a cross-attention knockout (text queries -> image keys) edits the mask `cross_attn` receives as
  its `attention_mask` keyword: the model turns `cross_attention_mask` [token, image, tile]
  into an additive [row, 1, token, image * tile * patch] mask and hands it to every
  cross-attention layer, whose `cross_attn` gets it beside the image's states as
  `cross_attention_states` [row, image * tile * patch, hidden] (the keys: key k is patch
  k % patches of tile k // patches). A knockout edits a copy of that mask, in the cross-attention
  layers only.

Blocking *every* key of a query does not cut the image off: the softmax of a row of equal
(-inf-like) scores is uniform, so that query reads the mean of the image's values (as the model
itself does for tokens before the image, whose mask rows it zeroes). Block some keys (a tile's,
a region's patches) to compare where the text reads from.

The processor needs the placeholder in the prompt (one per image), and it decides which tokens read
the image: those from the placeholder on. Prompts without it (a bare question, a chat template
given only text) get it in front, as the base model's card writes it:
`<|image|><|begin_of_text|>If I had to write a haiku for this one`.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import IDS, MASK, ROW, Adapter, Hook, Stack, token


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row of inputs; a prompt without the image placeholder gets it in front."""
    placeholder = processor.image_token
    if placeholder not in prompt:
        prompt = placeholder + prompt
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    return {name: value[0] for name, value in inputs.items()}


def forward(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Logits over the prompt; the answer is predicted at the last position."""
    return model(**batch, use_cache=False).logits  # see `llava.forward`


LANGUAGE_MODEL = Stack(
    layers="model.language_model.layers",
    sequence="prompt",
    sites={  # execution order within a layer; each layer has either self_attn or cross_attn
        "attn_head": Hook("self_attn.o_proj", "input"),
        "attn": Hook("self_attn", index=0),
        "cross_attn_head": Hook("cross_attn.o_proj", "input"),
        "cross_attn": Hook("cross_attn", index=0),
        "mlp": Hook("mlp"),
        "block": Hook(""),
    },
    attention="",  # the decoder layer's `attention_mask` keyword: see the module docstring
    cross_attention="cross_attn",
    cross_mask_keyword="attention_mask",
    cross_states_keyword="cross_attention_states",
    cross_sequence="image",
    patterns={"self": Hook("self_attn", index=1), "cross": Hook("cross_attn", index=1)},
    heads_config="text_config.num_attention_heads",
    layers_config="text_config.num_hidden_layers",
)

MLLAMA = Adapter(
    family="mllama",
    architectures=("MllamaForConditionalGeneration",),
    stacks={"lm": LANGUAGE_MODEL},
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        # [row, image, tile, patch, hidden]: one entry per row, padded tiles included
        "image": Hook("model.multi_modal_projector"),
    },
    inputs={
        "input_ids": IDS,
        "attention_mask": MASK,
        "cross_attention_mask": token(),  # [token, image, tile]: padding reads no image
        "pixel_values": ROW,  # [image, tile, 3, H, W], tiles zero-padded to max_image_tiles
        "aspect_ratio_ids": ROW,
        "aspect_ratio_mask": ROW,
    },
    keeps_last_logits=True,
    image_in_sequence=False,
    encode=encode,
    forward=forward,
    image_encoder=Hook("model.vision_model"),
    image_encoder_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),  # all per image
    image_encoder_runs_first=True,
    prompt_template="{image}{question}",
    notes="cross-attention layers interleaved with self-attention layers; cross-attention knockout "
    "in those layers only",
)

ADAPTERS = (MLLAMA,)

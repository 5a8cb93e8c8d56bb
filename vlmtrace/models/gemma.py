"""Gemma-based VLMs: Gemma 3 and PaliGemma. LLaVA-like paths, but attention is not plain causal.

Both place the projector's output at image tokens inside the prompt (early fusion), with the
language model at `model.language_model.layers`, so every site exists at every position. What
differs from LLaVA is the attention mask, which the model builds from per-token `token_type_ids`
(padded with the sequence, like `input_ids`):

- Gemma 3 attends bidirectionally *within* each image (type 1) and causally elsewhere; its
  layers alternate sliding-window and full attention, each receiving its own mask, so
  knockout edits each layer's own mask. Its KV cache keeps only the last `sliding_window`
  positions of sliding layers, so prefix reuse must not resume from it (declared not causal).
  With pan-and-scan an image becomes several crops:
  `pixel_values` are one entry per crop (concatenated across rows, FLAT), and the projector
  returns [crop, token, hidden] (`image_tiles`, each row owning its crops).
- PaliGemma is a prefix LM: image and prompt (type 0) attend to each other in both directions.
  Editing a late prompt position changes earlier ones, so the stack is declared not causal
  (prefix reuse recomputes all positions). Its positions start at 1, not 0 (`paligemma_forward`;
  under RoPE a shift of every position changes only rounding, 3e-7, but this is exact).

    vlm = vt.load("google/gemma-3-4b-it")       # or google/paligemma2-3b-mix-224
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..engine.positions import MissingImageTokenError
from .adapter import FLAT, IDS, MASK, ROW, Adapter, Hook, token
from .image_grid import ImageGrid
from .llava import LANGUAGE_MODEL, encode, forward


def encode_with_crops(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row; `pixel_values` keep their crop dimension (one entry per crop of the image)."""
    if processor.image_token not in prompt:
        raise MissingImageTokenError(
            f"the prompt {prompt!r} has no {processor.image_token!r}; Gemma 3 reads the image only "
            "where the prompt places it. Put the processor's image placeholder in the prompt."
        )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    return {name: value if name == "pixel_values" else value[0] for name, value in inputs.items()}


def crops(row: dict) -> int:
    """Image entries (the image and its pan-and-scan crops) of one row."""
    return int(row["pixel_values"].shape[0])


GEMMA3 = Adapter(
    family="gemma3",
    architectures=("Gemma3ForConditionalGeneration",),
    # Not plainly causal: each image attends to itself both ways. Declared so, prefix reuse does not
    # resume from the model's KV cache, whose sliding layers keep only the last `sliding_window`
    # positions (the engine indexes cached keys by position; fine once it keeps full caches).
    stacks={"lm": replace(LANGUAGE_MODEL, causal=False)},
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector", layout="image_tiles"),
    },
    inputs={"input_ids": IDS, "attention_mask": MASK, "token_type_ids": token(), "pixel_values": FLAT},
    image_units=crops,
    keeps_last_logits=True,
    image_in_sequence=True,
    encode=encode_with_crops,
    forward=forward,
    image_token_config="image_token_id",
    image_encoder=Hook("model.vision_tower", layout="image_tiles"),
    prompt_template="<start_of_turn>user\n{image}{question}<end_of_turn>\n<start_of_turn>model\n",
    # resized to the tower's square, patches average-pooled to mm_tokens_per_image; crops follow
    image_grid=ImageGrid(view="stretch", pooled_tokens="config.mm_tokens_per_image", crops=True),
    notes="Sliding-window and full layers alternate; images attend bidirectionally within themselves.",
)


def encode_prefix(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row, without the `labels` the processor derives from `token_type_ids` for training."""
    row = encode(processor, prompt, image)
    row.pop("labels", None)
    return row


def paligemma_forward(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Logits over the prompt. PaliGemma numbers positions from 1 (its own default); the
    engine counts them from 0 on the attention mask, so they are shifted here."""
    if "position_ids" in batch:
        batch = {**batch, "position_ids": batch["position_ids"] + 1}
    return model(**batch, use_cache=False).logits  # see `llava.forward`


PALIGEMMA = Adapter(
    family="paligemma",
    architectures=("PaliGemmaForConditionalGeneration",),
    stacks={"lm": replace(LANGUAGE_MODEL, causal=False)},  # prefix LM: image and prompt attend both ways
    embeddings={
        "tokens": Hook("model.language_model.embed_tokens"),
        "image": Hook("model.multi_modal_projector"),
    },
    # forced answer tokens are the causal suffix (type 1), as PaliGemmaProcessor(suffix=...) marks them
    inputs={"input_ids": IDS, "attention_mask": MASK, "token_type_ids": token(forced=1), "pixel_values": ROW},
    keeps_last_logits=True,
    image_in_sequence=True,
    encode=encode_prefix,
    forward=paligemma_forward,
    image_token_config="image_token_id",
    image_encoder=Hook("model.vision_tower"),
    prompt_template="{image}answer en {question}",
    image_grid=ImageGrid(view="stretch"),  # SigLIP: resized to a square, one token per patch
    notes="Prefix LM over image + prompt; the processor adds <bos> after the image and a newline.",
)

ADAPTERS = (GEMMA3, PALIGEMMA)

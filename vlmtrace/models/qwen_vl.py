"""Qwen-VL adapters (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): early fusion with flat image tokens and M-RoPE.

The Qwen-VL models place their image tokens in the prompt like LLaVA, but three things differ,
and each gives a plausible wrong trace if LLaVA's assumptions are reused:

- Positions are 3-D (M-RoPE: time, height, width), computed by the model from `image_grid_thw`
  and `mm_token_type_ids` (0 text, 1 image). The engine must never pass `position_ids`
  (`positions="model"`); the model counts positions from the attention mask itself, so a
  left-padded row computes what it computes alone.
- `pixel_values` are pre-flattened patches [patch, 3 * t * p * p] with no batch dimension, and
  `image_grid_thw` one (t, h, w) per image: both are concatenated over rows (FLAT).
- The merger returns [image token, hidden] for the whole batch (`image_tokens` layout): row r
  owns its own image tokens, consecutively, one per `<|image_pad|>` of its prompt.

Qwen3-VL adds DeepStack: the vision tower's intermediate blocks feed extra mergers whose outputs
are *added* to the hidden states at the image positions after each of the first language-model
layers, by the text model between two layers (outside the layer modules). So:

- `block` at layer l is the layer's output *before* DeepStack's addition, and `resid_pre` at layer
  l + 1 (the residual entering it, `Hook("", "input")`) is the residual *after* it: patching
  `block` at l leaves the run's own DeepStack features to be added on top, patching `resid_pre` at
  l + 1 does not. After DeepStack's last layer the two are the same tensor. `resid_pre` at layer 0
  is the language model's input embeddings, image features placed.
- Gaussian image noise is on the main merger's output, [image token, hidden], with sigma
  `scale * std` of the clean row's merged image tokens: in the units the language model reads,
  as in every other family (on the patch embedding, sigma was in the vision tower's input units,
  which no other family uses, and the same `scale` meant another corruption). The DeepStack
  features are computed from the clean pixels and stay clean: noise corrupts the image the
  language model reads at its input, not the copies DeepStack adds after the first layers, so it
  corrupts the image partly. An image pair corrupts every path. (Noising each DeepStack merger too,
  each in its own units, needs noise at several hooks, which the engine does not do yet.)

    vlm = vlmtrace.load("Qwen/Qwen2-VL-2B-Instruct")    # AutoProcessor needs torchvision
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..engine.positions import MissingImageTokenError
from .adapter import FLAT, IDS, MASK, Adapter, Hook, Stack
from .image_grid import ImageGrid
from .llava import LANGUAGE_MODEL, LANGUAGE_MODEL_SITES, forward

INPUTS = {
    "input_ids": IDS,
    "attention_mask": MASK,
    "mm_token_type_ids": MASK,  # 0 text, 1 image: per token, padded with 0 like the mask
    "pixel_values": FLAT,
    "image_grid_thw": FLAT,
}

PROMPT = (
    "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)
"""The Qwen-VL chat markup (model cards), for processors saved without a chat template."""


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row of inputs: per-token inputs lose the batch dimension, flat ones stay as they are."""
    if processor.image_token not in prompt:
        raise MissingImageTokenError(
            f"the prompt {prompt!r} has no {processor.image_token!r}; Qwen-VL reads the image only where "
            f"the prompt says. Put '<|vision_start|>{processor.image_token}<|vision_end|>' in the prompt."
        )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    return {name: value[0] if INPUTS[name].kind == "token" else value for name, value in inputs.items()}


def patches(row: dict) -> int:
    """Patches of one row's image(s), as the vision tower's patch embedding holds them."""
    return int(row["image_grid_thw"].prod(-1).sum())


GRID = ImageGrid(view="dynamic", patch="image_processor.patch_size", merge="image_processor.merge_size")
"""The image resized to multiples of patch x merge (`image_grid_thw`); one token per merge x merge patches."""


def qwen_adapter(
    family: str, architecture: str, image: Hook, *, stack: Stack = LANGUAGE_MODEL, **extra: Any
) -> Adapter:
    return Adapter(
        family=family,
        architectures=(architecture,),
        stacks={"lm": stack},
        embeddings={"tokens": Hook("model.language_model.embed_tokens"), "image": image},
        inputs=INPUTS,
        positions="model",
        keeps_last_logits=True,
        image_in_sequence=True,
        encode=encode,
        forward=forward,
        image_token_config="image_token_id",
        image_encoder=Hook("model.visual", layout="image_tokens"),  # flat: never reused by row
        prompt_template=PROMPT,
        image_grid=GRID,
        **extra,
    )


MERGER = Hook("model.visual.merger", layout="image_tokens")
QWEN2_VL = qwen_adapter("qwen2_vl", "Qwen2VLForConditionalGeneration", MERGER)
QWEN2_5_VL = qwen_adapter("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", MERGER)
DEEPSTACK_LANGUAGE_MODEL = replace(
    LANGUAGE_MODEL, sites={"resid_pre": Hook("", "input"), **LANGUAGE_MODEL_SITES}
)
"""Qwen3-VL's decoder: the Llama-style sites, and the residual entering each layer, which holds the
DeepStack features added after the layer before (the layer's input: first in execution order)."""

QWEN3_VL = qwen_adapter(
    "qwen3_vl",
    "Qwen3VLForConditionalGeneration",
    MERGER,
    stack=DEEPSTACK_LANGUAGE_MODEL,
    notes="DeepStack adds image features after the first layers, outside `block`: `resid_pre` at "
    "layer l + 1 is the residual after them; image noise (on the merger, in the language model's "
    "units) leaves them clean.",
)
QWEN3_VL_MOE = replace(
    QWEN3_VL,  # the same model with sparse mixture-of-experts MLPs ([row, position, hidden] out)
    family="qwen3_vl_moe",
    architectures=("Qwen3VLMoeForConditionalGeneration",),
)

ADAPTERS = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE)

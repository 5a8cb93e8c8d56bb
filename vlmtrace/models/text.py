"""Text-only causal LMs (Llama, GPT-2): the same engine without an image.

They exist so the engine can be checked against TransformerLens, whose patching utilities
work on text models, and so that textual constraints can be traced in plain LMs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .adapter import IDS, MASK, Adapter, Hook, Stack
from .llava import LANGUAGE_MODEL

TEXT_INPUTS = {"input_ids": IDS, "attention_mask": MASK}


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row of token ids; `processor` is the tokenizer."""
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = tokenizer([prompt], return_tensors="pt")
    return {name: value[0] for name, value in inputs.items() if name != "token_type_ids"}


def forward(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    return model(**batch, use_cache=False).logits  # see `llava.forward`


LLAMA = Adapter(
    family="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    # LLaVA's decoder layers, at the top of the model and with a text-only config
    stacks={
        "lm": replace(
            LANGUAGE_MODEL,
            layers="model.layers",
            heads_config="num_attention_heads",
            layers_config="num_hidden_layers",
        )
    },
    embeddings={"tokens": Hook("model.embed_tokens")},
    keeps_last_logits=True,
    image_in_sequence=False,
    encode=encode,
    forward=forward,
    inputs=TEXT_INPUTS,
    prompt_template="{question}",
)

GPT2 = replace(
    LLAMA,
    family="gpt2",
    architectures=("GPT2LMHeadModel",),
    stacks={
        "lm": Stack(
            layers="transformer.h",
            sequence="prompt",
            sites={
                "attn_head": Hook("attn.c_proj", "input"),
                "attn": Hook("attn", "output", index=0),
                "mlp": Hook("mlp"),
                "block": Hook(""),
            },
            attention="attn",
            patterns={"self": Hook("attn", index=1)},
            heads_config="n_head",
            layers_config="n_layer",
        )
    },
    embeddings={"tokens": Hook("transformer.wte")},
)

ADAPTERS = (LLAMA, GPT2)

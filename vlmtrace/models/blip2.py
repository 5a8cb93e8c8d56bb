"""BLIP-2 and InstructBLIP adapters: a Q-Former's query outputs placed in front of the prompt.

The vision tower's patches are read by a Q-Former's learned queries; `language_projection` maps
its `num_query_tokens` outputs to the language model's width, and they replace as many image
tokens that the *processor* puts in front of the prompt (`Blip2Processor(num_query_tokens=32)`).
So image tokens are ordinary positions of the language model's sequence, always first.

One HF class serves several language models (BLIP-2: OPT or Flan-T5; InstructBLIP: Vicuna or
Flan-T5), and adapters are looked up by class. These describe the decoder-only checkpoints most
traced: BLIP-2 with OPT (`Salesforce/blip2-opt-2.7b`), InstructBLIP with Vicuna, a Llama
(`Salesforce/instructblip-vicuna-7b`). A Flan-T5 checkpoint fails at load time, naming the
missing layer path.

OPT's decoder layer has no MLP module: `fc1`, the activation and `fc2` are the layer's own
children, and it flattens the hidden states to [row * position, hidden] before them. The MLP
contribution is `fc2`'s output with the `flat_rows` layout (indexing it as [row, position]
writes into other rows). The heads are the input of `self_attn.out_proj`.

InstructBLIP also hands the instruction to the Q-Former, tokenized by the Q-Former's own
(BERT) tokenizer: `qformer_input_ids` / `qformer_attention_mask` are one sequence per row, of
another length than the prompt. They are per-row inputs, zero-padded on the right to the longest
row (as the processor pads a batch; the padding is masked, and right padding leaves the real
tokens' positions unchanged).

Prompts: "Question: {question} Answer:" (the BLIP-2 model cards); the image placeholder may
lead the prompt (`{image}` of a template, `<image>` of a synthetic sample) and is removed, since
the processor places the query tokens itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..engine.positions import MissingImageTokenError
from .adapter import LLAVA_INPUTS, ROW_PADDED, Adapter, Hook, Scores
from .llava import LANGUAGE_MODEL


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row of inputs; the processor puts `num_query_tokens` image tokens in front."""
    placeholder = str(processor.image_token)
    text = prompt.strip()
    if text.startswith(placeholder):
        text = text[len(placeholder) :].lstrip()
    if placeholder in text:
        raise MissingImageTokenError(
            f"the prompt {prompt!r} has {placeholder!r} after its start; BLIP-2 reads the image "
            "before the prompt, always. Put the placeholder first or leave it out."
        )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    return {name: value[0] for name, value in inputs.items()}


def forward(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Logits over the prompt; the answer is predicted at the last position."""
    return model(**batch).logits


VICUNA = replace(LANGUAGE_MODEL, layers="language_model.model.layers")
"""InstructBLIP's Llama decoder: LLaVA's layer sites, under `language_model.model`."""

OPT = replace(
    VICUNA,
    layers="language_model.model.decoder.layers",
    sites={
        "attn_head": Hook("self_attn.out_proj", "input"),
        "attn": Hook("self_attn", index=0),
        "mlp": Hook("fc2", layout="flat_rows"),  # OPT flattens rows and positions before fc1
        "block": Hook(""),
    },
    # no rotary embeddings; the query projection is scaled after it, the product is not
    scores=Scores(module="self_attn", query="q_proj", key="k_proj", scale="scaling"),
)

BLIP2 = Adapter(
    family="blip2",
    architectures=("Blip2ForConditionalGeneration",),
    stacks={"lm": OPT},
    embeddings={
        "tokens": Hook("language_model.model.decoder.embed_tokens"),
        "image": Hook("language_projection"),  # [row, query, hidden]
    },
    inputs=LLAVA_INPUTS,
    keeps_last_logits=True,
    resumes_from_cache=False,  # the cache is in language_model_outputs; every call needs pixels
    image_in_sequence=True,
    encode=encode,
    forward=forward,
    image_token_config="image_token_index",
    image_encoder=Hook("vision_model"),
    prompt_template="{image}Question: {question} Answer:",
)

INSTRUCTBLIP = replace(
    BLIP2,
    family="instructblip",
    architectures=("InstructBlipForConditionalGeneration",),
    stacks={"lm": VICUNA},
    embeddings={"tokens": Hook("language_model.model.embed_tokens"), "image": Hook("language_projection")},
    inputs={
        **LLAVA_INPUTS,
        "qformer_input_ids": ROW_PADDED,  # the instruction in the Q-Former's tokenizer
        "qformer_attention_mask": ROW_PADDED,
    },
)

ADAPTERS = (BLIP2, INSTRUCTBLIP)

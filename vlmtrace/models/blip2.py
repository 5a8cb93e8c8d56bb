"""BLIP-2 and InstructBLIP adapters: a Q-Former's query outputs placed in front of the prompt.

The vision tower's patches are read by a Q-Former's learned queries; `language_projection` maps
its `num_query_tokens` outputs to the language model's width, and they replace as many image
tokens that the *processor* puts in front of the prompt (`Blip2Processor(num_query_tokens=32)`).
So image tokens are ordinary positions of the language model's sequence, always first.

One HF class serves several language models (BLIP-2: OPT or Flan-T5; InstructBLIP: Vicuna or
Flan-T5), told apart by `text_config.model_type` (`Adapter.requires`): the registry picks the
adapter from the config, before any weight loads, and a checkpoint with another language model
fails there, naming it.

- OPT (`Salesforce/blip2-opt-2.7b`) and Vicuna, a Llama (`Salesforce/instructblip-vicuna-7b`), are
  decoder-only: the query tokens and the prompt are one sequence, and the answer is predicted
  after its last position.
- Flan-T5 (`Salesforce/blip2-flan-t5-xl`, `Salesforce/instructblip-flan-t5-xl`) is an
  encoder-decoder: the query tokens and the prompt run through the T5 *encoder* (bidirectional),
  and the answer is predicted by the T5 *decoder*, which starts from the decoder start token
  (T5's pad token) and cross-attends to the encoder's output, as BLIP's answer decoder does
  (`answer_sequence="decoder"`). Both stacks are declared: "encoder" (the default: where the
  image tokens are) and "decoder". The model's own forward needs `decoder_input_ids` (without
  them T5's decoder has no input and raises); `encode` supplies them.

OPT's decoder layer has no MLP module: `fc1`, the activation and `fc2` are the layer's own
children, and it flattens the hidden states to [row * position, hidden] before them. The MLP
contribution is `fc2`'s output with the `flat_rows` layout (indexing it as [row, position]
writes into other rows). The heads are the input of `self_attn.out_proj`.

InstructBLIP also hands the instruction to the Q-Former, tokenized by the Q-Former's own
(BERT) tokenizer: `qformer_input_ids` / `qformer_attention_mask` are one sequence per row, of
another length than the prompt. They are per-row inputs, zero-padded on the right to the longest
row (as the processor pads a batch; the padding is masked, and right padding leaves the real
tokens' positions unchanged).

T5's layers are pre-LayerNorm blocks of sublayers: `layer.0` self-attention, (decoder:
`layer.1` cross-attention,) then the feed-forward sublayer; each adds its module's output
(`SelfAttention`, `EncDecAttention`, `DenseReluDense`) to the residual, so those outputs are the
contributions, and the heads are the input of their output projection `o`. A block returns
(hidden states, position bias, ...): the `block` site is its element 0. Positions are relative
(a learned bias of key minus query position, computed by the model), so left padding leaves a
row's computation unchanged and the engine passes no position ids (`positions="model"`). The
self-attention mask arrives as the sublayer's `attention_mask` keyword in every layer (the
position bias is added beside it, not folded into it).

Prompts: "Question: {question} Answer:" (the BLIP-2 model cards); the image placeholder may
lead the prompt (`{image}` of a template, `<image>` of a synthetic sample) and is removed, since
the processor places the query tokens itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..engine.positions import MissingImageTokenError
from .adapter import IDS, LLAVA_INPUTS, MASK, ROW, ROW_PADDED, Adapter, Hook, Scores, Stack, token
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
    return model(**batch, use_cache=False).logits  # see `llava.forward`


def encode_for_t5(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row: the encoder's inputs as for OPT, and the decoder's (start token + forced answer).

    T5 starts decoding from its pad token (`decoder_start_token_id` of every T5 config).
    """
    row = encode(processor, prompt, image)
    ids = [processor.tokenizer.pad_token_id, *(decoder_ids or [])]
    row["decoder_input_ids"] = torch.tensor(ids)
    row["decoder_attention_mask"] = torch.ones(len(ids), dtype=torch.long)
    return row


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
    image_encoder_runs_first=True,
    prompt_template="{image}Question: {question} Answer:",
    requires={"text_config.model_type": ("opt",)},
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
    requires={"text_config.model_type": ("llama",)},
)


def t5_stack(layers: str, *, decoder: bool) -> Stack:
    """T5's encoder (bidirectional, over query tokens + prompt) or decoder (causal, over the
    decoder's input, cross-attending to the encoder's output)."""
    cross = (
        {
            "cross_attn_head": Hook("layer.1.EncDecAttention.o", "input"),
            "cross_attn": Hook("layer.1.EncDecAttention", index=0),
        }
        if decoder
        else {}
    )
    return Stack(
        layers=layers,
        sequence="decoder" if decoder else "prompt",
        sites={  # execution order within a block
            "attn_head": Hook("layer.0.SelfAttention.o", "input"),
            "attn": Hook("layer.0.SelfAttention", index=0),
            **cross,
            "mlp": Hook(f"layer.{2 if decoder else 1}.DenseReluDense"),
            "block": Hook("", index=0),
        },
        attention="layer.0",  # T5LayerSelfAttention: the mask arrives as its `attention_mask` keyword
        causal=decoder,
        cross_attention="layer.1" if decoder else None,
        cross_mask_keyword="attention_mask",
        cross_states_keyword="key_value_states",
        cross_sequence="prompt" if decoder else None,
        patterns={
            "self": Hook("layer.0.SelfAttention", index=2),
            **({"cross": Hook("layer.1.EncDecAttention", index=2)} if decoder else {}),
        },
        heads_config="text_config.num_heads",
        layers_config="text_config.num_decoder_layers" if decoder else "text_config.num_layers",
    )


T5_INPUTS = {
    "input_ids": IDS,
    "attention_mask": MASK,
    "pixel_values": ROW,
    "decoder_input_ids": token("decoder", pad="pad_token"),
    "decoder_attention_mask": token("decoder"),
}

BLIP2_T5 = replace(
    BLIP2,
    family="blip2_t5",
    stacks={
        "encoder": t5_stack("language_model.encoder.block", decoder=False),
        "decoder": t5_stack("language_model.decoder.block", decoder=True),
    },
    embeddings={
        "tokens": Hook("language_model.shared"),  # the prompt's embeddings (the decoder has its own)
        "image": Hook("language_projection"),
    },
    inputs=T5_INPUTS,
    positions="model",  # relative position bias, computed by the model
    answer_sequence="decoder",
    keeps_last_logits=False,
    encode=encode_for_t5,
    requires={"text_config.model_type": ("t5",)},
)

INSTRUCTBLIP_T5 = replace(
    BLIP2_T5,
    family="instructblip_t5",
    architectures=INSTRUCTBLIP.architectures,
    inputs={**T5_INPUTS, "qformer_input_ids": ROW_PADDED, "qformer_attention_mask": ROW_PADDED},
)

ADAPTERS = (BLIP2, INSTRUCTBLIP, BLIP2_T5, INSTRUCTBLIP_T5)

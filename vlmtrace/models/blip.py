"""BLIP VQA adapter: dual stream, the image reaches the text only through cross-attention.

Two stacks are traced: the question encoder (self-attention over the question, cross-
attention to the ViT's patch embeddings) and the answer decoder (self-attention over the
answer tokens, cross-attention to the encoded question), as in Palit et al.

BLIP's text layers are post-LayerNorm: each sublayer adds its output projection to the
residual and then normalises. The clean per-sublayer contributions are therefore the dense
projections (`attention.output.dense`, `crossattention.output.dense`, `output.dense`), and
per-head slices are the inputs of those projections.

`BlipForQuestionAnswering.forward` returns only a loss, so `forward` below drives the three
parts the way `generate` does and returns the decoder's logits.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import Adapter, Hook, Stack, register

TEXT_LAYER_SITES = {
    "attn_head": Hook("attention.output.dense", "input"),
    "attn": Hook("attention.output.dense"),
    "cross_attn_head": Hook("crossattention.output.dense", "input"),
    "cross_attn": Hook("crossattention.output.dense"),
    "mlp": Hook("output.dense"),
    "block": Hook(""),
}


def encode(processor: Any, prompt: str, image: Any, decoder_ids: list[int] | None = None) -> dict:
    """One row: question ids for the encoder, and the decoder's input ids (start + answer)."""
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    row = {name: value[0] for name, value in inputs.items()}
    start = processor.tokenizer.bos_token_id
    ids = [start, *(decoder_ids or [])]
    row["decoder_input_ids"] = torch.tensor(ids)
    row["decoder_attention_mask"] = torch.ones(len(ids), dtype=torch.long)
    return row


def forward(
    model: torch.nn.Module,
    *,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    decoder_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Answer-decoder logits [B, T_decoder, V], computed as `BlipForQuestionAnswering.generate`."""
    image = model.vision_model(pixel_values=pixel_values)[0]
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
    question = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        encoder_hidden_states=image,
        encoder_attention_mask=image_mask,
    )[0]
    return model.text_decoder(
        input_ids=decoder_input_ids,
        attention_mask=decoder_attention_mask,
        position_ids=decoder_position_ids,
        encoder_hidden_states=question,
        encoder_attention_mask=attention_mask,
        reduction="none",
    ).logits


BLIP = register(
    Adapter(
        family="blip",
        architectures=("BlipForQuestionAnswering",),
        stacks={
            "encoder": Stack(
                layers="text_encoder.encoder.layer",
                sequence="prompt",
                sites=TEXT_LAYER_SITES,
                causal=False,
                attention="attention",
                patterns={"self": Hook("attention", index=1), "cross": Hook("crossattention", index=1)},
                heads_config="text_config.num_attention_heads",
                layers_config="text_config.num_hidden_layers",
            ),
            "decoder": Stack(
                layers="text_decoder.bert.encoder.layer",
                sequence="decoder",
                sites=TEXT_LAYER_SITES,
                attention="attention",
                patterns={"self": Hook("attention", index=1), "cross": Hook("crossattention", index=1)},
                heads_config="text_config.num_attention_heads",
                layers_config="text_config.num_hidden_layers",
            ),
        },
        embeddings={
            "image": Hook("vision_model", index=0),
            "tokens": Hook("text_encoder.embeddings"),
        },
        image_in_sequence=False,
        encode=encode,
        forward=forward,
        answer_sequence="decoder",
    )
)

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

transformers 5.x drops the answer decoder's cross-attention mask: `BlipTextAttention` hands
it to `BlipTextSelfAttention` as `attention_mask`, which cross-attention ignores in favour of
the absent `encoder_attention_mask`. The decoder then reads the question's left padding, and a
padded row scores differently from the same row alone. `give_cross_attention_its_mask` (an
adapter fix, installed when the model is wrapped) hands the mask over under the right name.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import IDS, MASK, ROW, Adapter, Hook, Scores, Stack, token
from .image_grid import ImageGrid

TEXT_LAYER_SITES = {
    "attn_head": Hook("attention.output.dense", "input"),
    "attn": Hook("attention.output.dense"),
    "cross_attn_head": Hook("crossattention.output.dense", "input"),
    "cross_attn": Hook("crossattention.output.dense"),
    "mlp": Hook("output.dense"),
    "block": Hook(""),
}


def give_cross_attention_its_mask(model: torch.nn.Module) -> None:
    """Forward pre-hooks on every cross-attention that pass its mask as `encoder_attention_mask`.

    Idempotent: a model wrapped twice gets one hook per module.
    """

    def hand_over(module, args, kwargs):
        if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
            kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
        return args, kwargs

    for name, module in model.named_modules():
        if name.endswith("crossattention.self") and not getattr(module, "_vlmtrace_mask_fix", False):
            module.register_forward_pre_hook(hand_over, with_kwargs=True)
            module._vlmtrace_mask_fix = True


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
        use_cache=False,  # see `llava.forward`
    ).logits


def stack(layers: str, *, sequence: str, causal: bool, cross_sequence: str) -> Stack:
    """One BLIP text stack: the question encoder or the answer decoder."""
    return Stack(
        layers=layers,
        sequence=sequence,
        sites=TEXT_LAYER_SITES,
        causal=causal,
        attention="attention",
        cross_attention="crossattention.self",
        cross_sequence=cross_sequence,
        patterns={"self": Hook("attention", index=1), "cross": Hook("crossattention", index=1)},
        heads_config="text_config.num_attention_heads",
        layers_config="text_config.num_hidden_layers",
        scores=Scores(module="attention.self", query="query", key="key", scale=None),
        cross_scores=Scores(
            module="crossattention.self", query="query", key="key", scale=None, mask="encoder_attention_mask"
        ),
    )


BLIP = Adapter(
    family="blip",
    architectures=("BlipForQuestionAnswering",),
    stacks={
        "encoder": stack(
            "text_encoder.encoder.layer", sequence="prompt", causal=False, cross_sequence="image"
        ),
        "decoder": stack(
            "text_decoder.bert.encoder.layer", sequence="decoder", causal=True, cross_sequence="prompt"
        ),
    },
    embeddings={
        "image": Hook("vision_model", index=0),
        "tokens": Hook("text_encoder.embeddings"),
    },
    inputs={
        "input_ids": IDS,
        "attention_mask": MASK,
        "pixel_values": ROW,
        "decoder_input_ids": token("decoder", pad="pad_token"),
        "decoder_attention_mask": token("decoder"),
    },
    image_in_sequence=False,
    encode=encode,
    forward=forward,
    # one [row, patch, hidden] encoding per image; most of a patched row's work at BLIP's sizes
    image_encoder=Hook("vision_model"),
    image_encoder_runs_first=True,  # the forward above: vision, then the question
    answer_sequence="decoder",
    prompt_template="{question}",
    # the cross-attention keys after the vision encoder's CLS: one per patch of the resized square
    image_grid=ImageGrid(view="stretch"),
    fixes=(give_cross_attention_its_mask,),
)

ADAPTERS = (BLIP,)

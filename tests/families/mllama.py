"""Mllama (Llama-3.2-Vision): the image enters through gated cross-attention layers only.

Three text layers: self-attention, cross-attention, self-attention. Self-attention sites exist at
layers 0 and 2, cross-attention sites at layer 1, so windows of 2 mix the two kinds. The image is
not in the token sequence (the prompt holds one `<image>` placeholder): segments are the visual
phrase and the last token, and knockout blocks "this shape" -> last in self-attention, which
exists in layers 0 and 2 only (a window over layer 1 cuts nothing there). A random config starts
the cross-attention gates at zero (the image has no effect): they are set to 1 here; text weights
are drawn 5x wider than the default, so corruptions move log P(answer) by 0.3-0.4, not 0.01. The
image pair is 64x32, so it has two tiles where the clean image has one.
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
)

from families.spec import QUESTION, WORDS, Family, tiny_model
from vlmtrace.models.build import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, word_tokenizer

LAYER = "model.language_model.layers.{i}"


def build():
    tokenizer = word_tokenizer(WORDS)
    vision = MllamaVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        intermediate_size=64,
        vision_output_dim=64,  # hidden_size x (1 + len(intermediate_layers_indices))
        intermediate_layers_indices=[0],
        image_size=32,
        patch_size=8,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    text = MllamaTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        cross_attention_layers=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        initializer_range=0.1,  # at 0.02 the answer is near uniform and the image moves it by 0.004
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = tiny_model(MllamaForConditionalGeneration, config, seed=2)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
    image_processor = MllamaImageProcessorPil(
        size={"height": 32, "width": 32}, max_image_tiles=2, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return model, MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


FAMILY = Family(
    name="mllama",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "cross_attn": At(LAYER + ".cross_attn", index=0),
        "mlp": At(LAYER + ".mlp"),
        "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
        "cross_attn_head": At(LAYER + ".cross_attn.o_proj", side="input"),
    },
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    attention_layers=(0, 2),
    pair_size=(64, 32),
    segments=("visual", "last"),
    knockout=("visual", "last"),
)

"""Idefics3: SigLIP-like tower, pixel-shuffle connector [sub-image, token, hidden], Llama decoder.

The processor splits each image into sub-images plus a global view (a 32x32 image upscaled to
64x64 gives 2x2 + 1 = 5, the 64x32 pair 1x2 + 1 = 3), so rows own unequal numbers of
sub-images in the connector's output and unequal numbers of image tokens in the prompt.
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

from families.spec import QUESTION, WORDS, Family, decoder_sites, tiny_model, tiny_vision
from vlmtrace.models.build import IMAGE_TOKEN, word_tokenizer

TAGS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
"""The special tokens the Idefics3 / SmolVLM processors write around image tokens."""
LAYER = "model.text_model.layers.{i}"
PROMPT = f"User:<image>{QUESTION}<end_of_utterance>\nAssistant:"


def tokenizer():
    words = word_tokenizer(["User:", "Assistant:", *WORDS])
    words.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *TAGS]})
    return words


def configs(words, *, hidden: int = 64, layers: int = 2, heads: int = 4) -> dict:
    """Config parts shared by Idefics3 and SmolVLM: 32 px sub-images, 8 px patches, pixel shuffle
    by 2 -> 4 image tokens per sub-image."""
    vision = tiny_vision(num_attention_heads=4)
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=words.pad_token_id,
        tie_word_embeddings=False,
    )
    return dict(
        vision_config=vision,
        text_config=text.to_dict(),
        image_token_id=words.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
    )


def build_with(config_class, vision_class, model_class, image_processor_class):
    """Idefics3 or SmolVLM from its own classes: 64 px images in 32 px sub-images, written out by
    `Idefics3Processor` (SmolVLM's writes the same for images, see `smolvlm.py`)."""
    words = tokenizer()
    parts = configs(words)
    config = config_class(**{**parts, "vision_config": vision_class(**parts["vision_config"]).to_dict()})
    model = tiny_model(model_class, config, seed=3)
    images = image_processor_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=words, image_seq_len=4)
    return model, processor


def build():
    return build_with(
        Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil
    )


SITES = decoder_sites(LAYER)

FAMILY = Family(
    name="idefics3",
    build=build,
    prompt=PROMPT,
    sites=SITES,
    image=At("model.connector"),
    attention=LAYER + ".self_attn",
    pair_size=(64, 32),
)

torch.set_num_threads(1)

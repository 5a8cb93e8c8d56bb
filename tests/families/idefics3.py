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

from families.spec import Family
from vlmtrace.models.build import IMAGE_TOKEN, word_tokenizer

WORDS = "User: Assistant: which city did this shape represent in year 2006 ? the circle paris rome".split()
TAGS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
"""The special tokens the Idefics3 / SmolVLM processors write around image tokens."""
LAYER = "model.text_model.layers.{i}"
PROMPT = "User:<image>which city did this shape represent in year 2006 ?<end_of_utterance>\nAssistant:"


def tokenizer():
    words = word_tokenizer(WORDS)
    words.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *TAGS]})
    return words


def configs(words, *, hidden: int = 64, layers: int = 2, heads: int = 4) -> dict:
    """Config parts shared by Idefics3 and SmolVLM: 32 px sub-images, 8 px patches, pixel shuffle
    by 2 -> 4 image tokens per sub-image."""
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
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


def build():
    words = tokenizer()
    parts = configs(words)
    config = Idefics3Config(
        **{**parts, "vision_config": Idefics3VisionConfig(**parts["vision_config"]).to_dict()}
    )
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    model = Idefics3ForConditionalGeneration(config).eval()
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=words, image_seq_len=4)
    return model, processor


SITES = {
    "block": At(LAYER),
    "attn": At(LAYER + ".self_attn", index=0),
    "mlp": At(LAYER + ".mlp"),
    "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
}

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

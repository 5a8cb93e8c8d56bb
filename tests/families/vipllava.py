"""VipLlava: a LLaVA whose projector reads two CLIP layers at once (their features concatenated per
patch, then layer-normed and projected); the image tokens and decoder are LLaVA's."""

from __future__ import annotations

from reference import At
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaProcessor,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

from families.spec import QUESTION, WORDS, Family, decoder_sites, tiny_model, tiny_text, tiny_vision
from vlmtrace.models.build import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, word_tokenizer

LAYER = "model.language_model.layers.{i}"


def build():
    words = word_tokenizer(WORDS)
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**tiny_vision()),
        text_config=LlamaConfig(**tiny_text(words), tie_word_embeddings=False),
        image_token_index=words.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=[1, -1],  # the middle and the last of the tower's three hidden states
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=words,
        patch_size=8,
        vision_feature_select_strategy="default",  # VipLlava drops the CLS token of every layer
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    return tiny_model(VipLlavaForConditionalGeneration, config, seed=1), processor


FAMILY = Family(
    name="vipllava",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
)

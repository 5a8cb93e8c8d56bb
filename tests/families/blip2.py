"""BLIP-2 with OPT: four Q-Former query outputs in front of the prompt; OPT's MLP is flat.

OPT flattens hidden states to [row * position, hidden] before `fc2`, so the MLP site is
flat in the batch; here the reference reads it as [position, hidden] of one row. The tokenizer
has no `image_token` attribute, as the hub's OPT tokenizer: the real `Blip2Processor` then
registers `<image>` itself (with one, it calls `.content` on a string and fails).
"""

from __future__ import annotations

import torch
from reference import At
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from families.spec import Family, tiny_model, tiny_vision
from vlmtrace.models.build import CLIP_MEAN, CLIP_STD, SPECIAL_TOKENS

WORDS = "question : which city did this shape represent in year 2006 ? answer the circle paris rome".split()
LAYER = "language_model.model.decoder.layers.{i}"
QUERIES = 4


def tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer without an `image_token` attribute (the processor adds `<image>`)."""
    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def vision_and_qformer(vision_class, qformer_class, vocab: int) -> tuple[dict, dict]:
    vision = vision_class(
        **tiny_vision(
            num_attention_heads=4,
            initializer_range=0.2,  # the default 1e-10 gives a constant vision tower
        )
    )
    qformer = qformer_class(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        encoder_hidden_size=32,
        vocab_size=vocab,
        initializer_range=0.2,  # at 0.02 the image pair moves log P(answer) by < 0.004
    )
    return vision.to_dict(), qformer.to_dict()


def queried_model(config_class, model_class, words, vision: dict, qformer: dict, text, seed: int):
    """The model with `QUERIES` query tokens in front of the prompt. Query tokens start at zero in
    a random config (all queries alike): they are drawn instead."""
    config = config_class(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=words.convert_tokens_to_ids("<image>"),
    )
    model = tiny_model(model_class, config, seed)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)
    return model


def image_processor() -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def build():
    words = tokenizer()
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=words, num_query_tokens=QUERIES)
    vision, qformer = vision_and_qformer(Blip2VisionConfig, Blip2QFormerConfig, len(words))
    text = OPTConfig(
        vocab_size=len(words),
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        init_std=0.1,  # at 0.02 the answer is near uniform and the image moves it by ~0.01
        pad_token_id=words.pad_token_id,
        bos_token_id=words.bos_token_id,
        eos_token_id=words.eos_token_id,
    )
    model = queried_model(Blip2Config, Blip2ForConditionalGeneration, words, vision, qformer, text, seed=3)
    return model, processor


FAMILY = Family(
    name="blip2",
    build=build,
    prompt="question : which city did this shape represent in year 2006 ? answer :",
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "mlp": At(LAYER + ".fc2"),
        "attn_head": At(LAYER + ".self_attn.out_proj", side="input"),
    },
    image=At("language_projection"),
    attention=LAYER + ".self_attn",
)

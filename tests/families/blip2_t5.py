"""BLIP-2 with Flan-T5: the query tokens and the prompt run through the T5 encoder, the T5 decoder
predicts the answer from its start token.

Sites are the encoder's (the default stack, where the image tokens are): each sublayer's module
output (`SelfAttention`, `DenseReluDense`) is what it adds to the residual, and a T5 block returns
(hidden states, position bias): its element 0 is the block site. The encoder is bidirectional:
with no padding the model passes no mask, and the knockout reference builds a zero one. The
model's own forward needs `decoder_input_ids`; the score starts the decoder from the config's
`decoder_start_token_id`.
"""

from __future__ import annotations

import torch
from reference import At
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    T5Config,
)

from families.blip2 import QUERIES, image_processor, queried_model, tokenizer, vision_and_qformer
from families.spec import Family

LAYER = "language_model.encoder.block.{i}"
SITES = {
    "block": At(LAYER, index=0),
    "attn": At(LAYER + ".layer.0.SelfAttention", index=0),
    "mlp": At(LAYER + ".layer.1.DenseReluDense"),
    "attn_head": At(LAYER + ".layer.0.SelfAttention.o", side="input"),
}


def t5_config(words) -> T5Config:
    """2 encoder and 2 decoder layers of width 32, 4 heads of 8, Flan-T5's gated GELU MLP."""
    return T5Config(
        vocab_size=len(words),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=words.pad_token_id,
        eos_token_id=words.eos_token_id,
        decoder_start_token_id=words.pad_token_id,
        initializer_factor=0.5,  # at 1.0 log P(answer) is about -14; at 0.2 the image moves it by 2e-4
    )


def build():
    words = tokenizer()
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=words, num_query_tokens=QUERIES)
    vision, qformer = vision_and_qformer(Blip2VisionConfig, Blip2QFormerConfig, len(words))
    model = queried_model(
        Blip2Config, Blip2ForConditionalGeneration, words, vision, qformer, t5_config(words), seed=5
    )
    return model, processor


def first_answer_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The decoder's logits at its start token: what predicts the answer's first token."""
    start = torch.tensor([[model.config.text_config.decoder_start_token_id]])
    return model(**inputs, decoder_input_ids=start).logits[0, 0]


FAMILY = Family(
    name="blip2_t5",
    build=build,
    prompt="question : which city did this shape represent in year 2006 ? answer :",
    sites=SITES,
    image=At("language_projection"),
    attention=LAYER + ".layer.0",
    causal=False,
    score=first_answer_logits,
    skip={"prefix_reuse": "T5 blocks return (hidden states, position bias): reuse_prefix is refused"},
)

"""InstructBLIP with a Llama (Vicuna) language model: the Q-Former also reads the instruction.

`qformer_input_ids` / `qformer_attention_mask` come from the Q-Former's own tokenizer (here a
word-level one with another vocabulary order and right padding, as BERT's): one sequence per
row, of another length than the prompt, so they are per-row inputs, right-padded.
"""

from __future__ import annotations

from reference import At
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

from families.blip2 import (
    QUERIES,
    WORDS,
    image_processor,
    queried_model,
    tokenizer,
    vision_and_qformer,
)
from families.spec import Family

LAYER = "language_model.model.layers.{i}"


def build():
    words = tokenizer()
    qformer_words = tokenizer(list(reversed(WORDS)))
    qformer_words.padding_side = "right"
    processor = InstructBlipProcessor(
        image_processor=image_processor(),
        tokenizer=words,
        qformer_tokenizer=qformer_words,
        num_query_tokens=QUERIES,
    )
    vision, qformer = vision_and_qformer(
        InstructBlipVisionConfig, InstructBlipQFormerConfig, len(qformer_words)
    )
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        initializer_range=0.1,  # at 0.02 the answer is near uniform and the image barely moves it
        pad_token_id=words.pad_token_id,
        bos_token_id=words.bos_token_id,
        eos_token_id=words.eos_token_id,
        tie_word_embeddings=False,
    )
    model = queried_model(
        InstructBlipConfig, InstructBlipForConditionalGeneration, words, vision, qformer, text, seed=5
    )
    return model, processor


FAMILY = Family(
    name="instructblip",
    build=build,
    prompt="question : which city did this shape represent in year 2006 ? answer :",
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "mlp": At(LAYER + ".mlp"),
        "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
    },
    image=At("language_projection"),
    attention=LAYER + ".self_attn",
)

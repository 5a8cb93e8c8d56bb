"""InstructBLIP with Flan-T5: BLIP-2-T5's encoder and decoder, and a Q-Former that reads the
instruction (per-row `qformer_input_ids`, right-padded, as in `instructblip.py`)."""

from __future__ import annotations

from dataclasses import replace

from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
)

from families.blip2 import QUERIES, WORDS, image_processor, queried_model, tokenizer, vision_and_qformer
from families.blip2_t5 import FAMILY as BLIP2_T5
from families.blip2_t5 import t5_config


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
    model = queried_model(
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        words,
        vision,
        qformer,
        t5_config(words),
        seed=5,
    )
    return model, processor


FAMILY = replace(BLIP2_T5, name="instructblip_t5", build=build)

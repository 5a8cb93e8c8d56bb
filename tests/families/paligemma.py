"""PaliGemma 2: SigLIP tower, linear projector, Gemma 2 decoder as a prefix LM.

Image and prompt attend to each other in both directions (`token_type_ids` 0), so a patch at
a late prompt position changes earlier ones. Gemma 2 alternates sliding-window (layer 0,
window 8, shorter than the prompt) and full layers and soft-caps attention and final logits.
The model numbers positions from 1; the reference lets it (no position ids are passed here).
"""

from __future__ import annotations

from reference import At
from transformers import (
    Gemma2Config,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from families.spec import QUESTION, WORDS, Family, decoder_sites, tiny_model, tiny_text, tiny_vision
from vlmtrace.models.build import word_tokenizer

LAYER = "model.language_model.layers.{i}"


def build(seed: int = 7):
    tokens = word_tokenizer(WORDS)
    image_processor = SiglipImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    image_processor.image_seq_length = 16  # as in PaliGemma's preprocessor_config.json
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokens)  # adds 1,152 tokens
    vision = SiglipVisionConfig(**tiny_vision())
    text = Gemma2Config(
        **tiny_text(
            tokens,
            head_dim=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
        )
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokens.image_token_id,
        vocab_size=len(tokens),
        projection_dim=64,
        hidden_size=64,
    )
    return tiny_model(PaliGemmaForConditionalGeneration, config, seed), processor


FAMILY = Family(
    name="paligemma",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
)

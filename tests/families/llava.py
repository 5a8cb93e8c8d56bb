"""LLaVA-1.5: CLIP tower, MLP projector [row, patch, hidden], Llama decoder."""

from __future__ import annotations

import torch
from reference import At

from families.spec import QUESTION, WORDS, Family, decoder_sites
from vlmtrace.models.build import build_llava, word_tokenizer

LAYER = "model.language_model.layers.{i}"


def build():
    return build_llava(word_tokenizer(WORDS), layers=3, seed=1)


FAMILY = Family(
    name="llava",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
)

torch.set_num_threads(1)

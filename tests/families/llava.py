"""LLaVA-1.5: CLIP tower, MLP projector [row, patch, hidden], Llama decoder."""

from __future__ import annotations

import torch
from reference import At

from families.spec import Family
from vlmtrace.models.build import build_llava, word_tokenizer

WORDS = "which city did this shape represent in year 2006 ? the circle paris rome".split()
LAYER = "model.language_model.layers.{i}"


def build():
    model, processor = build_llava(word_tokenizer(WORDS), layers=3, seed=1)
    return model, processor


FAMILY = Family(
    name="llava",
    build=build,
    prompt="<image> which city did this shape represent in year 2006 ?",
    sites={
        "block": At(LAYER),
        "attn": At(LAYER + ".self_attn", index=0),
        "mlp": At(LAYER + ".mlp"),
        "attn_head": At(LAYER + ".self_attn.o_proj", side="input"),
    },
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
)

torch.set_num_threads(1)

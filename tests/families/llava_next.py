"""LLaVA-NeXT: any-resolution tiles; the projector returns [tile, patch, hidden] for the batch.

A 64x32 image gives a base view plus two tiles per row: Gaussian noise must land on the
corrupted rows' tiles, with sigma over all of the clean row's tiles, not on "tile r = row r".
"""

from __future__ import annotations

from reference import At

from families.spec import QUESTION, WORDS, Family, decoder_sites
from vlmtrace.models.build import build_llava_next, word_tokenizer

LAYER = "model.language_model.layers.{i}"


def build():
    return build_llava_next(word_tokenizer(WORDS), layers=2, seed=4)


FAMILY = Family(
    name="llava_next",
    build=build,
    prompt=f"<image> {QUESTION}",
    sites=decoder_sites(LAYER),
    image=At("model.multi_modal_projector"),
    attention=LAYER + ".self_attn",
    image_size=(64, 32),
)

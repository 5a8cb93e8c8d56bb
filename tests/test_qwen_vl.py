"""Qwen-VL rows padded to another row's length score exactly what they score alone (M-RoPE).

Qwen-VL computes its 3-D positions itself, from the attention mask, `image_grid_thw` and
`mm_token_type_ids`; the engine must pass none (`positions="model"`). The family reference
tests use replacements of equal token count, so no row is ever padded there. Here the
replacement phrase has another token count (`ReplaceSpan`), so one of the two rows is
left-padded, and its score must equal an unbatched, unpadded run of the model.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reference as ref
import torch
from families import qwen2_5_vl, qwen2_vl, qwen3_vl
from PIL import Image

import vlmtrace as vt

FAMILIES = {family.FAMILY.name: family.FAMILY for family in (qwen2_vl, qwen2_5_vl, qwen3_vl)}
REPLACEMENTS = {"shorter": "circle", "longer": "the circle shape"}  # "this shape" is 2 tokens


@functools.cache
def loaded(name: str) -> vt.VLM:
    model, processor = FAMILIES[name].build()
    return vt.wrap(model, processor, name=f"tiny-{name}")


def image() -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, size=(32, 32, 3), dtype=np.uint8))


def alone(vlm: vt.VLM, prompt: str, answer: int) -> float:
    inputs = dict(vlm.processor(text=[prompt], images=[image()], return_tensors="pt"))
    return ref.log_prob(vlm.model, lambda model, x: model(**x).logits[0, -1], inputs, answer)


@pytest.mark.parametrize("length", sorted(REPLACEMENTS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_left_padded_row_scores_what_it_scores_alone(name, length):
    vlm, family = loaded(name), FAMILIES[name]
    replacement = REPLACEMENTS[length]
    sample = vt.Sample(
        prompt=family.prompt,
        answer=family.answer,
        image=image(),
        spans={"visual": "this shape"},
        replacements={"visual": replacement},
        id=name,
    )
    ds = vt.patch(
        vlm,
        [sample],
        corruption=vt.ReplaceSpan("visual"),
        grid=vt.Grid(sites=("block",), positions="segments"),
        metric=vt.LogProb(),
        progress=False,
    )
    corrupted = family.prompt.replace("this shape", replacement)
    widths = {len(vlm.tokenizer(p).input_ids) for p in (family.prompt, corrupted)}
    assert len(widths) == 2, "both prompts have one length: no row is padded, nothing is tested"
    answer = vlm.tokenizer.convert_tokens_to_ids(family.answer)
    assert float(ds["clean"][0]) == pytest.approx(alone(vlm, family.prompt, answer), abs=1e-5)
    assert float(ds["corrupt"][0]) == pytest.approx(alone(vlm, corrupted, answer), abs=1e-5)


torch.set_num_threads(1)

"""Tiny random-weight VLMs of both families, built locally (no hub), and samples for them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmtrace as vt
from vlmtrace.models.build import build_blip, build_llava, word_tokenizer

WORDS = (
    "what colour is this shape the circle square which city did represent in year 2006 2007 ? "
    "red blue green paris rome tokyo of a"
).split()

torch.set_num_threads(1)  # tiny models gain nothing from more; avoids OpenMP spin under load


def random_image(seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="session")
def tiny_llava(tokenizer) -> vt.VLM:
    model, processor = build_llava(tokenizer, layers=3, seed=1)
    return vt.wrap(model, processor, name="tiny-llava")


@pytest.fixture(scope="session")
def tiny_blip(tokenizer) -> vt.VLM:
    model, processor = build_blip(tokenizer, layers=2, seed=2)
    # BLIP's 0.02-std init leaves a random model nearly blind to the image; larger weights
    # make image swaps move the answer, so patching comparisons have something to compare.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embeddings" not in name:
                parameter.normal_(0.0, 0.15, generator=generator)
    return vt.wrap(model, processor, name="tiny-blip")


@pytest.fixture
def llava_sample() -> vt.Sample:
    return vt.Sample(
        prompt="<image> which city did this shape represent in year 2006 ?",
        answer="paris",
        image=random_image(0),
        spans={"visual": "this shape", "textual": "year 2006"},
        replacements={"visual": "the circle", "textual": "year 2007"},
        image_pair=random_image(1),
        foil="rome",
        id="q0",
    )


@pytest.fixture
def blip_sample(llava_sample) -> vt.Sample:
    return llava_sample.with_(prompt="which city did this shape represent in year 2006 ?")

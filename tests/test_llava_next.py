"""LLaVA-NeXT (any-resolution tiles) runs through the same LLaVA adapter, unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import vlmtrace as vt
from vlmtrace.models.build import build_llava_next


@pytest.fixture(scope="module")
def tiny_next(tokenizer) -> vt.VLM:
    model, processor = build_llava_next(tokenizer, layers=3, seed=4)
    return vt.wrap(model, processor, name="tiny-llava-next")


def test_image_tokens_are_counted_from_the_processor_not_assumed(tiny_next, llava_sample):
    ds = vt.patch(
        tiny_next,
        [llava_sample],
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("block",), layers=(0,)),
        progress=False,
    )
    labels = list(ds["label"].sel(sample="q0").values)
    inputs = tiny_next.processor(text=[llava_sample.prompt], images=[llava_sample.image], return_tensors="pt")
    expected = int((inputs["input_ids"] == tiny_next.shape.image_token_id).sum())
    assert labels.count("image") == expected > 16  # tiles + row newlines: more than LLaVA-1.5's 16


def test_restoring_every_position_at_layer_0_recovers_clean_logits(tiny_next, llava_sample):
    grid = vt.Grid(sites=("block",), layers=(0,), positions="all")
    ds = vt.patch(
        tiny_next, [llava_sample], corruption=vt.ImagePair(), grid=grid, metric=vt.KL(), progress=False
    )
    assert float(ds["block"].squeeze()) == 0.0
    assert float(ds["corrupt"].squeeze()) > 0.0


def test_prefix_reuse_equals_the_full_forward_on_llava_next(tiny_next, llava_sample):
    # NeXT encodes several tiles per image, so its vision output is not reused row by row;
    # layers and the text suffix still are
    kwargs = dict(corruption=vt.ImagePair(), grid=vt.Grid(sites=("block", "attn")), progress=False)
    full = vt.patch(tiny_next, [llava_sample], **kwargs)
    reused = vt.patch(tiny_next, [llava_sample], reuse_prefix=True, **kwargs)
    for name in ("block", "attn", "clean", "corrupt"):
        np.testing.assert_allclose(reused[name].values, full[name].values, atol=1e-6, rtol=0, err_msg=name)

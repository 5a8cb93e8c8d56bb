"""Cross-attention knockout where the mask and the keys arrive under other names than BLIP's.

Mllama's `cross_attn` receives its mask as `attention_mask` and the image's states as
`cross_attention_states`, in its cross-attention layers only; T5's decoder cross-attention
(BLIP-2 with Flan-T5) receives them as `attention_mask` and `key_value_states`. Each knockout is
compared with one unbatched row of the model's own forward and a plain pre-hook that blocks the
same (query, key) entries of the mask it finds.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from families import blip2_t5, mllama
from PIL import Image

import vlmtrace as vt

TOLERANCE = 1e-5


def picture(seed: int, size=(32, 32)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sample(family) -> vt.Sample:
    return vt.Sample(
        prompt=family.prompt,
        answer="paris",
        image=picture(0),
        spans={"visual": "this shape"},
        id=family.name,
    )


def blocking(queries, keys, states_keyword):
    """A pre-hook setting the mask entries (query, key) of the one row to -inf (its own copy); with
    no mask (no padding), a zero one [1, 1, query, key] over the states it cross-attends to."""

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if mask is None:
            queries_in = (args[0] if args else kwargs["hidden_states"]).shape[-2]
            mask = torch.zeros(1, 1, queries_in, kwargs[states_keyword].shape[-2])
        mask = mask.clone()
        for q in queries:
            mask[0, :, q, keys] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def knocked_log_prob(vlm, family, module_paths, queries, keys, states_keyword) -> float:
    inputs = dict(vlm.processor(text=[family.prompt], images=[picture(0)], return_tensors="pt"))
    answer = vlm.tokenizer.convert_tokens_to_ids("paris")

    def hooks(registered):
        for path in module_paths:
            registered.pre(vlm.model.get_submodule(path), blocking(queries, keys, states_keyword))

    return ref.log_prob(vlm.model, family.score, inputs, answer, hooks)


def visual_positions(vlm, family) -> list[int]:
    ids = vlm.processor(text=[family.prompt], images=[picture(0)])["input_ids"][0]
    this = vlm.tokenizer.convert_tokens_to_ids("this")
    return [ids.index(this), ids.index(this) + 1]


HALF_A_TILE = 8
"""Keys 0..7: the first 8 of tile 0's 17 patch states (the tiny Mllama's 4x4 patches and CLS)."""


def first_patches(sample, segments) -> list[int]:
    return list(range(HALF_A_TILE))


@pytest.fixture(scope="module")
def tiny_mllama() -> vt.VLM:
    model, processor = mllama.FAMILY.build()
    return vt.wrap(model, processor, name="tiny-mllama")


def test_mllama_text_to_image_knockout_equals_plain_hooks_in_the_cross_attention_layers(tiny_mllama):
    vlm, family = tiny_mllama, mllama.FAMILY
    ds = vt.knockout(
        vlm,
        [sample(family)],
        blocks={"patches->visual": (first_patches, "visual"), "image->visual": ("image", "visual")},
        attention="cross",
        windows=(1, 3),
        metric=vt.LogProb(),
        progress=False,
    )
    visual = visual_positions(vlm, family)
    cross_layers = vlm.shape.cross_attention_layers["lm"]
    assert cross_layers == (1,)
    paths = [f"model.language_model.layers.{i}.cross_attn" for i in cross_layers]
    for block, keys in (("patches->visual", list(range(HALF_A_TILE))), ("image->visual", slice(None))):
        expected = knocked_log_prob(vlm, family, paths, visual, keys, "cross_attention_states")
        for window in (1, 3):
            got = float(ds["knockout"].sel(block=block, window=window, layer=1).squeeze())
            assert got == pytest.approx(expected, abs=TOLERANCE), (block, window)
        assert abs(expected - float(ds["clean"][0])) > 1e-4, f"{block} changes nothing: nothing is tested"
    # a cell centred on a self-attention layer would cut no cross-attention edge: NaN, not "no effect"
    assert np.isnan(ds["knockout"].sel(layer=[0, 2]).values).all()


@pytest.fixture(scope="module")
def tiny_blip2_t5() -> vt.VLM:
    model, processor = blip2_t5.FAMILY.build()
    return vt.wrap(model, processor, name="tiny-blip2_t5")


def test_t5_decoder_to_prompt_knockout_equals_plain_hooks(tiny_blip2_t5):
    vlm, family = tiny_blip2_t5, blip2_t5.FAMILY
    ds = vt.knockout(
        vlm,
        [sample(family)],
        blocks={"image->start": ("image", "start")},
        stack="decoder",
        attention="cross",
        windows=(1,),
        metric=vt.LogProb(),
        progress=False,
    )
    ids = vlm.processor(text=[family.prompt], images=[picture(0)])["input_ids"][0]
    image = [i for i, t in enumerate(ids) if t == vlm.model.config.image_token_index]
    for layer in range(vlm.shape.layers["decoder"]):
        path = f"language_model.decoder.block.{layer}.layer.1"
        expected = knocked_log_prob(vlm, family, [path], [0], image, "key_value_states")
        got = float(ds["knockout"].sel(block="image->start", layer=layer).squeeze())
        assert got == pytest.approx(expected, abs=TOLERANCE), layer
        assert abs(expected - float(ds["clean"][0])) > 1e-4, "the knockout changes nothing: nothing is tested"

"""BLIP-2 / InstructBLIP with Flan-T5: the answer decoder's sites against plain torch hooks.

The family tests (`test_families.py`) trace the T5 encoder, where the image tokens are. The answer
is predicted by the T5 decoder, which reads the encoded prompt only through cross-attention: here
every site of the decoder stack (self-attention, cross-attention, MLP, block, heads) is restored
from the clean run into the image-pair run at the decoder's start token, in each layer, and must
equal the same restoration made with plain hooks on one unbatched row.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reference as ref
import torch
from families import blip2_t5, instructblip_t5
from PIL import Image
from reference import At

import vlmtrace as vt

FAMILIES = {family.FAMILY.name: family.FAMILY for family in (blip2_t5, instructblip_t5)}
LAYER = "language_model.decoder.block.{i}"
DECODER_SITES = {
    "block": At(LAYER, index=0),
    "attn": At(LAYER + ".layer.0.SelfAttention", index=0),
    "cross_attn": At(LAYER + ".layer.1.EncDecAttention", index=0),
    "mlp": At(LAYER + ".layer.2.DenseReluDense"),
    "attn_head": At(LAYER + ".layer.0.SelfAttention.o", side="input"),
    "cross_attn_head": At(LAYER + ".layer.1.EncDecAttention.o", side="input"),
}
HEAD = 1


@functools.cache
def loaded(name: str) -> vt.VLM:
    model, processor = FAMILIES[name].build()
    return vt.wrap(model, processor, name=f"tiny-{name}")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=(32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_decoder_site_equals_the_plain_torch_reference(name):
    vlm, family = loaded(name), FAMILIES[name]
    sample = vt.Sample(prompt=family.prompt, answer="paris", image=picture(0), image_pair=picture(1), id=name)
    ds = vt.patch(
        vlm,
        [sample],
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=tuple(DECODER_SITES), stack="decoder", heads=(HEAD,)),
        metric=vt.LogProb(),
        progress=False,
    )
    clean_inputs, corrupt_inputs = (
        dict(vlm.processor(text=[family.prompt], images=[image], return_tensors="pt"))
        for image in (picture(0), picture(1))
    )
    answer = vlm.tokenizer.convert_tokens_to_ids("paris")
    heads = vlm.shape.heads["decoder"]
    assert float(ds["clean"][0]) == pytest.approx(
        ref.log_prob(vlm.model, family.score, clean_inputs, answer), abs=1e-5
    )
    corrupt = ref.log_prob(vlm.model, family.score, corrupt_inputs, answer)
    assert float(ds["corrupt"][0]) == pytest.approx(corrupt, abs=1e-5)
    for site, at in DECODER_SITES.items():
        head = HEAD if site.endswith("_head") else None
        moved = 0.0  # layer 0's self-attention reads only the start token: the image cannot reach it
        for layer in range(vlm.shape.layers["decoder"]):
            source = ref.record(vlm.model, family.score, clean_inputs, at, [layer])

            def restore(registered, at=at, layer=layer, source=source, head=head):
                ref.replace(registered, vlm.model, at, layer, 0, 1, source[layer], head, heads)

            expected = ref.log_prob(vlm.model, family.score, corrupt_inputs, answer, restore)
            cell = ds[site].sel(layer=layer, window=1).isel(sample=0, position=0)
            got = float(cell.sel(head=HEAD) if head is not None else cell)
            assert got == pytest.approx(expected, abs=1e-5), (site, layer)
            moved = max(moved, abs(expected - corrupt))
        assert moved > 1e-4, f"restoring {site} changes nothing in any layer: nothing is tested"


torch.set_num_threads(1)

"""BLIP-VQA: padded rows, knockout in both stacks, cross-attention knockout; against plain torch.

transformers 5.x drops the answer decoder's cross-attention mask, so a left-padded question
changed the answer (`vlmtrace.models.blip.give_cross_attention_its_mask`). The references here
run one unpadded row with the model's own forward and plain hooks.
"""

from __future__ import annotations

import pytest
import torch

import vlmtrace as vt
from vlmtrace.models.blip import forward as blip_forward

LONGER = "the red circle"  # three tokens for two: the corrupted row is longer, the clean one padded


def probability(vlm, sample, prompt, hooks=()):
    """P(answer) of one unpadded row, through the model's own modules, with plain hooks."""
    inputs = vlm.processor(images=[sample.image], text=[prompt], return_tensors="pt")
    start = torch.tensor([[vlm.tokenizer.bos_token_id]])
    handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in hooks]
    try:
        with torch.no_grad():
            logits = blip_forward(
                vlm.model,
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                decoder_input_ids=start,
                decoder_attention_mask=torch.ones_like(start),
            )
    finally:
        for handle in handles:
            handle.remove()
    answer = vlm.tokenizer.convert_tokens_to_ids(sample.answer)
    return logits[0, 0].softmax(-1)[answer].item()


def test_a_padded_blip_row_scores_what_it_scores_alone(tiny_blip, blip_sample):
    sample = blip_sample.with_(replacements={"visual": LONGER})
    ds = vt.patch(
        tiny_blip, [sample], corruption=vt.ReplaceSpan("visual"), grid=vt.Grid(layers=(0,)), progress=False
    )
    alone = probability(tiny_blip, sample, sample.prompt)
    corrupt = probability(tiny_blip, sample, sample.prompt.replace("this shape", LONGER))
    assert float(ds["clean"][0]) == pytest.approx(alone, abs=1e-6)  # the clean row is left-padded
    assert float(ds["corrupt"][0]) == pytest.approx(corrupt, abs=1e-6)


def _block(queries, keys=None):
    """A pre-hook blocking `queries` from `keys` (None: every key) in the mask it finds."""

    def hook(module, args, kwargs):
        name = (
            "encoder_attention_mask" if kwargs.get("encoder_hidden_states") is not None else "attention_mask"
        )
        states = args[0] if args else kwargs["hidden_states"]
        keys_from = kwargs["encoder_hidden_states"] if name == "encoder_attention_mask" else states
        mask = kwargs[name]
        if mask is None:  # no padding anywhere: the model passes no mask
            mask = torch.zeros(1, 1, 1, keys_from.shape[1], dtype=states.dtype)
        mask = mask.expand(1, 1, states.shape[1], mask.shape[-1]).clone()
        for q in queries:
            if keys is None:
                mask[0, :, q, :] = torch.finfo(mask.dtype).min
            else:
                for k in keys:
                    mask[0, :, q, k] = torch.finfo(mask.dtype).min
        kwargs[name] = mask
        return args, kwargs

    return hook


def test_question_to_image_cross_attention_knockout_equals_plain_hooks(tiny_blip, blip_sample):
    ds = vt.knockout(
        tiny_blip,
        [blip_sample],
        blocks={"image->visual": ("image", "visual")},
        attention="cross",
        windows=(1,),
        progress=False,
    )
    ids = tiny_blip.processor(text=[blip_sample.prompt], images=[blip_sample.image])["input_ids"][0]
    this = tiny_blip.tokenizer.convert_tokens_to_ids("this")
    visual = [ids.index(this), ids.index(this) + 1]
    for layer in range(tiny_blip.shape.layers["encoder"]):
        module = tiny_blip.model.get_submodule(f"text_encoder.encoder.layer.{layer}.crossattention.self")
        expected = probability(tiny_blip, blip_sample, blip_sample.prompt, [(module, _block(visual))])
        got = float(ds["knockout"].sel(layer=layer).squeeze())
        assert got == pytest.approx(expected, abs=1e-6), layer
    assert abs(float(ds["knockout"].isel(layer=0).squeeze()) - float(ds["clean"][0])) > 1e-5


def test_knockout_in_the_answer_decoder_stack_runs_and_blocks_the_question(tiny_blip, blip_sample):
    ds = vt.knockout(
        tiny_blip,
        [blip_sample],
        blocks={"question->start": (("question", "visual", "textual", "last"), "start")},
        stack="decoder",
        attention="cross",
        progress=False,
    )
    assert ds["knockout"].dims == ("sample", "block", "window", "layer")
    assert abs(float(ds["knockout"].isel(layer=0).squeeze()) - float(ds["clean"][0])) > 1e-4


def test_cross_attention_knockout_stores_the_question_positions_it_cut_and_says_keys_are_all_patches(
    tiny_blip, blip_sample
):
    ds = vt.knockout(
        tiny_blip,
        [blip_sample],
        blocks={"image->visual": ("image", "visual")},
        attention="cross",
        layers=(0,),
        progress=False,
    )
    ids = tiny_blip.processor(text=[blip_sample.prompt], images=[blip_sample.image])["input_ids"][0]
    this = ids.index(tiny_blip.tokenizer.convert_tokens_to_ids("this"))
    cut = ds["query_blocked"].sel(block="image->visual").squeeze("sample").values
    assert list(cut.nonzero()[0]) == [this, this + 1] and len(cut) == len(ids)
    assert "key_blocked" not in ds and ds.attrs["blocked_keys"].startswith("every image patch")

"""Every patching site equals an independent oracle written with plain torch forward hooks.

The oracle knows nothing of vlmtrace's engine: it runs the HF model directly, caches the
clean activation with a hook, and replays it into the corrupted run one cell at a time,
with module paths written out by hand for each family.
"""

from __future__ import annotations

import pytest
import torch

import vlmtrace as vt

LLAVA_PATHS = {  # site -> (module path in layer i, side, tuple index)
    "block": ("model.language_model.layers.{i}", "output", None),
    "attn": ("model.language_model.layers.{i}.self_attn", "output", 0),
    "mlp": ("model.language_model.layers.{i}.mlp", "output", None),
    "attn_head": ("model.language_model.layers.{i}.self_attn.o_proj", "input", None),
}
BLIP_ENCODER = "text_encoder.encoder.layer.{i}"
BLIP_PATHS = {
    "block": (BLIP_ENCODER, "output", None),
    "attn": (BLIP_ENCODER + ".attention.output.dense", "output", None),
    "cross_attn": (BLIP_ENCODER + ".crossattention.output.dense", "output", None),
    "mlp": (BLIP_ENCODER + ".output.dense", "output", None),
    "attn_head": (BLIP_ENCODER + ".attention.output.dense", "input", None),
    "cross_attn_head": (BLIP_ENCODER + ".crossattention.output.dense", "input", None),
}


def llava_log_prob(model, inputs, answer_id):
    logits = model(**inputs).logits[0, -1]
    return torch.log_softmax(logits, -1)[answer_id].item()


def blip_log_prob(model, inputs, answer_id, start_id):
    image = model.vision_model(pixel_values=inputs["pixel_values"])[0]
    question = model.text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
    )[0]
    start = torch.tensor([[start_id]])
    logits = model.text_decoder(
        input_ids=start,
        encoder_hidden_states=question,
        encoder_attention_mask=inputs["attention_mask"],
        reduction="none",
    ).logits[0, 0]
    return torch.log_softmax(logits, -1)[answer_id].item()


def oracle(model, clean, corrupt, score, path, side, index, layer, position, head, n_heads):
    """Plain torch: cache the clean activation, then patch it into the corrupted run."""
    module = model.get_submodule(path.format(i=layer))
    cache = {}

    def pick(args, output):
        value = args[0] if side == "input" else output
        return value[index] if index is not None else value

    def record(mod, args, output=None):
        cache["clean"] = pick(args, output).detach().clone()

    def replace(mod, args, output=None):
        value = pick(args, output)
        if head is None:
            value[0, position] = cache["clean"][0, position]
        else:
            width = value.shape[-1] // n_heads
            span = slice(head * width, (head + 1) * width)
            value[0, position, span] = cache["clean"][0, position, span]

    register = module.register_forward_pre_hook if side == "input" else module.register_forward_hook
    with torch.no_grad():
        handle = register(record)
        score(clean)
        handle.remove()
        handle = register(replace)
        value = score(corrupt)
        handle.remove()
    return value


def compare(vlm, sample, paths, site, score, processor_call):
    ds = vt.patch(
        vlm,
        [sample],
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=(site,)),
        metric=vt.LogProb(),
        progress=False,
    )
    clean = processor_call(sample.image)
    corrupt = processor_call(sample.image_pair)
    path, side, index = paths[site]
    n_heads = vlm.shape.heads[vlm.adapter.default_stack]
    got = ds[site].isel(sample=0, window=0)
    expected = torch.zeros(got.shape, dtype=torch.float64)
    for li, layer in enumerate(got.layer.values):
        heads = list(got["head"].values) if "head" in got.dims else [None]
        for hi, head in enumerate(heads):
            for position in range(got.sizes["position"]):
                value = oracle(
                    vlm.model, clean, corrupt, score, path, side, index, int(layer), position, head, n_heads
                )
                where = (li, hi, position) if head is not None else (li, position)
                expected[where] = value
    assert float(ds["corrupt"][0]) == pytest.approx(score(corrupt), abs=1e-5)
    return torch.tensor(got.values), expected


@pytest.mark.parametrize("site", list(LLAVA_PATHS))
def test_llava_site_equals_plain_torch_hook_oracle(tiny_llava, llava_sample, site):
    vlm = tiny_llava
    answer = vlm.tokenizer.convert_tokens_to_ids(llava_sample.answer)

    def call(image):
        return vlm.processor(text=[llava_sample.prompt], images=[image], return_tensors="pt")

    got, expected = compare(
        vlm, llava_sample, LLAVA_PATHS, site, lambda x: llava_log_prob(vlm.model, x, answer), call
    )
    assert expected.std() > 1e-4, "the oracle's cells do not vary: the comparison would prove nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", list(BLIP_PATHS))
def test_blip_encoder_site_equals_plain_torch_hook_oracle(tiny_blip, blip_sample, site):
    vlm = tiny_blip
    answer = vlm.tokenizer.convert_tokens_to_ids(blip_sample.answer)
    start = vlm.tokenizer.bos_token_id

    def call(image):
        return vlm.processor(images=[image], text=[blip_sample.prompt], return_tensors="pt")

    got, expected = compare(
        vlm, blip_sample, BLIP_PATHS, site, lambda x: blip_log_prob(vlm.model, x, answer, start), call
    )
    assert expected.std() > 1e-5, "the oracle's cells do not vary: the comparison would prove nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

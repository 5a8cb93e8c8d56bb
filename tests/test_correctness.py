"""Samples the model answers wrongly are found in batched forwards and left out before any sweep.

The reference is one plain forward per sample: the processor's encoding of one unpadded row and
the model's own forward (BLIP: its vision model, question encoder and answer decoder), the
argmax of the next-token logits. The check batches rows of prompts of different lengths.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import vlmtrace as vt
import vlmtrace.recipes as registry
from vlmtrace.cli import app
from vlmtrace.data import synthetic_samples
from vlmtrace.data.correctness import KEEP_WRONG, WRONG, check_answers, top_tokens
from vlmtrace.data.mascots import CITIES
from vlmtrace.models.blip import forward as blip_forward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # real words' answers are cut to a byte


@pytest.fixture(scope="module", params=["shapes-llava", "shapes-qwen", "shapes-blip"])
def organism(request) -> vt.VLM:
    return vt.load(request.param)


@pytest.fixture(scope="module")
def llava() -> vt.VLM:
    return vt.load("shapes-llava")


def mixed(vlm: vt.VLM) -> list[vt.Sample]:
    """Questions of several lengths ("how many shapes are there ?" is the shortest)."""
    return synthetic_samples(vlm, "visual", 6, seed=3) + synthetic_samples(vlm, "multi", 3, seed=3)


@torch.no_grad()
def plain_top_token(vlm: vt.VLM, sample: vt.Sample) -> int:
    inputs = vlm.processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
    if vlm.adapter.family == "blip":
        start = torch.tensor([[vlm.tokenizer.bos_token_id]])
        logits = blip_forward(
            vlm.model,
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            decoder_input_ids=start,
            decoder_attention_mask=torch.ones_like(start),
        )
    else:
        logits = vlm.model(**inputs).logits
    return int(logits[0, -1].argmax())


def test_batched_top_tokens_equal_one_plain_forward_per_sample(organism):
    samples = mixed(organism)
    assert len({len(s.prompt.split()) for s in samples}) > 1  # the batch pads
    batched = top_tokens(organism, samples, max_batch=4)  # three forwards, the last one short
    assert batched == [plain_top_token(organism, s) for s in samples]


def wrong_city(sample: vt.Sample) -> vt.Sample:
    return sample.with_(answer=next(c for c in CITIES if c != sample.answer), id=sample.id + "-wrong")


def test_a_sample_whose_answer_is_not_the_models_top_token_is_answered_wrongly(llava):
    samples = synthetic_samples(llava, "fact", 4, seed=0)
    checked = check_answers(llava, samples + [wrong_city(s) for s in samples])
    said = [llava.tokenizer.decode([plain_top_token(llava, s)]).strip() for s in samples]
    assert [s.id for s in checked.right] == [s.id for s in samples]
    assert [(s.id, what) for s, what in checked.wrong] == [
        (s.id + "-wrong", what) for s, what in zip(samples, said, strict=True)
    ]


def test_usable_leaves_out_wrong_answers_and_counts_them_unless_told_to_keep_them(llava):
    recipe = registry.get("information_flow")
    samples = synthetic_samples(llava, "fact", 6, seed=0)
    samples[1], samples[4] = wrong_city(samples[1]), wrong_city(samples[4])
    prepared = registry.usable(recipe, llava, samples)
    kept = registry.usable(recipe, llava, samples, keep_wrong=True)
    assert [s.id for s in prepared.samples] == [samples[i].id for i in (0, 2, 3, 5)]
    assert prepared.left_out == {WRONG: [samples[1].id, samples[4].id]}
    assert "answered wrongly" in prepared.report()
    assert len(kept.samples) == 6 and not kept.left_out


def test_a_run_left_with_no_sample_names_keep_wrong(tmp_path):
    import layouts

    data = layouts.gqa(tmp_path / "gqa")  # real words: the organism answers none of them
    result = CliRunner().invoke(
        app, ["recipe", "information_flow", "--data", str(data), "--out", str(tmp_path / "x.zarr")]
    )
    assert result.exit_code == 2 and "kept 0" in result.output
    assert f"{WRONG}: {KEEP_WRONG}" in " ".join(result.output.split()) and "--keep-wrong" in result.output

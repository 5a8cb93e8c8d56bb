"""Specification of `shapes-qwen`, the Qwen2-VL organism: what differs from LLaVA holds end to end.

The generic organism specification (`tests/test_zoo.py`: held-out accuracy at 300 questions,
image pairs and phrase replacement drop P(answer), restoring the corrupted stream recovers the
clean run, training is deterministic) covers it with the other organisms. Here: the Qwen-VL
mechanics it exists to exercise (M-RoPE positions made by the model under left padding, flat
image tokens through the merger, a processor saved and loaded without its video half, since
every Qwen video processor needs torchvision) and a recipe from the command line.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import vlmtrace as vt
from vlmtrace.cli import app
from vlmtrace.data.scenes import make_samples
from vlmtrace.models.zoo import held_out_accuracy, load_organism, train
from vlmtrace.models.zoo.answering import answer_probability, next_token_probabilities
from vlmtrace.models.zoo.evaluation import TARGETS

NAME = "shapes-qwen"


@pytest.fixture(scope="module")
def organism():
    return load_organism(NAME)


def test_vt_load_gives_the_qwen2_vl_adapter_whose_positions_the_model_makes():
    vlm = vt.load(NAME)
    assert (vlm.adapter.family, vlm.adapter.positions, vlm.shape.layers["lm"]) == ("qwen2_vl", "model", 6)


def test_the_processor_loads_image_only_and_expands_the_image_to_16_flat_tokens(organism):
    _, processor = organism
    sample = make_samples("multi", 1, seed=0)[0]
    inputs = processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
    assert processor.video_processor is None
    assert int(inputs["mm_token_type_ids"].sum()) == 16 and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(inputs["pixel_values"].shape) == (64, 3 * 2 * 4 * 4)  # patches, no batch dimension


def test_a_retrained_directory_saves_its_processor_image_only_and_loads_again(tmp_path):
    out = train(NAME, tmp_path / NAME, steps=2, progress=False, held_out=0)
    _, processor = load_organism(out)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.video_processor is None


def test_held_out_accuracy_on_100_questions_per_family_reaches_the_targets(organism):
    accuracies = held_out_accuracy(*organism, n=100)
    assert all(accuracies[f] >= t for f, t in TARGETS.items()), accuracies


def test_a_left_padded_question_scores_what_it_scores_alone(organism):
    model, processor = organism
    short, long = make_samples("visual", 1, seed=0)[0], make_samples("multi", 1, seed=0)[0]
    together = next_token_probabilities(model, processor, [short, long])
    alone = next_token_probabilities(model, processor, [short])
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=0)


def test_swapping_in_the_image_pair_drops_p_answer_by_half(organism):
    model, processor = organism
    samples = [s for s in make_samples("multi", 24, seed=1) if s.image_pair is not None]
    clean = answer_probability(model, processor, samples)
    corrupted = answer_probability(model, processor, [s.with_(image=s.image_pair) for s in samples])
    assert (clean - corrupted).mean() >= 0.5


def test_replacing_the_visual_phrase_drops_p_answer_by_half(organism):
    model, processor = organism
    samples = [s for s in make_samples("fact", 24, seed=1) if "visual" in s.replacements]
    clean = answer_probability(model, processor, samples)
    replaced = [
        s.with_(prompt=s.prompt.replace(s.spans["visual"], s.replacements["visual"], 1)) for s in samples
    ]
    assert (clean - answer_probability(model, processor, replaced)).mean() >= 0.5


def test_cli_multi_constraint_on_8_samples_writes_a_store(tmp_path):
    out = tmp_path / "multi.zarr"
    args = ["recipe", "multi_constraint", "--model", NAME, "--n-samples", "8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ds = vt.open_result(out)
    assert ds.attrs["recipe"] == "multi_constraint" and ds.sizes["sample"] == 8

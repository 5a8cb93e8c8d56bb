"""The Qwen2-VL organism architecture (`shapes-qwen` spec) is built, trained, saved and traced end to end.

Its weights are not shipped yet (the catalogue comment in `vlmtrace.models.zoo.organisms` says
what training measured), so these tests use a directory written by a 2-step `train`: they
specify the mechanics, not accuracy. What differs from LLaVA must hold: M-RoPE positions made
by the model under left padding, flat image tokens through the merger, and a processor saved
and loaded without its video half (every Qwen video processor needs torchvision).
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import vlmtrace as vt
from vlmtrace.cli import app
from vlmtrace.data.scenes import make_samples
from vlmtrace.models.zoo import load_organism, train
from vlmtrace.models.zoo.answering import next_token_probabilities

NAME = "shapes-qwen"


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return train(NAME, tmp_path_factory.mktemp("qwen") / NAME, steps=2, progress=False, held_out=0)


def test_vt_load_of_a_trained_directory_gives_the_qwen2_vl_adapter_whose_positions_the_model_makes(
    directory,
):
    vlm = vt.load(str(directory))
    assert (vlm.adapter.family, vlm.adapter.positions, vlm.shape.layers["lm"]) == ("qwen2_vl", "model", 6)


def test_the_saved_processor_loads_image_only_and_expands_the_image_to_16_flat_tokens(directory):
    _, processor = load_organism(directory)
    sample = make_samples("multi", 1, seed=0)[0]
    inputs = processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
    assert processor.video_processor is None
    assert int(inputs["mm_token_type_ids"].sum()) == 16 and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(inputs["pixel_values"].shape) == (64, 3 * 2 * 4 * 4)  # patches, no batch dimension


def test_a_left_padded_question_scores_what_it_scores_alone(directory):
    model, processor = load_organism(directory)
    short, long = make_samples("visual", 1, seed=0)[0], make_samples("multi", 1, seed=0)[0]
    together = next_token_probabilities(model, processor, [short, long])
    alone = next_token_probabilities(model, processor, [short])
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=0)


def test_cli_multi_constraint_on_8_samples_writes_a_store(directory, tmp_path):
    out = tmp_path / "multi.zarr"
    args = ["recipe", "multi_constraint", "--model", str(directory), "--n-samples", "8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ds = vt.open_result(out)
    assert ds.attrs["recipe"] == "multi_constraint" and ds.sizes["sample"] == 8

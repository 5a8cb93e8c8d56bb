"""Specification of `vlmtrace calibrate`: its scores, its ground truth, and the command end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

import vlmtrace as vt
from vlmtrace.calibration import auroc, curve_areas, faithfulness, precision_recall
from vlmtrace.calibration.faithfulness import circuit_values, space_of
from vlmtrace.calibration.methods import where_of
from vlmtrace.calibration.run import with_foil
from vlmtrace.calibration.scores import circuit_sizes
from vlmtrace.calibration.truth import (
    IMAGE_ROUTE,
    TEXT_ROUTE,
    Where,
    is_planted_block,
    is_planted_cell,
    planted_keys,
)
from vlmtrace.cli import app
from vlmtrace.data.planted import make_planted_samples
from vlmtrace.models.zoo import PLANTED

MECHANISM = PLANTED["planted-llava"].mechanism  # colour L1.H2, city L2 MLP, answer L4.H1


def test_auroc_counts_ordered_pairs_and_half_ties():
    # planted 0.9 and 0.4 against unplanted 0.4 and 0.1: pairs 1, 1, 0.5, 1 -> 3.5 / 4
    assert auroc(np.array([0.9, 0.4, 0.4, 0.1]), np.array([True, False, True, False])) == 0.875


def test_auroc_is_one_for_a_perfect_ranking_zero_for_a_reversed_one_and_nan_without_negatives():
    truth = np.array([True, False, False])
    assert auroc(np.array([3.0, 2.0, 1.0]), truth) == 1.0
    assert auroc(np.array([1.0, 2.0, 3.0]), truth) == 0.0
    assert math.isnan(auroc(np.array([1.0]), np.array([True])))


def test_auroc_ranks_nan_scores_lowest():
    assert auroc(np.array([0.1, np.nan]), np.array([True, False])) == 1.0


def test_precision_and_recall_of_returned_cells():
    returned = np.array([True, True, False, True])
    truth = np.array([True, False, True, False])
    assert precision_recall(returned, truth) == (1 / 3, 1 / 2)
    precision, recall = precision_recall(np.zeros(4, bool), truth)
    assert math.isnan(precision) and recall == 0


def test_faithfulness_is_the_share_of_the_gap_recovered():
    assert faithfulness(circuit=3.0, empty=1.0, full=5.0) == 0.5
    assert math.isnan(faithfulness(circuit=3.0, empty=2.0, full=2.0))


def test_cpr_and_cmd_are_mib_trapezoids_over_the_shares():
    # f = 0, 1, 1 at shares 0, 0.5, 1: CPR = 0.5 * 0.5 + 0.5 * 1 = 0.75; CMD = 0.5 * 0.5 = 0.25
    assert curve_areas([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == (0.75, 0.25)
    # overshooting counts against CMD too
    assert curve_areas([0.0, 1.0], [2.0, 1.0]) == (1.5, 0.5)


def test_circuit_sizes_keep_at_least_one_component_and_round_up():
    assert circuit_sizes(150, (0.001, 0.01, 0.1, 1.0)) == [1, 2, 15, 150]


def _where():
    sample = make_planted_samples(1, seed=0)[0]
    labels = ["image"] * 16 + ["visual", "visual"] + ["question"] * 6 + ["last"]
    return sample, Where.of(sample, labels)


def test_where_finds_the_constraint_the_last_position_and_the_selected_shape():
    sample, where = _where()
    row, column = sample.meta["scene"][sample.meta["selected"]]["cell"]
    assert (where.constraint, where.last, where.selected_image) == (17, 24, row * 4 + column)


def test_planted_cells_are_the_assigned_components_where_they_act():
    _, where = _where()
    cell = dict(mechanism=MECHANISM, where=where, head=None, route_kind=IMAGE_ROUTE, n_layers=6)
    assert is_planted_cell(site="mlp", layers=(2,), positions=(17,), **cell)
    assert not is_planted_cell(site="mlp", layers=(2,), positions=(24,), **cell)
    assert is_planted_cell(site="mlp", layers=(1, 2, 3), positions=(17,), **cell)  # a window over it
    assert is_planted_cell(site="attn", layers=(4,), positions=(24,), **cell)
    assert not is_planted_cell(site="attn", layers=(2,), positions=(17,), **cell)
    head = dict(cell, head=1)
    assert is_planted_cell(site="attn_head", layers=(4,), positions=(24,), **head)
    assert not is_planted_cell(site="attn_head", layers=(1,), positions=(17,), **head)  # L1's is head 2


def test_the_residual_route_follows_the_corrupted_variable():
    _, where = _where()
    cell = dict(mechanism=MECHANISM, where=where, head=None, n_layers=6, site="block")
    image = where.selected_image
    assert is_planted_cell(layers=(0,), positions=(image,), route_kind=IMAGE_ROUTE, **cell)
    assert not is_planted_cell(layers=(0,), positions=(image,), route_kind=TEXT_ROUTE, **cell)
    assert is_planted_cell(layers=(0,), positions=(17,), route_kind=TEXT_ROUTE, **cell)
    assert is_planted_cell(layers=(3,), positions=(17,), route_kind=IMAGE_ROUTE, **cell)
    assert is_planted_cell(layers=(4,), positions=(24,), route_kind=IMAGE_ROUTE, **cell)
    assert not is_planted_cell(layers=(4,), positions=(17,), route_kind=IMAGE_ROUTE, **cell)


def test_knockout_blocks_are_planted_where_they_cut_a_planted_head_reading():
    _, where = _where()
    image = list(where.segments["image"])
    assert is_planted_block(MECHANISM, where, layers=(1,), keys=image, queries=[16, 17])
    assert not is_planted_block(MECHANISM, where, layers=(2,), keys=image, queries=[16, 17])
    assert is_planted_block(MECHANISM, where, layers=(3, 4, 5), keys=[16, 17], queries=[24])
    assert not is_planted_block(MECHANISM, where, layers=(4,), keys=image, queries=[24])


@pytest.fixture(scope="module")
def llava():
    return vt.load("planted-llava")


@pytest.mark.parametrize("corruption", ["image_pair", "str"])
def test_the_planted_circuit_alone_recovers_most_of_the_answer_and_a_shifted_one_none(llava, corruption):
    samples = with_foil(make_planted_samples(2, seed=0), corruption)
    where = [where_of(llava, s) for s in samples]
    text = range(16, 25)  # the prompt's text positions (after 16 image tokens)
    space = space_of("attn_head", layers=6, heads=4, positions=text) + space_of(
        "mlp", layers=6, heads=4, positions=text
    )
    chosen = vt.ImagePair() if corruption == "image_pair" else vt.SymmetricTokenReplacement("visual")
    for sample, w in zip(samples, where, strict=True):
        planted_circuit = planted_keys(MECHANISM, w)
        one_layer_up = {(site, (layer + 1) % 6, p, head) for site, layer, p, head in planted_circuit}
        full, empty, (planted, wrong, everything) = circuit_values(
            llava, sample, chosen, space, [planted_circuit, one_layer_up, set(space)]
        )
        assert everything == pytest.approx(full, abs=1e-4)
        # measured on the shipped organism: 0.53-0.80 of the logit difference with every other
        # text-position component ablated at once; the same components one layer up, 0.00
        assert faithfulness(planted, empty, full) > 0.4
        assert abs(faithfulness(wrong, empty, full)) < 0.1
        assert faithfulness(empty, empty, full) == 0 and full - empty > 1


def test_calibrate_runs_from_the_cli_to_a_store_and_finds_the_planted_mlp(tmp_path):
    out = tmp_path / "calibration.zarr"
    args = ["calibrate", "--organism", "planted-llava", "--n-samples", "2", "--method", "trace"]
    args += ["--method", "knockout", "--corruption", "image_pair", "--direction", "denoise", "--window", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if line.startswith("planted-")]
    methods = {" ".join(line.split()[1:-5]) for line in printed}
    traces = {f"trace {site} image_pair denoise w1" for site in ("mlp", "attn", "block")}
    assert methods == traces | {"knockout attn w1", "planted mlp w1", "planted attn w1"}
    ds = vt.open_result(out)
    mlp = ds.sel(organism="planted-llava", method_name="trace mlp image_pair denoise w1")
    assert float(mlp["auroc"]) >= 0.95 and 0 <= float(mlp["cmd"]) <= 1
    assert ds["faithfulness"].sizes["size"] == 10


def test_calibrate_refuses_an_organism_without_a_planted_mechanism(tmp_path):
    result = CliRunner().invoke(
        app, ["calibrate", "--organism", "shapes-llava", "--out", str(tmp_path / "x.zarr")]
    )
    assert result.exit_code == 2 and "mechanism.json" in result.output

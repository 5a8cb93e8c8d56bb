"""A trace of samples whose output the corruption barely moves names no cell and draws no colour.

The README's real-data commands keep the samples the shipped organisms get wrong (`--keep-wrong`):
there P(answer) is ~1e-4 on both sides, and before `Metric.gap_floor` the multi_constraint run
printed "largest mean indirect effect +0.000 [-0.000, +0.000] at layer 5, window 2, segment
'last'" beside maps whose colour range was the 5e-05 gap, its "last" cell deep red. These tests
run real sweeps on the shipped organism, once on questions it answers (a material gap) and once
on the same questions scored against an answer it never gives (no gap), and check the headline,
`normalised` and the figures' colour ranges against the values themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import vlmtrace as vt
import vlmtrace.recipes as registry
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.editing.layers import traced_layers
from vlmtrace.engine.editing.parts import EditError
from vlmtrace.engine.inputs import AnswerTokenWarning
from vlmtrace.presentation import plots
from vlmtrace.presentation.report import below_floor, headline, patching_figures, segment_summary, strongest
from vlmtrace.results.dataset import combine

SITES = ("mlp", "attn")
GRID = vt.Grid(sites=SITES, windows=(1, 3))


@pytest.fixture(scope="module")
def llava() -> vt.VLM:
    return vt.load("shapes-llava")


@pytest.fixture(scope="module")
def answered(llava) -> xr.Dataset:
    """8 questions the organism answers, their colour phrase replaced (STR): a material gap."""
    samples = synthetic_samples(llava, "visual", 8, seed=3)
    return vt.patch(llava, samples, corruption=vt.ImagePair(), grid=GRID, progress=False)


@pytest.fixture(scope="module")
def unanswered(llava) -> xr.Dataset:
    """The same questions scored against "paris", which the organism never says after them."""
    samples = [s.with_(answer="paris") for s in synthetic_samples(llava, "visual", 8, seed=3)]
    with pytest.warns(AnswerTokenWarning):  # "paris" is 5 byte tokens: the first is scored
        return vt.patch(llava, samples, corruption=vt.ImagePair(), grid=GRID, progress=False)


def test_the_two_traces_are_what_the_tests_need(answered, unanswered):
    """Guards the premise: a gap far above probability's floor, and one far below it."""
    floor = vt.Probability.gap_floor
    assert float(abs(answered["clean"] - answered["corrupt"]).mean()) > 10 * floor
    assert float(abs(unanswered["clean"] - unanswered["corrupt"]).mean()) < floor / 10
    assert float(unanswered["clean"].max()) < floor


def test_a_material_gap_names_the_strongest_cell(answered):
    text = headline(answered, sites=SITES)
    assert "no cell named" not in text and "gap floor" not in text
    for site in SITES:
        best = strongest(segment_summary(answered, site))
        effect = f"{best['mean']:+.3f} [{best['low']:+.3f}, {best['high']:+.3f}]"
        where = f"layer {best['layer']}, window {best['window']}, segment '{best['segment']}'"
        assert f"{site}: largest mean indirect effect {effect} at {where}" in text


def test_a_gap_below_the_floor_names_no_cell_and_says_why(unanswered):
    text = headline(unanswered, sites=SITES)
    gap = float(abs(unanswered["clean"] - unanswered["corrupt"]).mean())
    assert f"mean |clean - corrupted| = {gap:.2g}, below probability's gap floor 0.01" in text
    for site in SITES:
        assert f"{site}: no cell named (no gap to restore)" in text
    assert "at layer" not in text
    assert below_floor(unanswered) is not None


def test_a_largest_cell_under_the_hatching_share_of_the_gap_is_not_named(answered):
    """The same trace with every effect shrunk to 3 % of its gap (under `plots.SIGNIFICANT`): its
    largest cell is what the maps hatch, so the headline does not name it."""
    shrunk = answered.copy()
    for site in SITES:
        shrunk[site] = answered["corrupt"] + 0.03 * (answered[site] - answered["corrupt"])
    text = headline(shrunk, sites=SITES)
    for site in SITES:
        assert f"{site}: no cell named: its largest mean indirect effect" in text
        assert f"is under {plots.SIGNIFICANT:.0%} of mean |clean - corrupted|" in text


def test_normalised_leaves_out_the_gaps_below_the_floor(answered, unanswered):
    both = xr.concat([answered, unanswered], dim="sample", coords="minimal", compat="override")
    effect = vt.normalised(both, "mlp")
    gap = (both["clean"] - both["corrupt"]).values
    below = np.abs(gap) < vt.Probability.gap_floor
    assert below.sum() == 8 and effect.attrs["gaps_below_floor"] == 8
    assert effect.attrs["gap_floor"] == vt.Probability.gap_floor
    assert np.isnan(effect.values[below]).all()
    kept = ~below
    expected = (both["mlp"].values[kept] - both["corrupt"].values[kept, None, None, None]) / gap[
        kept, None, None, None
    ]
    np.testing.assert_allclose(effect.values[kept], expected, equal_nan=True)
    # a floor of 0 leaves out only gaps of exactly 0, as before the floor existed
    assert not np.isnan(vt.normalised(unanswered, "mlp", floor=0).values).all()


def drawn(path) -> tuple[list[dict], str]:
    """A figure's panels (`plots.scales`) and all its text, wrapped lines joined."""
    record = plots.scales(path)
    return record["panels"], " ".join(json.dumps(record).replace("\\n", " ").split())


def test_the_maps_of_a_gap_below_the_floor_span_the_floor_and_outline_nothing(unanswered, tmp_path):
    paths = patching_figures(unanswered, tmp_path, sites=("mlp",))
    floor = vt.Probability.gap_floor
    texts = []
    for path in paths:
        panels, text = drawn(path)
        texts.append(text)
        for panel in panels:
            assert panel["clim"] == pytest.approx([-floor, floor]), path.name
        assert "the metric's gap floor" in text and "is below it, too small to localise" in text, path.name
    assert any("the headline names no cell" in text for text in texts)
    assert not any("outlined" in text or "the headline's" in text for text in texts)


def test_the_maps_of_a_material_gap_keep_the_gap_as_their_range(answered, tmp_path):
    paths = patching_figures(answered, tmp_path, sites=("mlp",))
    gap = float(abs(answered["clean"] - answered["corrupt"]).mean())
    panels, text = drawn(paths[0])
    assert panels[0]["clim"][1] >= gap * 0.999 and "gap floor" not in text
    assert "(headline, outlined)" in text


def test_effect_range_below_the_floor_widens_only_for_a_larger_effect():
    assert plots.effect_range(np.array([1e-5, -2e-5]), 5e-5, floor=0.01).limit == 0.01
    wide = plots.effect_range(np.array([0.3, 1e-5]), 5e-5, floor=0.01)
    assert wide.limit == 0.3 and "the largest |effect|, beyond the metric's gap floor" in wide.note
    assert plots.effect_range(np.array([0.1]), 0.5, floor=0.01).limit == 0.5


def test_a_result_stacking_several_metrics_floors_each_by_its_own(llava, unanswered):
    """gn_vs_str stacks metrics along `metric` (`combine`): each is floored by its own gap floor,
    as if normalised alone. On the unanswered questions log P(answer) still moves by more than
    LogProb's floor on some samples where P(answer) moves by less than Probability's."""
    samples = [s.with_(answer="paris") for s in synthetic_samples(llava, "visual", 8, seed=3)]
    with pytest.warns(AnswerTokenWarning):
        logs = vt.patch(
            llava, samples, corruption=vt.ImagePair(), grid=GRID, metric=vt.LogProb(), progress=False
        )
    both = combine({"probability": unanswered, "log_prob": logs}, dim="metric")
    assert "metric" not in both.attrs  # dropped as a conflict: the floors come from the coordinate
    effect = vt.normalised(both, "mlp")
    assert json.loads(effect.attrs["gap_floor"]) == {"probability": 0.01, "log_prob": 0.1}
    for name, alone in (("probability", unanswered), ("log_prob", logs)):
        np.testing.assert_array_equal(effect.sel(metric=name).values, vt.normalised(alone, "mlp").values)
        # one metric cut from the stack keeps its own floor (a coordinate of one value)
        np.testing.assert_array_equal(
            vt.normalised(both.sel(metric=name), "mlp").values, effect.sel(metric=name).values
        )
    # the samples figures count as "above the floor" are exactly those with a normalised effect
    kept = vt.above_floor(both)
    np.testing.assert_array_equal(
        kept.values, np.isfinite(effect).any(["window", "layer", "position"]).values
    )
    # the premise that makes swapped floors visible: some log P gap lies between the two floors
    log_gap = np.abs((logs["clean"] - logs["corrupt"]).values)
    assert ((log_gap >= 0.01) & (log_gap < 0.1)).any() and (log_gap >= 0.1).any()


def test_a_largest_cell_whose_interval_holds_0_is_not_named(answered):
    """The trace's layout with every cell restoring +50 % of the gap on even samples and -30 % on
    odd ones: a mean of +10 % (above the 5 % the maps hatch), whose 95 % interval over 8 samples
    straddles 0."""
    mixed = answered.copy()
    share = xr.DataArray(np.where(np.arange(answered.sizes["sample"]) % 2, -0.3, 0.5), dims="sample")
    gap = answered["clean"] - answered["corrupt"]
    for site in SITES:
        mixed[site] = (
            (answered["corrupt"] + share * gap).broadcast_like(answered[site]).where(answered[site].notnull())
        )
    best = strongest(segment_summary(mixed, "mlp"))
    assert best["mean"] > plots.SIGNIFICANT * float(abs(gap).mean()) and best["low"] <= 0 <= best["high"]
    text = headline(mixed, sites=("mlp",))
    assert "mlp: no cell named: its largest mean indirect effect" in text
    assert "is indistinguishable from 0 (its 95% interval over 8 samples holds 0)" in text


def test_a_metric_of_ones_own_has_its_own_floor_and_an_unknown_one_none():
    class Margin(vt.engine.metrics.Metric):
        name = "test_margin"
        gap_floor = 0.5

    data = xr.Dataset(
        {"clean": ("sample", [1.0, 1.0]), "corrupt": ("sample", [0.0, 0.8]), "x": ("sample", [0.5, 0.9])},
        attrs={"metric": "test_margin"},
    )
    np.testing.assert_allclose(vt.normalised(data, "x").values, [0.5, np.nan])
    data.attrs["metric"] = "nobody_declared_this"
    np.testing.assert_allclose(vt.normalised(data, "x").values, [0.5, 0.5])


def test_layers_traced_refuses_a_trace_below_the_floor(llava, answered, unanswered):
    """`vt.edit(layers="traced")` edits where the trace's largest MLP effect is: on a trace whose
    gap is noise that would be editing at random, with a trace in the provenance that seems to
    justify it. The same samples with a material gap give layers and evidence as before."""
    samples = synthetic_samples(llava, "visual", 8, seed=3)
    with pytest.raises(EditError, match="below probability's gap floor 0.01, so it locates nothing"):
        traced_layers(unanswered, samples, span="last", n_layers=6)
    layers, evidence = traced_layers(answered, samples, span="last", n_layers=6)
    assert layers and evidence["indirect_effect"] > 0


def test_notice_ranks_only_heads_with_an_effect():
    """With every sample below the floor, `vt.normalised` is NaN for every head: notice names no
    strongest head (it named L0.H0, the first of an all-NaN ranking) and draws no attention map."""
    notice = registry.get("notice")

    effect = xr.DataArray(
        np.full((1, 2, 2, 3), np.nan),
        dims=("corruption", "sample", "layer", "head"),
        coords={"corruption": ["str"], "layer": [0, 1], "head": [0, 1, 2]},
    )
    assert notice.top_heads(xr.Dataset({"head_effect": effect})) == []
    effect[0, 0, 1, 2], effect[0, 1, 0, 1] = 0.4, 0.1
    assert notice.top_heads(xr.Dataset({"head_effect": effect})) == [("str", 1, 2, 0.4), ("str", 0, 1, 0.1)]


def test_universal_heads_says_over_how_many_samples_each_condition_averages(llava):
    """A condition whose corruption never moves the answer past the floor has no head effect at
    all (the logit difference of an answer against itself is 0 on both sides): the summary names
    that condition and says no head can be top there, and every condition's count is stored and
    printed, instead of a mean that silently runs over fewer samples than the run holds."""
    recipe = registry.get("universal_heads")
    samples = [s for task in recipe.TASKS for s in synthetic_samples(llava, task, 1, seed=0)]
    moot = [s.with_(foil=s.answer) if s.meta.get("family") == "fact" else s for s in samples]
    ds = recipe.run(llava, moot, options=vt.Options(progress=False))

    counts = ds["samples_above_floor"]
    assert counts.sel(task="fact").values.tolist() == [0, 0]
    assert (counts.sel(task=["visual", "multi"]) == 1).all() and (ds["samples"] == 1).all()
    assert ds["head_effect"].sel(task="fact").isnull().all()
    assert not ds["top"].sel(task="fact").any() and not ds["universal"].any()
    text = recipe.summary(ds)
    assert "fact/str, fact/sip: no sample's corruption moved the answer past the floor" in text
    assert "visual/str 1 of 1" in text and "fact/sip 0 of 1" in text
    none = recipe.run(llava, [s.with_(foil=s.answer) for s in samples], options=vt.Options(progress=False))
    text = recipe.summary(none)
    assert "no head is top in any condition" in text and "most shared" not in text  # was "L0.H0 in 0"

"""Figures are drawn from stores alone, and they draw what the data says."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

from vlmtrace.cli import app
from vlmtrace.presentation import plots
from vlmtrace.presentation.report import COLUMN


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=float)


def test_plot_redraws_every_figure_of_a_recipe_store_without_a_model(tmp_path):
    store = tmp_path / "multi.zarr"
    runner = CliRunner()
    first = runner.invoke(app, ["recipe", "multi_constraint", "--n-samples", "2", "--out", str(store)])
    assert first.exit_code == 0, first.output
    written = sorted(line.split("figure: ")[1] for line in first.output.splitlines() if "figure: " in line)
    again = runner.invoke(app, ["plot", str(store), "--out", str(tmp_path / "redrawn")])
    assert again.exit_code == 0, again.output
    redrawn = sorted(line.split("figure: ")[1] for line in again.output.splitlines() if "figure: " in line)
    assert [p.split("/")[-1] for p in redrawn] == [p.split("/")[-1] for p in written]
    for original, copy in zip(written, redrawn, strict=True):
        np.testing.assert_array_equal(_pixels(original), _pixels(copy))


def test_plot_refuses_a_store_no_recipe_wrote(tmp_path):
    store = tmp_path / "plain.zarr"
    xr.Dataset({"x": ("a", [1.0])}).to_zarr(store)
    result = CliRunner().invoke(app, ["plot", str(store)])
    assert result.exit_code != 0 and "not written by a recipe" in result.output


def test_a_positive_effect_is_drawn_red_and_a_negative_one_blue(tmp_path):
    da = xr.DataArray([[1.0, -1.0]], dims=("layer", "position"), coords={"layer": [0], "position": [0, 1]})
    pixels = _pixels(plots.heatmap(da, path=tmp_path / "h.png"))
    red = (pixels[..., 0] > 90) & (pixels[..., 1] < 30) & (pixels[..., 2] < 60)  # RdBu_r's end
    blue = (pixels[..., 2] > 80) & (pixels[..., 0] < 30)
    columns_red, columns_blue = np.nonzero(red)[1], np.nonzero(blue)[1]
    assert red.sum() > 500 and blue.sum() > 500
    assert columns_red.mean() < columns_blue.mean()  # position 0 (+1) left of position 1 (-1)


def test_counts_are_drawn_on_a_sequential_scale_from_zero_with_no_blue_for_a_negative_range(tmp_path):
    da = xr.DataArray([[0.0, 3.0]], dims=("layer", "head"), coords={"layer": [0], "head": [0, 1]})
    pixels = _pixels(plots.head_grid(da, path=tmp_path / "c.png", counts=True, label="conditions"))
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() == 0  # a diverging scale would draw 3 in red
    dark_blue = (pixels[..., 2] > 90) & (pixels[..., 0] < 40)
    assert dark_blue.sum() > 500  # the largest count in the sequential map's darkest blue


# What a colour means: every figure's colour range is checked against the data it shows, through
# the record each PNG carries of its panels (`plots.scales`: the drawn artists' own limits).

REPORT_COLUMN = COLUMN - 18  # px: a wider figure (with its margin and border) is shrunk, its text with it


def effects(values, *, dims=("layer", "position")) -> xr.DataArray:
    values = np.asarray(values, dtype=float)
    coords = {dim: list(range(n)) for dim, n in zip(dims, values.shape, strict=True)}
    return xr.DataArray(values, dims=dims, coords=coords, name="effect")


def by_segment(values, *, windows) -> xr.DataArray:
    """Mean effects (window, layer, segment), segments named as a trace names them."""
    values = np.asarray(values, dtype=float)
    return xr.DataArray(
        values,
        dims=("window", "layer", "segment"),
        coords={
            "window": list(windows),
            "layer": list(range(values.shape[1])),
            "segment": ["question", "visual", "textual", "last"][: values.shape[2]],
        },
    )


def overlapping(boxes_a, boxes_b) -> list:
    return [
        (a, b)
        for a in boxes_a
        for b in boxes_b
        if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]  # x0, y0, x1, y1
    ]


def test_a_per_sample_map_of_noise_is_drawn_on_the_whole_clean_corrupted_gap(tmp_path):
    noise = np.random.default_rng(0).choice([-0.0009, 0.0009], size=(6, 9))
    drawn = plots.scales(plots.heatmap(effects(noise), total=0.5, path=tmp_path / "noise.png"))
    panel = drawn["panels"][0]
    assert panel["clim"] == [-0.5, 0.5]  # not +-0.0009: noise stays white, not saturated
    assert "range ±0.5 = |clean - corrupted|" in " ".join(panel["label"].split())


def test_cells_below_five_percent_of_the_gap_are_hatched_and_the_others_not(tmp_path):
    drawn = plots.scales(
        plots.heatmap(effects([[0.02, -0.3], [0.0, 0.5]]), total=0.5, path=tmp_path / "h.png")
    )
    assert sorted(drawn["panels"][0]["hatched"]) == [[0, 0], [1, 0]]


def test_an_effect_beyond_the_gap_widens_the_range_and_the_label_says_so(tmp_path):
    drawn = plots.scales(plots.heatmap(effects([[0.8, -0.1]]), total=0.5, path=tmp_path / "over.png"))
    panel = drawn["panels"][0]
    assert panel["clim"] == [-0.8, 0.8] and "beyond |clean - corrupted| = 0.5" in " ".join(
        panel["label"].split()
    )


def test_without_a_gap_the_range_is_the_data_and_the_label_says_nothing_ties_it_to_the_gap(tmp_path):
    drawn = plots.scales(plots.heatmap(effects([[0.2, -0.1]]), path=tmp_path / "free.png"))
    panel = drawn["panels"][0]
    assert panel["clim"] == [-0.2, 0.2] and "no clean - corrupted gap given" in " ".join(
        panel["label"].split()
    )


def test_a_segment_map_of_means_is_drawn_on_the_mean_gap(tmp_path):
    mean = by_segment(np.full((1, 3, 4), 0.01), windows=[1]).isel(window=0)
    summary = xr.Dataset({"mean": mean, "low": mean - 0.01, "high": mean + 0.01})
    drawn = plots.scales(plots.segment_heatmap(summary, total=0.9, path=tmp_path / "seg.png"))
    assert drawn["panels"][0]["clim"] == [-0.9, 0.9]


def test_six_window_panels_share_the_gaps_range_in_a_grid_that_fits_the_report(tmp_path):
    values = np.zeros((6, 6, 4))
    values[5, 3, 3] = 0.6
    mark = {"window": 6, "layer": 3, "segment": "last"}
    path = plots.window_panels(
        by_segment(values, windows=range(1, 7)), total=0.98, mark=mark, path=tmp_path / "w.png"
    )
    drawn = plots.scales(path)
    assert [p["clim"] for p in drawn["panels"]] == [[-0.98, 0.98]] * 6
    assert [p["title"] for p in drawn["panels"]][-1] == "window 6 (headline, outlined)"
    width, height = Image.open(path).size
    assert width <= REPORT_COLUMN and height > 0.6 * width  # two rows of three, not one row of six


def test_a_tiny_attention_map_is_stretched_and_its_title_says_by_how_much(tmp_path):
    weights = np.full(16, 1.4e-10 / 16)
    weights[5] = 3.2e-11
    image = Image.new("RGB", (32, 32), "white")
    drawn = plots.scales(plots.image_attention(image, weights, grid=(4, 4), path=tmp_path / "att.png"))
    panel = drawn["panels"][0]
    assert panel["clim"] == [0.0, pytest.approx(3.2e-11)]
    assert "colour scale stretched" in panel["title"] and "max 3.2e-11 of 1" in panel["title"]


def test_an_attention_map_that_fills_its_range_is_drawn_on_0_to_1_unstretched(tmp_path):
    weights = np.linspace(0, 0.6, 16)
    image = Image.new("RGB", (32, 32), "white")
    drawn = plots.scales(plots.image_attention(image, weights, grid=(4, 4), path=tmp_path / "att.png"))
    assert drawn["panels"][0]["clim"] == [0.0, 1.0] and "stretched" not in drawn["panels"][0]["title"]


def test_normalised_head_effects_are_drawn_on_plus_minus_one(tmp_path):
    effect = effects([[0.03, -0.02], [0.01, 0.04]], dims=("layer", "head"))
    shares = xr.concat([xr.zeros_like(effect)] * 3, dim="function").assign_coords(
        function=list(plots.LETTERS)
    )
    grid = plots.scales(plots.head_grid(effect, total=1.0, path=tmp_path / "g.png"))
    functions = plots.scales(plots.head_functions(effect, shares, total=1.0, path=tmp_path / "f.png"))
    assert grid["panels"][0]["clim"] == functions["panels"][0]["clim"] == [-1.0, 1.0]


def test_an_unfloored_relative_change_is_refused_and_a_floored_one_stays_within_its_bound(tmp_path):
    from vlmtrace.engine.metrics import relative_change

    ds = xr.Dataset(
        {
            "knockout": (("sample", "block", "layer"), [[[0.25, 0.5]], [[0.2, 0.3]]]),
            "clean": ("sample", [0.5, 3e-5]),  # the second would read +6666 and +9999
        },
        coords={"sample": ["s0", "s1"], "block": ["image->last"], "layer": [0, 1]},
        attrs={"metric": "probability"},
    )
    unfloored = (ds["knockout"] - ds["clean"]) / ds["clean"]
    with pytest.raises(plots.UnflooredRelativeChange):
        plots.knockout_curves(unfloored, path=tmp_path / "raw.png")
    drawn = plots.scales(plots.knockout_curves(relative_change(ds, "knockout"), path=tmp_path / "k.png"))
    assert drawn["panels"][0]["ylim"][1] < 1  # only s0's -0.5 and 0.0 are drawn


def test_colour_bar_labels_stay_beside_their_bars_and_titles_overlap_nothing(tmp_path):
    long = "indirect effect, patched - corrupted [logits (answer minus foil)], a label as long as they come"
    title = (
        "mlp restored, window 3, one sample: a-sample-id-of-some-length\n" + "a run described at length; " * 4
    )
    tiny = np.full(16, 1e-11)
    figures = [
        plots.heatmap(effects(np.ones((6, 12))), total=1.0, label=long, title=title, path=tmp_path / "h.png"),
        plots.window_panels(
            by_segment(np.ones((6, 6, 4)), windows=range(1, 7)),
            total=1.0,
            label=long,
            title=title,
            path=tmp_path / "w.png",
        ),
        plots.head_grid(
            effects(np.ones((3, 4)), dims=("layer", "head")), label=long, title=title, path=tmp_path / "g.png"
        ),
        plots.image_attention(
            Image.new("RGB", (32, 32)), tiny, grid=(4, 4), title=title, path=tmp_path / "a.png"
        ),
    ]
    for path in figures:
        boxes = plots.scales(path)["boxes"]
        for bar in boxes["colour_bars"]:
            texts = [text for text in (bar["label"], bar["offset"]) if text is not None]
            assert bar["label"] and not overlapping(boxes["titles"], texts), path
            low, high = bar["bar"][1], bar["bar"][3]
            assert low - 2 <= bar["label"][1] and bar["label"][3] <= high + 2, path  # not past the bar's ends
        titles = boxes["titles"]
        assert not [pair for k, box in enumerate(titles) for pair in overlapping([box], titles[k + 1 :])], (
            path
        )
        assert Image.open(path).size[0] <= REPORT_COLUMN, path


def test_scores_are_drawn_on_0_to_1_however_small_they_are(tmp_path):
    dims, coords = ("condition", "metric"), {"condition": ["a", "b"], "metric": ["efficacy", "specificity"]}
    mean = xr.DataArray([[0.02, 0.01], [0.03, 0.0]], dims=dims, coords=coords)
    path = plots.score_bars(mean, mean - 0.01, mean + 0.01, title="tiny", path=tmp_path / "s.png")
    assert plots.scales(path)["panels"][0]["ylim"] == [0.0, 1.05]
    assert Image.open(path).size[0] <= REPORT_COLUMN


def test_counts_run_to_the_largest_count_possible_when_it_is_given(tmp_path):
    counts = effects([[0.0, 3.0]], dims=("layer", "head"))
    drawn = plots.scales(
        plots.head_grid(counts, counts=True, most=6, label="conditions (0 to 6)", path=tmp_path / "c.png")
    )
    assert drawn["panels"][0]["clim"] == [0.0, 6.0]

"""Figures are drawn from stores alone, and they draw what the data says."""

from __future__ import annotations

import numpy as np
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

from vlmtrace.cli import app
from vlmtrace.presentation import plots


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

"""Relative changes are reported only where the clean probability reaches a floor, and say so."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import vlmtrace.recipes as registry
from vlmtrace.engine.metrics import CLEAN_FLOOR, relative_change
from vlmtrace.results.stats import bootstrap_mean

flow = registry.get("information_flow")


def knockout_result(clean: list[float], knockout: list[list[float]], metric: str = "probability"):
    """A knockout result by hand: one block, one window, one value per (sample, layer)."""
    values = np.array(knockout, dtype=float)[:, None, None, :]
    ds = xr.Dataset(
        {
            "knockout": (("sample", "block", "window", "layer"), values),
            "clean": (("sample",), np.array(clean, dtype=float)),
        },
        coords={
            "sample": [f"s{i}" for i in range(len(clean))],
            "block": ["image->last"],
            "window": [1],
            "layer": list(range(values.shape[-1])),
        },
        attrs={"metric": metric, "model": "by-hand"},
    )
    if metric == "probability":
        ds["relative"] = relative_change(ds, "knockout")
    return ds


def test_relative_change_is_left_out_where_the_clean_probability_is_below_the_floor():
    ds = knockout_result([0.5, 3e-5], [[0.25, 0.5], [0.015, 0.0]])  # the second would read +499
    relative = ds["relative"].squeeze(["block", "window"])
    np.testing.assert_allclose(relative.sel(sample="s0").values, [-0.5, 0.0])
    assert relative.sel(sample="s1").isnull().all()
    assert relative.attrs["clean_floor"] == CLEAN_FLOOR == 0.05 and relative.attrs["samples_above_floor"] == 1


def test_a_relative_change_of_another_metric_than_a_probability_is_refused():
    ds = knockout_result([2.0], [[1.0]], metric="logit_diff")
    with pytest.raises(ValueError, match="divides by the clean probability"):
        relative_change(ds, "knockout")


def test_what_the_knockout_figure_plots_leaves_out_samples_below_the_floor():
    ds = knockout_result([0.5, 3e-5], [[0.25, 0.5], [0.2, 0.3]])  # +6666 and +9999 below the floor
    plotted = bootstrap_mean(flow.relative(ds))["mean"].squeeze(["block", "window"])
    np.testing.assert_allclose(plotted.values, [-0.5, 0.0])


def test_the_headline_counts_the_samples_above_the_floor_and_calls_a_rise_no_drop():
    ds = knockout_result([0.5, 0.4, 1e-3], [[0.6, 0.75], [0.5, 0.6], [0.5, 0.5]])
    headline = flow.summary(ds)
    assert "2 of 3 samples with clean P(answer) >= 0.05" in headline
    assert "largest drop" not in headline and "no drop (least +0.22 at layer 0)" in headline


def test_the_headline_reports_no_relative_change_when_no_sample_reaches_the_floor(tmp_path):
    ds = knockout_result([3e-5, 1e-4], [[0.2, 0.1], [0.3, 0.01]])
    headline = flow.summary(ds)
    assert "0 of 2 samples" in headline and "not reported" in headline and "drop" not in headline
    assert all(path.is_file() for path in flow.figures(ds, tmp_path))


def test_a_store_written_before_the_floor_is_read_under_it():
    ds = knockout_result([0.5, 3e-5], [[0.25, 0.5], [0.2, 0.3]])
    ds["relative"] = (ds["knockout"] - ds["clean"]) / ds["clean"]  # unfloored, as stores used to hold
    assert flow.relative(ds).sel(sample="s1").isnull().all() and "1 of 2 samples" in flow.summary(ds)

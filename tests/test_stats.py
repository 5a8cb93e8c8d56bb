"""Averages over samples (vlmtrace.results.stats), checked on hand-made traces with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from vlmtrace.results.stats import bootstrap_mean, by_segment, spread


def _trace(effect: np.ndarray, labels: list[list[str]]) -> xr.Dataset:
    """A result shaped like vt.patch's: (sample, layer, position), clean 1, corrupt 0."""
    samples, layers, positions = effect.shape
    coords = {
        "sample": [f"s{i}" for i in range(samples)],
        "layer": np.arange(layers),
        "position": np.arange(positions),
        "label": (("sample", "position"), np.array(labels)),
        "token": (("sample", "position"), np.array([[f"t{p}" for p in range(positions)]] * samples)),
    }
    return xr.Dataset(
        {
            "block": (("sample", "layer", "position"), effect),
            "clean": ("sample", np.ones(samples)),
            "corrupt": ("sample", np.zeros(samples)),
        },
        coords=coords,
    )


def test_by_segment_averages_each_samples_own_tokens_of_a_segment():
    effect = np.array([[[1.0, 3.0, 5.0]], [[2.0, 4.0, 8.0]]])
    ds = _trace(effect, [["visual", "visual", "last"], ["visual", "last", "last"]])
    out = by_segment(ds["block"])
    assert out.sel(segment="visual").values.tolist() == [[2.0], [2.0]]
    assert out.sel(segment="last").values.tolist() == [[5.0], [6.0]]


def test_bootstrap_interval_contains_the_mean_and_is_reproducible_from_its_seed():
    da = xr.DataArray(np.random.default_rng(0).normal(size=(40, 3)), dims=("sample", "layer"))
    a, b = bootstrap_mean(da, seed=3), bootstrap_mean(da, seed=3)
    assert a.identical(b) and a.attrs["bootstrap_seed"] == 3
    assert ((a["low"] <= a["mean"]) & (a["mean"] <= a["high"])).all()
    np.testing.assert_allclose(a["mean"], da.mean("sample"))


def test_spread_finds_the_layers_and_earlier_tokens_that_carry_the_effect():
    effect = np.zeros((2, 4, 3))
    effect[:, 1:3, 0] = 0.5  # token 0 at layers 1-2
    effect[:, 2, 1] = 0.2  # token 1 at layer 2
    effect[:, 3, 2] = 1.0  # the last token at the last layer
    ds = _trace(effect, [["visual", "question", "last"]] * 2)
    where = spread(ds, "block", threshold=0.1)
    assert where.layers == (1, 2) and where.positions == (0, 1, 2) and not where.degenerate
    assert where.tokens == ("t0", "t1", "t2") and where.peak == 0.5


def test_one_earlier_token_over_two_layers_then_the_last_token_is_a_spread_trace():
    effect = np.zeros((2, 4, 3))
    effect[:, 1:3, 0] = 0.3
    effect[:, 3, 2] = 1.0
    where = spread(_trace(effect, [["visual", "question", "last"]] * 2), "block")
    assert where.layers == (1, 2) and where.positions == (0, 2) and not where.degenerate


def test_an_earlier_token_at_one_layer_only_is_degenerate():
    effect = np.zeros((2, 4, 3))
    effect[:, 0, 0] = 0.3
    effect[:, :, 2] = 1.0
    assert spread(_trace(effect, [["visual", "question", "last"]] * 2), "block").degenerate


def test_spread_of_a_last_token_only_trace_is_degenerate():
    effect = np.zeros((2, 4, 3))
    effect[:, :, 2] = 1.0
    where = spread(_trace(effect, [["visual", "question", "last"]] * 2), "block")
    assert where.degenerate and where.layers == () and where.positions == (2,)


def test_spread_refuses_samples_with_different_token_layouts():
    ds = _trace(np.zeros((2, 1, 3)), [["visual", "question", "last"], ["visual", "last", "last"]])
    with pytest.raises(ValueError, match="one token layout"):
        spread(ds, "block")

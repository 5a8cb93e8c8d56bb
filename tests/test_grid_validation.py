"""Inputs that once ran and gave a silent wrong or empty result are refused before any forward."""

from __future__ import annotations

import math

import pytest

import vlmtrace as vt


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (dict(sites="mlp"), r"is a string, read as the characters \['m', 'l', 'p'\]"),
        (dict(windows=()), r"windows=\(\)\) is empty"),
        (dict(sites=()), r"sites=\(\)\) is empty"),
        (dict(windows=(1, 1)), "repeats a value"),
        (dict(sites=("mlp", "mlp")), "repeats a value"),
        (dict(layers=(1.5,)), "must hold integers; got 1.5"),
        (dict(heads=(True,)), "must hold integers; got True"),
    ],
)
def test_a_grid_no_model_could_run_is_refused_with_the_fix(grid, message):
    with pytest.raises(vt.UserError, match=message):
        vt.Grid(**grid)


@pytest.mark.parametrize("scale", [math.nan, -1.0, math.inf])
def test_gaussian_noise_with_a_scale_that_is_not_finite_or_is_negative_is_refused(
    tiny_llava, llava_sample, scale
):
    with pytest.raises(vt.UserError, match="finite scale >= 0"):
        vt.patch(
            tiny_llava,
            [llava_sample],
            corruption=vt.GaussianNoise(scale=scale, samples=2),
            grid=vt.Grid(layers=(0,)),
            progress=False,
        )

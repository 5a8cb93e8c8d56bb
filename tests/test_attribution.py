"""Attribution patching estimates exact patching to first order, in exact patching's layout."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import vlmtrace as vt
from vlmtrace.engine.attribution import (
    AttributionWarning,
    agreement,
    attribute,
    effects,
    keep_screened,
    screen,
    spearman,
)
from vlmtrace.engine.planning import plan, prepare
from vlmtrace.results.dataset import Layout

SMALL_NOISE = vt.GaussianNoise("image", scale=0.01, samples=2, seed=0)


def both(vlm, samples, **kwargs):
    """(attribution estimates, exact patching) for the same arguments."""
    kwargs = {"metric": vt.LogProb(), "progress": False, **kwargs}
    return attribute(vlm, samples, **kwargs), vt.patch(vlm, samples, **kwargs)


def relative_error(estimates, exact, site) -> float:
    """|estimated effects - exact effects| / |exact effects| over the cells both have."""
    guess, truth = effects(estimates, site).values, effects(exact, site).values
    finite = np.isfinite(truth)
    return float(np.linalg.norm(guess[finite] - truth[finite]) / np.linalg.norm(truth[finite]))


@pytest.mark.parametrize("positions", ["tokens", "segments"])
def test_estimates_have_the_layout_of_exact_patching(tiny_llava, llava_sample, positions):
    """Two samples of different lengths, an unequal replacement (unpartnered cells are NaN),
    windows and heads: every variable, dim and coordinate matches `vt.patch`'s."""
    other = llava_sample.with_(
        prompt="<image> what colour is this shape ?", answer="red", spans={"visual": "this shape"}, id="q1"
    )
    grid = vt.Grid(
        sites=("mlp", "attn_head"), windows=(1, 3), positions=positions, segments=("visual", "last")
    )
    estimates, exact = both(
        tiny_llava, [llava_sample, other], corruption=vt.ReplaceSpan("visual", text="a"), grid=grid
    )
    assert set(estimates.data_vars) == set(exact.data_vars)
    for name in exact.data_vars:
        assert estimates[name].dims == exact[name].dims
        np.testing.assert_array_equal(np.isnan(estimates[name].values), np.isnan(exact[name].values))
    xr.testing.assert_equal(estimates.coords.to_dataset(), exact.coords.to_dataset())
    assert estimates.attrs["experiment"] == "attribution"


def test_baselines_equal_exact_patching_baselines(tiny_llava, llava_sample):
    estimates, exact = both(
        tiny_llava, [llava_sample], corruption=vt.ImagePair(), grid=vt.Grid(segments=("last",))
    )
    np.testing.assert_allclose(estimates["clean"], exact["clean"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(estimates["corrupt"], exact["corrupt"], rtol=0, atol=1e-5)
    assert estimates["done"].all()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_estimates_approach_exact_patching_as_the_corruption_shrinks(tiny_llava, llava_sample, direction):
    """First order: the error of the estimate shrinks faster than the effect itself."""
    grid = vt.Grid(sites=("block", "mlp", "attn_head"))
    errors = {}
    for scale in (1.0, 0.01):
        corruption = vt.GaussianNoise("image", scale=scale, samples=2)
        estimates, exact = both(
            tiny_llava, [llava_sample], corruption=corruption, grid=grid, direction=direction
        )
        errors[scale] = {site: relative_error(estimates, exact, site) for site in grid.sites}
    for site in grid.sites:
        assert errors[0.01][site] < 0.05, (site, errors)
        assert errors[0.01][site] < errors[1.0][site] / 5, (site, errors)


def test_blip_head_and_cross_attention_estimates_match_exact_patching_for_small_noise(tiny_blip, blip_sample):
    grid = vt.Grid(sites=("attn_head", "cross_attn", "cross_attn_head", "mlp"))
    estimates, exact = both(tiny_blip, [blip_sample], corruption=SMALL_NOISE, grid=grid)
    for site in grid.sites:
        assert relative_error(estimates, exact, site) < 0.05, site


def test_blip_decoder_stack_estimates_match_exact_patching_for_small_noise(tiny_blip, blip_sample):
    grid = vt.Grid(sites=("block", "attn_head"), stack="decoder")
    estimates, exact = both(tiny_blip, [blip_sample], corruption=SMALL_NOISE, grid=grid)
    for site in grid.sites:
        assert relative_error(estimates, exact, site) < 0.05, site


def test_a_cell_whose_activations_are_equal_in_both_runs_estimates_the_corrupted_run_exactly(
    tiny_llava, llava_sample
):
    """In a causal decoder, image positions precede the replaced span: clean - corrupted is
    zero there, so gradient x difference adds exactly nothing."""
    grid = vt.Grid(sites=("block", "mlp", "attn", "attn_head"), segments=("image",), windows=(1, 3))
    estimates = attribute(
        tiny_llava, [llava_sample], corruption=vt.ReplaceSpan("visual"), grid=grid, progress=False
    )
    corrupt = float(estimates["corrupt"].squeeze())
    for site in grid.sites:
        np.testing.assert_array_equal(estimates[site].values, corrupt)


def test_noising_with_kl_warns_that_its_gradient_vanishes(tiny_llava, llava_sample):
    with pytest.warns(AttributionWarning, match="zero gradient"):
        estimates = attribute(
            tiny_llava,
            [llava_sample],
            corruption=vt.ImagePair(),
            grid=vt.Grid(segments=("last",)),
            metric=vt.KL(),
            direction="noise",
            progress=False,
        )
    np.testing.assert_allclose(estimates["block"], 0.0, atol=1e-6)


def test_weights_keep_their_flags_and_receive_no_gradient(tiny_llava, llava_sample):
    attribute(tiny_llava, [llava_sample], corruption=vt.ImagePair(), grid=vt.Grid(), progress=False)
    parameters = list(tiny_llava.model.parameters())
    assert all(p.requires_grad for p in parameters)
    assert all(p.grad is None for p in parameters)


def test_screen_keeps_the_k_largest_estimated_effects_per_sample_and_window(tiny_llava, llava_sample):
    grid = vt.Grid(sites=("mlp", "attn_head"), windows=(1, 2))
    estimates = attribute(tiny_llava, [llava_sample], corruption=vt.ImagePair(), grid=grid, progress=False)
    masks = screen(estimates, 4)
    for site in grid.sites:
        mask, size = masks[site], abs(effects(estimates, site))
        assert mask.dims == estimates[site].dims
        assert (mask.sum([d for d in mask.dims if d not in ("sample", "window")]) == 4).all()
        for window in grid.windows:
            kept, dropped = size.sel(window=window).where(mask.sel(window=window)), size.sel(window=window)
            assert float(kept.min()) >= float(dropped.where(~mask.sel(window=window)).max())


def test_keep_screened_restricts_a_plan_to_the_screened_cells(tiny_llava, llava_sample):
    grid = vt.Grid(sites=("mlp", "attn_head"))
    corruption = vt.ImagePair()
    estimates = attribute(tiny_llava, [llava_sample], corruption=corruption, grid=grid, progress=False)
    masks = screen(estimates, 3)
    sample_plan = plan(
        tiny_llava, "lm", prepare(tiny_llava, llava_sample, corruption, vt.Probability(), False), grid
    )
    layout = Layout([llava_sample], [sample_plan.prepared.pair.clean.prompt], [sample_plan.cells], grid)
    kept = keep_screened(sample_plan, layout, 0, masks)
    assert len(kept) == sum(int(m.sum()) for m in masks.values())


def test_spearman_ranks_ties_by_their_average_rank():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3): Pearson = 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(np.sqrt(0.9))


def test_exact_patching_agrees_with_itself(tiny_llava, llava_sample):
    exact = vt.patch(
        tiny_llava, [llava_sample], corruption=vt.ImagePair(), grid=vt.Grid(sites=("mlp",)), progress=False
    )
    assert agreement(exact, exact, 5)["mlp"] == {"overlap": 1.0, "spearman": 1.0, "groups": 1}


def test_agreement_with_exact_patching_on_a_tiny_random_model_is_reported(tiny_llava, llava_sample, capsys):
    """A full image swap is far from infinitesimal and the weights are random: the numbers are
    reported (pytest -s), and only their range is checked."""
    grid = vt.Grid(sites=("block", "mlp", "attn_head"))
    estimates, exact = both(tiny_llava, [llava_sample], corruption=vt.ImagePair(), grid=grid)
    report = agreement(estimates, exact, 10)
    with capsys.disabled():
        print("\nattribution vs exact, tiny random LLaVA, image pair, top-10:", report)
    for site in grid.sites:
        assert 0.0 <= report[site]["overlap"] <= 1.0
        assert -1.0 <= report[site]["spearman"] <= 1.0


def test_patch_with_a_screen_patches_exactly_k_cells_and_they_equal_full_patching(tiny_llava, llava_sample):
    kwargs = dict(
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp", "attn_head"), windows=(1, 2), skip=("image",)),
        metric=vt.LogProb(),
        progress=False,
    )
    full = vt.patch(tiny_llava, [llava_sample], **kwargs)
    screened = vt.patch(tiny_llava, [llava_sample], screen=5, **kwargs)
    for site in ("mlp", "attn_head"):
        kept = screened[site].notnull()
        assert int(kept.sum()) == 5 * 2  # k cells per (sample, window)
        np.testing.assert_array_equal(screened[site].values[kept.values], full[site].values[kept.values])

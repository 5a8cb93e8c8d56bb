"""Attribution patching estimates exact patching to first order, in exact patching's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import vlmtrace as vt
from vlmtrace.engine.attribution import AttributionWarning, attribute
from vlmtrace.engine.planning import plan, prepare
from vlmtrace.engine.screening import agreement, effects, keep_screened, screen, spearman
from vlmtrace.results.dataset import Layout

SMALL_NOISE = vt.GaussianNoise("image", scale=0.01, samples=2, seed=0)


def both(vlm, samples, method="atp", **kwargs):
    """(attribution estimates by `method`, exact patching) for the same arguments."""
    kwargs = {"metric": vt.LogProb(), "progress": False, **kwargs}
    return attribute(vlm, samples, method=method, **kwargs), vt.patch(vlm, samples, **kwargs)


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


@pytest.mark.parametrize("method", ["atp", "ig", "atp+qk"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_estimates_approach_exact_patching_as_the_corruption_shrinks(
    tiny_llava, llava_sample, direction, method
):
    """First order: the error of the estimate shrinks faster than the effect itself."""
    grid = vt.Grid(sites=("block", "mlp", "attn_head"))
    errors = {}
    for scale in (1.0, 0.01):
        corruption = vt.GaussianNoise("image", scale=scale, samples=2)
        estimates, exact = both(
            tiny_llava, [llava_sample], method, corruption=corruption, grid=grid, direction=direction
        )
        errors[scale] = {site: relative_error(estimates, exact, site) for site in grid.sites}
    for site in grid.sites:
        assert errors[0.01][site] < 0.05, (site, errors)
        assert errors[0.01][site] < errors[1.0][site] / 5, (site, errors)


@pytest.mark.parametrize("method", ["atp", "ig", "atp+qk"])
def test_blip_head_and_cross_attention_estimates_match_exact_patching_for_small_noise(
    tiny_blip, blip_sample, method
):
    grid = vt.Grid(sites=("attn_head", "cross_attn", "cross_attn_head", "mlp"))
    estimates, exact = both(tiny_blip, [blip_sample], method, corruption=SMALL_NOISE, grid=grid)
    for site in grid.sites:
        assert relative_error(estimates, exact, site) < 0.05, site


@pytest.mark.parametrize("method", ["atp", "ig", "atp+qk"])
def test_blip_decoder_stack_estimates_match_exact_patching_for_small_noise(tiny_blip, blip_sample, method):
    grid = vt.Grid(sites=("block", "attn_head"), stack="decoder")
    estimates, exact = both(tiny_blip, [blip_sample], method, corruption=SMALL_NOISE, grid=grid)
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
    report = agreement(exact, exact, 5)["mlp"]
    assert report == {
        "overlap": 1.0,
        "material_overlap": 1.0,
        "spearman": 1.0,
        "groups": 1,
        "material_groups": 1,
    }


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


def one_group(values, clean=1.0, corrupt=0.0) -> xr.Dataset:
    """A patching-shaped result of one sample and window: `values` over (layer, position)."""
    values = np.asarray(values, dtype=float)[None, None]
    return xr.Dataset(
        {
            "mlp": (("sample", "window", "layer", "position"), corrupt + values),
            "clean": ("sample", [clean]),
            "corrupt": ("sample", [corrupt]),
        },
        attrs={"direction": "denoise"},
    )


def test_material_overlap_counts_ties_and_ignores_negligible_effects():
    """Exact effects 1, .5, .5, .5 and two negligible ones; k = 2. Picking cells 0 and 3 is as
    right as 0 and 1 (a tie), though the strict overlap, which ranks ties arbitrarily, says 0.5;
    picking a negligible cell instead of a .5 one is a miss either way."""
    exact = one_group([[1.0, 0.5, 0.5, 0.5, 0.01, 0.001]])
    tie = agreement(one_group([[0.9, 0.0, 0.0, 0.8, 0.0, 0.0]]), exact, 2)["mlp"]
    assert tie["overlap"] == 0.5 and tie["material_overlap"] == 1.0
    miss = agreement(one_group([[0.9, 0.0, 0.0, 0.0, 0.8, 0.0]]), exact, 2)["mlp"]
    assert miss["material_overlap"] == 0.5
    flat = agreement(one_group([[0.9, 0.0]]), one_group([[0.01, 0.001]]), 1)["mlp"]
    assert flat["material_groups"] == 0 and np.isnan(flat["material_overlap"])


def test_cells_a_screened_sweep_left_unpatched_rank_last_not_out():
    """A screened sweep (NaN where it did not patch) that missed the largest exact effect scores
    0.5 at k = 2, not 1.0: the missed cell still counts, ranked below every patched one."""
    exact = one_group([[1.0, 0.5, 0.01, 0.001]])
    screened = one_group([[np.nan, 0.5, 0.01, np.nan]])
    report = agreement(screened, exact, 2)["mlp"]
    assert report["material_overlap"] == 0.5 and report["overlap"] == 0.5


def reference_integrated_gradients(vlm, sample, layer: int, steps: int) -> np.ndarray:
    """IG of log P(answer) at every position of the MLP output of `layer`, image pair, denoising.

    Plain torch hooks on the unwrapped model, one row at a time: the corrupted input with the
    projector's output moved a fraction alpha of the way to the clean run's, the MLP output's
    gradient read at each midpoint alpha, times the clean - corrupted MLP output, averaged.
    """
    model = vlm.model
    projector = model.model.multi_modal_projector
    mlp = model.model.language_model.layers[layer].mlp
    answer = vlm.tokenizer.convert_tokens_to_ids(sample.answer)
    rows = {
        side: vlm.processor(text=sample.prompt, images=image, return_tensors="pt")
        for side, image in (("clean", sample.image), ("corrupt", sample.image_pair))
    }
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output.detach().clone()

        return hook

    with torch.no_grad():
        for side, row in rows.items():
            handles = [
                projector.register_forward_hook(keep(f"projector {side}")),
                mlp.register_forward_hook(keep(side)),
            ]
            model(**row)
            for handle in handles:
                handle.remove()
    delta = (seen["clean"] - seen["corrupt"])[0]
    total = torch.zeros(delta.shape[0])
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for alpha in [(j + 0.5) / steps for j in range(steps)]:
            live = {}

            def move(module, args, output, alpha=alpha):
                start = seen["projector corrupt"]
                return start + alpha * (seen["projector clean"] - start)

            def capture(module, args, output, live=live):
                output.requires_grad_(True)
                live["mlp"] = output
                return output

            handles = [projector.register_forward_hook(move), mlp.register_forward_hook(capture)]
            try:
                logits = model(**rows["corrupt"]).logits[0, -1]
                score = torch.log_softmax(logits.float(), -1)[answer]
                (grad,) = torch.autograd.grad(score, live["mlp"])
            finally:
                for handle in handles:
                    handle.remove()
            total += (grad[0] * delta).sum(-1)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return (total / steps).numpy()


def test_integrated_gradients_equal_a_plain_torch_reference(tiny_llava, llava_sample):
    """Every position of one layer's MLP, to float precision (2 instead of 3 points already
    differs by 1e-3 relative): the path, the midpoints, the
    average and the product with the difference of the two runs are what the docstring says."""
    grid = vt.Grid(sites=("mlp",), windows=(1,))
    estimates = attribute(
        tiny_llava,
        [llava_sample],
        corruption=vt.ImagePair(),
        grid=grid,
        metric=vt.LogProb(),
        method="ig",
        steps=3,
        progress=False,
    )
    engine = effects(estimates, "mlp").isel(sample=0, window=0).sel(layer=1).values
    np.testing.assert_allclose(
        engine, reference_integrated_gradients(tiny_llava, llava_sample, 1, 3), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize(
    "corruption",
    [
        vt.ImagePair(),
        vt.ReplaceSpan("visual"),
        vt.GaussianNoise("visual", samples=2),
        vt.GaussianNoise("image"),
    ],
    ids=["image-pair", "same-length-phrase", "noised-phrase", "noised-image"],
)
def test_the_integrated_gradients_path_ends_at_the_other_run(
    tiny_llava, tiny_blip, llava_sample, blip_sample, corruption
):
    """No warning: the path's last point scores what the other run scores (checked inside)."""
    import warnings

    for vlm, sample in ((tiny_llava, llava_sample), (tiny_blip, blip_sample)):
        for direction in ("denoise", "noise"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", AttributionWarning)
                attribute(
                    vlm,
                    [sample],
                    corruption=corruption,
                    grid=vt.Grid(sites=("mlp",), windows=(1,)),
                    metric=vt.LogProb(),
                    direction=direction,
                    method="ig",
                    steps=2,
                    progress=False,
                )


def test_a_path_between_phrases_of_different_length_warns(tiny_llava, llava_sample):
    with pytest.warns(AttributionWarning, match="path ends"):
        attribute(
            tiny_llava,
            [llava_sample],
            corruption=vt.ReplaceSpan("visual", text="a"),
            grid=vt.Grid(sites=("mlp",)),
            metric=vt.LogProb(),
            method="ig",
            steps=2,
            progress=False,
        )


def test_an_unknown_method_or_no_steps_is_a_clear_error(tiny_llava, llava_sample):
    for bad in ({"method": "atp**"}, {"method": "ig", "steps": 0}):
        with pytest.raises(ValueError, match="method|steps"):
            attribute(tiny_llava, [llava_sample], corruption=vt.ImagePair(), progress=False, **bad)


@pytest.mark.parametrize("method", ["ig", "atp*"])
def test_patch_screens_with_the_estimator_it_is_asked_for(tiny_llava, llava_sample, method):
    kwargs = dict(
        corruption=vt.ImagePair(), grid=vt.Grid(sites=("mlp",), skip=("image",)), metric=vt.LogProb()
    )
    estimates = attribute(tiny_llava, [llava_sample], method=method, progress=False, **kwargs)
    screened = vt.patch(tiny_llava, [llava_sample], screen=3, screen_method=method, progress=False, **kwargs)
    np.testing.assert_array_equal(screened["mlp"].notnull().values, screen(estimates, 3)["mlp"].values)
    assert screened.attrs["screen_method"] == method


def test_material_recall_counts_what_a_wider_screen_patches_exactly():
    """Ranked 3rd and 4th by the estimate, the two material cells are missed by a screen of 2
    and found by one of 4 (exact patching of the 4 then ranks them first)."""
    exact = one_group([[1.0, 0.5, 0.5, 0.5, 0.01, 0.001]])
    guess = one_group([[0.1, 0.0, 0.0, 0.2, 0.9, 0.8]])
    report = agreement(guess, exact, 2, candidates=4)["mlp"]
    assert report["material_overlap"] == 0.0 and report["material_recall"] == 1.0
    assert "material_recall" not in agreement(guess, exact, 2)["mlp"]

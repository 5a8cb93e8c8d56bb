"""Each recipe, run on the shipped organisms, shows what its paper claims the method shows."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

import vlmtrace as vt
import vlmtrace.recipes as registry
from vlmtrace.cli import app
from vlmtrace.data import synthetic_samples

QUIET = vt.Options(progress=False)


@pytest.fixture(scope="module")
def llava() -> vt.VLM:
    return vt.load("shapes-llava")


@pytest.fixture(scope="module")
def blip() -> vt.VLM:
    return vt.load("shapes-blip")


@pytest.fixture(scope="module")
def qwen() -> vt.VLM:
    return vt.load("shapes-qwen")


@pytest.fixture(scope="module")
def organisms(llava, blip, qwen) -> dict[str, vt.VLM]:
    return {"shapes-llava": llava, "shapes-blip": blip, "shapes-qwen": qwen}


SUPPORTED = [(name, organism) for name in registry.names() for organism in registry.get(name).ORGANISMS]


@pytest.mark.parametrize(("name", "organism"), SUPPORTED)
def test_every_recipe_runs_on_its_default_data_of_8_samples_and_draws_and_summarises_it(
    name, organism, organisms, tmp_path
):
    recipe = registry.get(name)
    vlm = organisms[organism]
    samples = recipe.default_samples(vlm, 8, 0)
    small = {"windows": (1, 3)} if "windows" in recipe.run.__code__.co_varnames else {}  # a small grid
    ds = recipe.run(vlm, samples, options=QUIET, **small)
    # universal_heads averages its samples away, but labels heads on every task's samples
    assert ds.sizes.get("sample", 8) == (
        8 * len(registry.get(name).TASKS) if name == "universal_heads" else 8
    )
    assert recipe.figures(ds, tmp_path) and recipe.summary(ds)


def test_default_samples_of_the_head_recipes_all_carry_a_replacement_phrase_and_an_image_pair(llava):
    for name in ("notice", "universal_heads"):
        recipe = registry.get(name)
        for sample in recipe.default_samples(llava, 8, 0):
            assert "visual" in sample.replacements and sample.image_pair is not None, (name, sample.id)


def test_samples_a_recipe_cannot_corrupt_are_left_out_with_a_one_line_note(llava):
    drawn = synthetic_samples(llava, "visual", 6, seed=0)  # every third asks "how many shapes"
    kept, note = registry.fitting(registry.get("notice"), drawn)
    assert len(kept) == 4
    assert note.count("\n") == 0 and "left out 2 of 6" in note and "no replacement phrase" in note


def test_vt_save_is_vlmtraces_own_after_a_trace_ran(llava):
    from vlmtrace import results

    samples = synthetic_samples(llava, "fact", 1, seed=0)
    vt.patch(llava, samples, corruption=vt.ReplaceSpan("visual"), grid=vt.Grid(layers=(0,)), progress=False)
    assert vt.save is results.save  # nnsight mounts a `save` on every object during a trace


def test_every_recipe_is_listed_with_its_paper():
    assert registry.names() == [
        "visual_constraint",
        "multi_constraint",
        "blip_noise",
        "gn_vs_str",
        "notice",
        "information_flow",
        "universal_heads",
        "multimodal_edit",
        "concepts",
    ]


def test_visual_constraint_finds_where_restoring_recovers_the_answer(llava):
    recipe = registry.get("visual_constraint")
    samples = recipe.default_samples(llava, 4, 0)
    ds = recipe.run(llava, samples, options=QUIET)
    gap = float((ds["clean"] - ds["corrupt"]).mean())
    assert gap > 0.5, "replacing the visual constraint should move the answer"
    widest = int(ds["window"].max())
    for site in ("mlp", "attn"):
        restored = (ds[site] - ds["corrupt"]).sel(window=widest).mean("sample")
        assert float(restored.max()) > 0.2 * gap, f"no {site} window restores a fifth of the answer"
        assert float(restored.min()) > -0.05, f"a {site} restore should not push the answer away"
    assert "largest mean indirect effect" in recipe.summary(ds)


def test_restoring_every_token_at_layer_0_recovers_the_clean_answer_of_the_organism(llava):
    samples = synthetic_samples(llava, "fact", 4, seed=1)
    grid = vt.Grid(sites=("block",), positions="all", layers=(0,))
    ds = vt.patch(
        llava, samples, corruption=vt.ReplaceSpan("visual"), grid=grid, metric=vt.KL(), progress=False
    )
    assert float(ds["block"].max()) < 1e-4  # KL to the clean run
    assert float(ds["corrupt"].min()) > 0.1


def test_multi_constraint_cli_writes_a_store_with_layer_position_and_window(tmp_path):
    out = tmp_path / "multi.zarr"
    result = CliRunner().invoke(app, ["recipe", "multi_constraint", "--n-samples", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(out, consolidated=False)
    assert {"layer", "position", "window", "constraint"} <= set(ds.dims)
    assert "figure:" in result.output and "[textual constraint]" in result.output


def test_blip_noise_effects_are_zero_when_the_noise_is_zero(blip):
    recipe = registry.get("blip_noise")
    samples = recipe.default_samples(blip, 2, 0)
    ds = recipe.run(blip, samples, scale=0.0, noise_samples=1, options=QUIET)
    for stack in ("encoder", "decoder"):
        effect = (ds[stack] - ds["corrupt"]).values
        assert np.nanmax(np.abs(effect)) < 1e-6  # float32 rounding of batches of other sizes


def test_blip_noise_restoring_the_final_encoder_layer_helps(blip):
    recipe = registry.get("blip_noise")
    ds = recipe.run(blip, recipe.default_samples(blip, 4, 0), noise_samples=3, options=QUIET)
    assert float(ds["clean"].mean()) > float(ds["corrupt"].mean())
    last = int(ds["layer"].max())
    restored = (ds["encoder"] - ds["corrupt"]).sel(layer=last).max("question_position").mean("sample")
    assert float(restored.squeeze()) > 0


def test_blip_noise_names_the_strongest_restoration_toward_the_clean_run_either_way(blip):
    """Where the noise raises P(answer) (an answer the model does not give, kept with --keep-wrong),
    restoring lowers it: the mirror image of a run (P -> 1 - P everywhere) names the same layers,
    with the sign flipped. It used to name the layer whose restoration moved P furthest *up*."""
    recipe = registry.get("blip_noise")
    ds = recipe.run(blip, recipe.default_samples(blip, 4, 0), noise_samples=3, options=QUIET)
    mirrored = ds.copy()
    for name in ("clean", "corrupt", *recipe.STACKS):
        mirrored[name] = 1 - ds[name]
    lines, flipped = recipe.summary(ds).splitlines(), recipe.summary(mirrored).splitlines()
    assert "the noise raised P(answer)" in flipped[1] and len(flipped) == len(lines) + 1
    for line, other in zip(lines[1:], flipped[2:], strict=True):
        head, tail = line.split("(", 1)
        assert other.startswith(head)  # the same stack and layer
        value = float(tail.split(")")[0])
        assert float(other.split("(", 1)[1].split(")")[0]) == pytest.approx(-value, abs=1e-3)


def test_gn_vs_str_scores_both_corruptions_with_three_metrics(llava):
    recipe = registry.get("gn_vs_str")
    ds = recipe.run(llava, recipe.default_samples(llava, 2, 0), options=QUIET)
    assert list(ds["corruption"].values) == ["gaussian_noise", "str"]
    assert list(ds["metric"].values) == ["probability", "logit_diff", "kl"]
    kl_clean = ds["clean"].sel(metric="kl")
    assert float(np.abs(kl_clean).max()) == 0.0
    assert np.isfinite(recipe.maps(ds).values).any()


def test_notice_patches_modules_then_heads_under_both_corruptions(llava):
    recipe = registry.get("notice")
    ds = recipe.run(llava, recipe.default_samples(llava, 2, 0), options=QUIET)
    assert set(ds["corruption"].values) == {"str", "sip"}
    assert ds["head_effect"].dims == ("corruption", "sample", "layer", "head")
    assert (ds["clean"] > ds["corrupt"]).mean() > 0.5  # both corruptions lower the logit difference
    assert len(recipe.top_heads(ds)) == 2 * 3


def test_information_flow_knocking_out_image_and_question_to_last_at_every_layer_drops_the_answer(llava):
    recipe = registry.get("information_flow")
    layers = llava.shape.layers["lm"]
    ds = recipe.run(llava, recipe.default_samples(llava, 4, 0), windows=(layers,), options=QUIET)
    relative = ds["relative"].sel(block="image+question->last").mean("sample")
    assert float(relative.min()) < -0.5


def test_universal_heads_marks_exactly_k_top_heads_per_condition(llava):
    recipe = registry.get("universal_heads")
    samples = [s for task in recipe.TASKS for s in synthetic_samples(llava, task, 1, seed=0)]
    ds = recipe.run(llava, samples, options=QUIET)
    counts = ds["top"].sum(["layer", "head"])
    assert (counts == recipe.TOP_K).all()
    assert ds["universal"].dims == ("layer", "head")


def test_multi_constraint_with_prefix_reuse_equals_the_plain_run(llava):
    recipe = registry.get("multi_constraint")
    samples = recipe.default_samples(llava, 2, 0)
    plain = recipe.run(llava, samples, windows=(1, 3), options=QUIET)
    reused = recipe.run(llava, samples, windows=(1, 3), options=vt.Options(progress=False, reuse_prefix=True))
    for name in ("mlp", "attn", "clean", "corrupt"):
        np.testing.assert_allclose(reused[name].values, plain[name].values, atol=1e-6, rtol=0)


def test_multi_constraints_figures_show_the_window_and_cell_its_headline_names(llava, tmp_path):
    from vlmtrace.presentation.plots import scales

    recipe = registry.get("multi_constraint")
    ds = recipe.run(llava, recipe.default_samples(llava, 8, 0), windows=(1, 3, 5), options=QUIET)
    named = {
        (constraint, site): int(window)
        for constraint, site, window in re.findall(
            r"\[(\w+) constraint\] (\w+): largest .* window (\d+),", recipe.summary(ds)
        )
    }
    assert len(named) == 4  # two constraints x (mlp, attn)
    paths = {path.name: path for path in recipe.figures(ds, tmp_path)}
    for (constraint, site), window in named.items():
        tag = f"{constraint}_{site}"
        assert {f"{tag}_segments_w{window}.png", f"{tag}_sample0_w{window}.png"} <= set(paths)
        panels = scales(paths[f"{tag}_windows.png"])
        outlined = [p["title"] for p in panels["panels"] if "headline" in p["title"]]
        assert outlined == [f"window {window} (headline, outlined)"]
        assert f"{constraint} constraint replaced" in " ".join(panels["suptitle"].split())

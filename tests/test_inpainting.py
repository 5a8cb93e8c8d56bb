"""vt.InpaintPair: the corrupted image is the clean one with its object region inpainted, by OpenCV or by a
diffusers pipeline (here a tiny random one built from configs, no hub); recipes store the mask and backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vlmtrace as vt
import vlmtrace.recipes as registry
from vlmtrace.cli import app
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.corruptions import CorruptionError
from vlmtrace.engine.inpainting import _CACHE, inpainting_record
from vlmtrace.results.dataset import open_result


@pytest.fixture(scope="module")
def llava() -> vt.VLM:
    return vt.load("shapes-llava")


@pytest.fixture(scope="module")
def samples(llava) -> list[vt.Sample]:
    return registry.get("notice").default_samples(llava, 8, 0)


def test_opencv_removes_the_object_and_changes_no_pixel_outside_its_box(samples):
    sample = samples[0]
    x0, y0, x1, y1 = sample.meta["regions"][0]
    clean = np.asarray(sample.image)
    inpainted = np.asarray(vt.InpaintPair().inpainted(sample))
    outside = np.ones(clean.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    # the scenes' background is black: the object's pixels are filled from it
    assert (inpainted[outside] == clean[outside]).all() and (inpainted[y0:y1, x0:x1] == 0).all()
    assert clean[y0:y1, x0:x1].any()  # there was an object to remove


def test_opencv_inpainting_is_deterministic(samples):
    first = np.asarray(vt.InpaintPair(dilate=1).inpainted(samples[1]))
    _CACHE.clear()
    assert (np.asarray(vt.InpaintPair(dilate=1).inpainted(samples[1])) == first).all()


def test_a_box_a_mask_and_a_function_give_the_same_region(samples):
    sample = samples[2]
    box = sample.meta["regions"][0]
    mask = np.zeros((32, 32), dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    masks = [
        vt.InpaintPair(region=box).mask(sample),
        vt.InpaintPair(region=mask).mask(sample),
        vt.InpaintPair(region=lambda s: s.meta["regions"]).mask(sample),
        vt.InpaintPair().mask(sample),
    ]
    assert all((m == mask).all() for m in masks)


def test_a_sample_without_a_region_is_refused_naming_the_fix(samples):
    bare = samples[0].with_(meta={})
    with pytest.raises(CorruptionError, match="region"):
        vt.InpaintPair().mask(bare)


def test_a_mask_of_another_size_is_refused(samples):
    with pytest.raises(CorruptionError, match="32x32"):
        vt.InpaintPair(region=np.ones((8, 8), dtype=bool)).mask(samples[0])


def test_a_patching_result_records_the_backend(llava, samples):
    ds = vt.patch(llava, samples[:2], corruption=vt.InpaintPair(), grid=vt.Grid(layers=(0,)), progress=False)
    corruption = ds.attrs["corruption"]
    corruption = json.loads(corruption) if isinstance(corruption, str) else corruption
    assert corruption["backend"] == "opencv" and np.isfinite(ds["block"].values).any()


def test_the_record_holds_each_mask_and_inpainted_image(samples):
    record = inpainting_record(vt.InpaintPair(), samples[:3])
    x0, y0, x1, y1 = samples[1].meta["regions"][0]
    assert int(record["inpaint_mask"].isel(sample=1).sum()) == (x1 - x0) * (y1 - y0)
    assert record.attrs["inpainting"]["backend"] == "opencv"


# --- a diffusers inpainting pipeline, tiny and random, built from configs ---------------------------------


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A StableDiffusionInpaintPipeline with a 2-block UNet, VAE and CLIP text encoder, saved to a folder
    (what `AutoPipelineForInpainting.from_pretrained` reads for a Hub id too)."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("inpainting")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "red</w>": 4, "ball</w>": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    blocks = {"block_out_channels": (8, 16), "norm_num_groups": 4}
    unet = diffusers.UNet2DConditionModel(
        **blocks,
        layers_per_block=1,
        sample_size=16,
        in_channels=9,  # latents, mask, masked-image latents: an inpainting UNet
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    vae = diffusers.AutoencoderKL(
        **blocks,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    pipeline = diffusers.StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    return str(folder / "pipeline")


def test_a_diffusers_pipeline_repaints_only_inside_the_region(pipeline_dir, samples):
    sample = samples[0]
    x0, y0, x1, y1 = sample.meta["regions"][0]
    clean = np.asarray(sample.image)
    inpainted = np.asarray(
        vt.InpaintPair(backend=pipeline_dir, steps=1, prompt="a red ball").inpainted(sample)
    )
    outside = np.ones(clean.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert (inpainted[outside] == clean[outside]).all() and (inpainted[~outside] != clean[~outside]).any()


def test_a_diffusers_pipeline_is_seeded(pipeline_dir, samples):
    first = np.asarray(vt.InpaintPair(backend=pipeline_dir, steps=1, seed=3).inpainted(samples[3]))
    _CACHE.clear()
    again = np.asarray(vt.InpaintPair(backend=pipeline_dir, steps=1, seed=3).inpainted(samples[3]))
    assert (first == again).all()


def test_an_unloadable_pipeline_is_refused_naming_the_fix(samples, tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(CorruptionError, match="opencv"):
        vt.InpaintPair(backend=str(tmp_path / "nothing-here"), steps=1).inpainted(samples[0])


# --- in the recipes ---------------------------------------------------------------------------------------


def test_notice_runs_inpainting_from_the_cli_and_stores_mask_and_backend(tmp_path):
    out = tmp_path / "notice.zarr"
    result = CliRunner().invoke(app, ["recipe", "notice", "--out", str(out), "--inpaint", "opencv"])
    assert result.exit_code == 0, result.output
    ds = open_result(out)
    assert "inpaint" in ds["corruption"].values and ds.attrs["inpainting"]["backend"] == "opencv"
    assert bool(ds["inpaint_mask"].any(["y", "x"]).all())
    assert np.isfinite(ds["mlp"].sel(corruption="inpaint").values).any()


def test_gn_vs_str_compares_a_diffusers_inpainting_with_the_other_corruptions(
    llava, pipeline_dir, monkeypatch
):
    recipe = registry.get("gn_vs_str")
    monkeypatch.setattr(
        recipe, "METRICS", {"logit_diff": vt.LogitDiff()}
    )  # one metric of three: a shorter test
    samples = recipe.default_samples(llava, 8, 0)
    inpaint = vt.InpaintPair(backend=pipeline_dir, steps=1)
    ds = recipe.run(llava, samples, options=vt.Options(progress=False, inpaint=inpaint))
    assert ds.attrs["inpainting"]["backend"] == pipeline_dir and ds["inpainted"].sizes["sample"] == 8
    assert np.isfinite(
        ds["normalised"].sel(corruption="inpaint").values
    ).any() and "inpainting" in recipe.summary(ds)


@pytest.mark.slow
def test_notice_runs_a_diffusers_inpainting(llava, pipeline_dir, samples):
    ds = registry.get("notice").run(
        llava,
        samples,
        options=vt.Options(progress=False, inpaint=vt.InpaintPair(backend=pipeline_dir, steps=1)),
    )
    assert ds.attrs["inpainting"]["backend"] == pipeline_dir


@pytest.mark.slow
def test_gn_vs_str_runs_opencv_inpainting(llava):
    recipe = registry.get("gn_vs_str")
    ds = recipe.run(
        llava, recipe.default_samples(llava, 8, 0), options=vt.Options(progress=False, inpaint="opencv")
    )
    assert ds.attrs["inpainting"]["backend"] == "opencv"


def test_synthetic_samples_that_select_a_shape_carry_its_exact_box(llava):
    for sample in synthetic_samples(llava, "fact", 4):
        shape = sample.meta["scene"][sample.meta["selected"]]
        row, column = shape["cell"]
        x0, y0, x1, y1 = sample.meta["regions"][0]
        pixels = np.asarray(sample.image).any(-1)
        assert (
            pixels[y0:y1, x0:x1].any()
            and 8 * column <= x0 < x1 <= 8 * column + 8
            and 8 * row <= y0 < y1 <= 8 * row + 8
        )

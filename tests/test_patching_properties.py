"""Properties any correct patching engine has, checked on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmtrace as vt
from vlmtrace.engine.sites import window_layers


def restore_all(vlm, sample, corruption, *, metric, layer=0, direction="denoise", stack=None):
    grid = vt.Grid(sites=("block",), layers=(layer,), positions="all", stack=stack)
    return vt.patch(
        vlm, [sample], corruption=corruption, grid=grid, metric=metric, direction=direction, progress=False
    )


def test_restoring_every_position_at_layer_0_recovers_clean_logits_llava(tiny_llava, llava_sample):
    ds = restore_all(tiny_llava, llava_sample, vt.ImagePair(), metric=vt.KL())
    assert float(ds["block"].sel(segment="all").squeeze()) == 0.0


def test_restoring_every_position_at_layer_0_recovers_clean_answer_log_prob(tiny_llava, llava_sample):
    ds = restore_all(tiny_llava, llava_sample, vt.ReplaceSpan("visual"), metric=vt.LogProb())
    assert float(ds["block"].squeeze()) == float(ds["clean"].squeeze())
    assert float(ds["corrupt"].squeeze()) != float(ds["clean"].squeeze())


def test_restoring_every_question_position_at_layer_0_recovers_clean_logits_blip(tiny_blip, blip_sample):
    """Text corruption: BLIP's image enters every layer through cross-attention, so only a
    text corruption is fully undone by restoring layer 0."""
    ds = restore_all(tiny_blip, blip_sample, vt.ReplaceSpan("visual"), metric=vt.KL())
    assert float(ds["block"].squeeze()) == 0.0
    assert float(ds["corrupt"].squeeze()) > 1e-4


def test_noising_every_position_at_layer_0_reproduces_the_corrupted_run(tiny_llava, llava_sample):
    ds = restore_all(tiny_llava, llava_sample, vt.ImagePair(), metric=vt.LogProb(), direction="noise")
    assert float(ds["block"].squeeze()) == float(ds["corrupt"].squeeze())


def test_a_patch_that_changes_nothing_reproduces_the_corrupted_run(tiny_llava, llava_sample):
    """In a causal decoder, positions before the replaced span are identical in both runs."""
    grid = vt.Grid(sites=("block", "mlp", "attn"), segments=("image",), windows=(1, 3))
    ds = vt.patch(
        tiny_llava,
        [llava_sample],
        corruption=vt.ReplaceSpan("visual"),
        grid=grid,
        metric=vt.LogProb(),
        progress=False,
    )
    corrupt = float(ds["corrupt"].squeeze())
    for site in ("block", "mlp", "attn"):
        np.testing.assert_allclose(ds[site].values, corrupt, rtol=0, atol=1e-6)


@pytest.mark.parametrize("corruption", [vt.ImagePair(), vt.GaussianNoise("image", samples=3)])
def test_batched_sweep_equals_one_cell_per_forward(tiny_llava, llava_sample, corruption):
    grid = vt.Grid(sites=("mlp", "attn_head"), windows=(1, 2), segments=("visual", "last"))
    kwargs = dict(corruption=corruption, grid=grid, metric=vt.LogProb(), progress=False)
    batched = vt.patch(tiny_llava, [llava_sample], max_batch=256, **kwargs)
    draws = getattr(corruption, "samples", 1)
    one_by_one = vt.patch(tiny_llava, [llava_sample], max_batch=1 + draws + draws, **kwargs)
    for site in ("mlp", "attn_head"):
        assert np.nanstd(batched[site].values) > 1e-4
        np.testing.assert_allclose(batched[site].values, one_by_one[site].values, rtol=0, atol=1e-5)


def test_gaussian_noise_is_reproducible_from_its_seed(tiny_llava, llava_sample):
    def corrupted(seed):
        ds = vt.patch(
            tiny_llava,
            [llava_sample],
            corruption=vt.GaussianNoise("image", samples=2, seed=seed),
            grid=vt.Grid(sites=("block",), layers=(1,), segments=("last",)),
            metric=vt.LogProb(),
            progress=False,
        )
        return float(ds["corrupt"].squeeze())

    assert corrupted(0) == corrupted(0)
    assert corrupted(0) != corrupted(1)


def test_noise_on_a_span_leaves_earlier_positions_untouched(tiny_llava, llava_sample):
    grid = vt.Grid(sites=("block",), segments=("image",), layers=(0,))
    ds = vt.patch(
        tiny_llava,
        [llava_sample],
        corruption=vt.GaussianNoise("visual", samples=2),
        grid=grid,
        metric=vt.LogProb(),
        progress=False,
    )
    np.testing.assert_allclose(ds["block"].values, float(ds["corrupt"].squeeze()), atol=1e-6)
    assert float(ds["corrupt"].squeeze()) != float(ds["clean"].squeeze())


def test_unequal_replacement_aligns_segments_and_leaves_unpartnered_positions_nan(tiny_llava, llava_sample):
    ds = vt.patch(
        tiny_llava,
        [llava_sample],
        corruption=vt.ReplaceSpan("visual", text="a"),
        grid=vt.Grid(sites=("block",), layers=(0,), segments=("visual", "last")),
        metric=vt.LogProb(),
        progress=False,
    )
    values = ds["block"].squeeze().values  # positions: "this", "shape", last
    assert not np.isnan(values[0]) and np.isnan(values[1]) and not np.isnan(values[2])


def test_windows_are_centred_and_clipped_at_both_ends():
    assert window_layers(0, 3, 8) == (0, 1)
    assert window_layers(4, 3, 8) == (3, 4, 5)
    assert window_layers(7, 6, 8) == (4, 5, 6, 7)
    assert window_layers(4, 6, 8) == (1, 2, 3, 4, 5, 6)
    assert window_layers(2, 1, 8) == (2,)


def test_blip_decoder_stack_restoring_start_token_at_every_layer_recovers_clean(tiny_blip, blip_sample):
    grid = vt.Grid(sites=("block",), stack="decoder", windows=(2,), layers=(1,), positions="all")
    ds = vt.patch(
        tiny_blip, [blip_sample], corruption=vt.ImagePair(), grid=grid, metric=vt.KL(), progress=False
    )
    assert float(ds["block"].squeeze()) == pytest.approx(0.0, abs=1e-7)
    assert float(ds["corrupt"].squeeze()) > 1e-4


def test_whole_answer_log_prob_scores_every_answer_token(tiny_llava, llava_sample):
    sample = llava_sample.with_(answer="paris rome")
    ds = vt.patch(
        tiny_llava,
        [sample],
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("block",), layers=(0,), positions="all"),
        metric=vt.LogProb(),
        whole_answer=True,
        progress=False,
    )
    model, processor = tiny_llava.model, tiny_llava.processor
    inputs = processor(text=[sample.prompt + " paris"], images=[sample.image], return_tensors="pt")
    with torch.no_grad():
        log_probs = torch.log_softmax(model(**inputs).logits[0], -1)
    ids = tiny_llava.tokenizer.convert_tokens_to_ids(["paris", "rome"])
    expected = log_probs[-2, ids[0]] + log_probs[-1, ids[1]]
    assert float(ds["clean"].squeeze()) == pytest.approx(float(expected), abs=1e-5)

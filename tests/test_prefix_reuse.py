"""Prefix reuse (skip the layers below a cell's first patched layer) changes speed, not results."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

import vlmtrace as vt

SITES = ("block", "mlp", "attn", "attn_head")


@contextmanager
def skipped_layers(monkeypatch):
    """The distinct numbers of layers the forwards of a sweep skipped (prefix reuse at work)."""
    import vlmtrace.engine.sweep as sweep

    seen: set[int] = set()
    original = sweep.run_plans

    def spy(vlm, plans, *args, **kwargs):
        seen.update(plan.first for plan in plans if plan.first > 0)  # layers skipped below `first`
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", spy)
    found: list[int] = []
    yield found
    found.extend(sorted(seen))


CORRUPTIONS = {
    "replace_span": vt.ReplaceSpan("visual"),
    "image_pair": vt.ImagePair(),
    "noise": vt.GaussianNoise("image", samples=3, seed=5),
}


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_prefix_reuse_equals_the_full_forward_for_every_site_window_and_direction(
    tiny_llava, llava_sample, corruption, direction, monkeypatch
):
    grid = vt.Grid(sites=SITES, windows=(1, 2, 3))
    kwargs = dict(corruption=CORRUPTIONS[corruption], grid=grid, direction=direction, progress=False)
    # a small max_batch, so that cells of one first layer span several chunks
    full = vt.patch(tiny_llava, [llava_sample], max_batch=16, **kwargs)
    with skipped_layers(monkeypatch) as skipped:
        reused = vt.patch(tiny_llava, [llava_sample], max_batch=16, reuse_prefix=True, **kwargs)
    assert skipped == [1, 2], "chunks whose first patched layer is 1 or 2 should skip the layers below"
    for name in (*SITES, "clean", "corrupt"):
        np.testing.assert_allclose(reused[name].values, full[name].values, atol=1e-6, rtol=0, err_msg=name)
    assert np.isfinite(reused["block"].values).any()


def test_a_prefix_reused_sweep_resumes_from_its_own_store(tiny_llava, llava_sample, tmp_path):
    grid = vt.Grid(sites=("block",), windows=(1,))
    kwargs = dict(corruption=vt.ImagePair(), grid=grid, progress=False, max_batch=8)
    full = vt.patch(tiny_llava, [llava_sample], **kwargs)
    store = tmp_path / "reuse.zarr"
    first = vt.patch(tiny_llava, [llava_sample], store=store, reuse_prefix=True, **kwargs)
    again = vt.patch(tiny_llava, [llava_sample], store=store, reuse_prefix=True, **kwargs)
    np.testing.assert_allclose(again["block"].values, full["block"].values, atol=1e-6, rtol=0)
    assert first.attrs["config_hash"] == again.attrs["config_hash"] != full.attrs["config_hash"]
    with pytest.raises(Exception, match="overwrite"):
        vt.patch(tiny_llava, [llava_sample], store=store, **kwargs)  # another configuration


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_prefix_reuse_equals_the_full_forward_on_both_blip_stacks(
    tiny_blip, blip_sample, stack, corruption, monkeypatch
):
    # BLIP reads the image again in every layer (cross-attention): the skipped layers' states
    # alone would not carry the noise, so this also checks that the noise is still applied
    grid = vt.Grid(sites=("block", "mlp", "cross_attn"), windows=(1, 2), stack=stack)
    kwargs = dict(corruption=CORRUPTIONS[corruption], grid=grid, progress=False, max_batch=16)
    full = vt.patch(tiny_blip, [blip_sample], **kwargs)
    with skipped_layers(monkeypatch) as skipped:
        reused = vt.patch(tiny_blip, [blip_sample], reuse_prefix=True, **kwargs)
    assert skipped == [1]
    for name in ("block", "mlp", "cross_attn", "clean", "corrupt"):
        np.testing.assert_allclose(reused[name].values, full[name].values, atol=1e-6, rtol=0, err_msg=name)


def test_prefix_reuse_refuses_a_remote_backend(tiny_llava, llava_sample):
    with pytest.raises(ValueError, match="locally"):
        vt.patch(
            tiny_llava,
            [llava_sample],
            corruption=vt.ImagePair(),
            reuse_prefix=True,
            backend=object(),
            progress=False,
        )


@pytest.mark.parametrize("corruption", ["replace_span", "image_pair", "noise"])
def test_text_position_sweeps_run_only_the_suffix_on_cached_keys_and_values(
    tiny_llava, llava_sample, corruption, monkeypatch
):
    import vlmtrace.engine.sweep as sweep

    starts = []
    original = sweep.resumable_start
    monkeypatch.setattr(sweep, "resumable_start", lambda *a: starts.append(original(*a)) or starts[-1])
    grid = vt.Grid(sites=SITES, windows=(1, 3), skip=("image",))
    kwargs = dict(corruption=CORRUPTIONS[corruption], grid=grid, progress=False, max_batch=16)
    full = vt.patch(tiny_llava, [llava_sample], **kwargs)
    reused = vt.patch(tiny_llava, [llava_sample], reuse_prefix=True, **kwargs)
    assert starts and min(starts) >= 16  # past the 16 image tokens: only the text is recomputed
    for name in (*SITES, "clean", "corrupt"):
        np.testing.assert_allclose(reused[name].values, full[name].values, atol=1e-6, rtol=0, err_msg=name)


def test_the_vision_tower_encodes_each_image_once_per_forward_and_once_per_sample_with_reuse(
    tiny_llava, llava_sample
):
    encoded_rows = []
    embeddings = tiny_llava.model.model.vision_tower.embeddings
    handle = embeddings.register_forward_hook(lambda _m, inputs, _out: encoded_rows.append(len(inputs[0])))
    kwargs = dict(
        corruption=vt.ImagePair(), grid=vt.Grid(sites=("block", "mlp")), progress=False, max_batch=16
    )
    try:
        full = vt.patch(tiny_llava, [llava_sample], **kwargs)
        plain_rows = list(encoded_rows)
        encoded_rows.clear()
        # verify=False: the self-check's two unbatched forwards encode their own images
        reused = vt.patch(tiny_llava, [llava_sample], reuse_prefix=True, verify=False, **kwargs)
    finally:
        handle.remove()
    assert encoded_rows == [2]  # the clean and the paired image, once; every patched row reuses them
    # without reuse, each chunk of 16 rows encodes its two images (the self-check's own
    # unbatched forwards, when not already run in this process, one each): 2 of 16 rows, where
    # every row encoded its image before
    assert set(plain_rows) <= {1, 2} and plain_rows.count(2) >= 8
    np.testing.assert_allclose(reused["block"].values, full["block"].values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("corruption", ["replace_span", "image_pair", "noise"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_image_position_sweeps_resume_inside_the_image_block_from_merged_embeddings(
    tiny_llava, llava_sample, corruption, direction, monkeypatch
):
    import vlmtrace.engine.sweep as sweep

    starts = []
    original = sweep.resumable_start
    monkeypatch.setattr(sweep, "resumable_start", lambda *a: starts.append(original(*a)) or starts[-1])
    grid = vt.Grid(sites=SITES, windows=(1, 2), segments=("image",))
    kwargs = dict(
        corruption=CORRUPTIONS[corruption], grid=grid, direction=direction, progress=False, max_batch=8
    )
    full = vt.patch(tiny_llava, [llava_sample], **kwargs)
    reused = vt.patch(tiny_llava, [llava_sample], reuse_prefix=True, **kwargs)
    ids = tiny_llava.processor(text=[llava_sample.prompt], images=[llava_sample.image])["input_ids"][0]
    image = [i for i, t in enumerate(ids) if t == tiny_llava.shape.image_token_id]
    assert any(image[0] < start <= image[-1] for start in starts)  # chunks start inside the image block
    for name in (*SITES, "clean", "corrupt"):
        np.testing.assert_allclose(reused[name].values, full[name].values, atol=1e-6, rtol=0, err_msg=name)

"""The engine checks itself: `vt.check` on any model, and every sweep's first chunk.

A wrong declaration in an adapter must stop a sweep, not return numbers. The broken adapters
here make mistakes an adapter author can make: padding declared with the wrong value (padded
positions are then attended to), a per-row image tensor declared as tiles, an input left out.
"""

from __future__ import annotations

import dataclasses

import pytest

import vlmtrace as vt
from vlmtrace.engine.invariants import SelfCheckError, probe_sample
from vlmtrace.engine.layouts import LayoutError
from vlmtrace.models.adapter import token
from vlmtrace.models.load import wrap


def attending_to_padding(vlm: vt.VLM) -> vt.VLM:
    """The attention mask declared as padded with ones: padded positions become visible."""
    return rewrapped(vlm, inputs={**vlm.adapter.inputs, "attention_mask": token(pad=1)})


def rewrapped(vlm: vt.VLM, **changes) -> vt.VLM:
    """The same model under an adapter with some declarations changed (deliberately wrong)."""
    broken = dataclasses.replace(vlm.adapter, **changes)
    return dataclasses.replace(vlm, adapter=broken)


def test_every_invariant_holds_on_the_shipped_organisms():
    for name in ("shapes-llava", "shapes-blip"):
        report = vt.check(vt.load(name))
        assert report.ok, str(report)
        assert len(report.invariants) == 8


LONGER = "the red circle of a square"  # six tokens for two: the clean row gets four pads


def test_check_reports_a_padded_row_that_differs_from_the_row_alone(tiny_llava, llava_sample):
    probe = probe_sample(tiny_llava).with_(replacements={"visual": LONGER})
    report = vt.check(attending_to_padding(tiny_llava), probe)
    failed = [invariant.name for invariant in report.invariants if not invariant.ok]
    assert "a padded clean row scores what it scores alone" in failed
    assert "SOME INVARIANTS FAILED" in str(report)


def test_a_sweep_stops_when_its_batched_rows_differ_from_unbatched_forwards(tiny_llava, llava_sample):
    sample = llava_sample.with_(replacements={"visual": LONGER})
    with pytest.raises(SelfCheckError, match="the clean row gives log P.* but the model's own forward gives"):
        vt.patch(
            attending_to_padding(tiny_llava),
            [sample],
            corruption=vt.ReplaceSpan("visual"),
            grid=vt.Grid(layers=(0,)),
            progress=False,
        )


def test_the_self_check_can_be_turned_off_and_then_the_wrong_numbers_appear(tiny_llava, llava_sample):
    sample = llava_sample.with_(replacements={"visual": LONGER})
    kwargs = dict(corruption=vt.ReplaceSpan("visual"), grid=vt.Grid(layers=(0,)), progress=False)
    wrong = vt.patch(attending_to_padding(tiny_llava), [sample], verify=False, **kwargs)
    right = vt.patch(tiny_llava, [sample], **kwargs)
    assert abs(float(wrong["clean"][0]) - float(right["clean"][0])) > 1e-5


def test_an_image_hook_declared_as_tiles_on_a_per_row_tensor_fails_naming_hook_and_shapes(
    tiny_llava, llava_sample
):
    image = dataclasses.replace(tiny_llava.adapter.embeddings["image"], layout="image_tiles")
    broken = rewrapped(
        tiny_llava, embeddings={**tiny_llava.adapter.embeddings, "image": image}, image_units=lambda row: 3
    )
    with pytest.raises(
        LayoutError,
        match=r"'model.multi_modal_projector' is declared 'image_tiles'.*but it is \(55, 16, 64\)",
    ):
        vt.patch(
            broken,
            [llava_sample],
            corruption=vt.GaussianNoise(samples=2),
            grid=vt.Grid(layers=(0,)),
            progress=False,
        )


def test_an_undeclared_model_input_is_an_error_not_a_guess(tiny_llava, llava_sample):
    inputs = {k: v for k, v in tiny_llava.adapter.inputs.items() if k != "pixel_values"}
    broken = rewrapped(tiny_llava, inputs=inputs)
    with pytest.raises(vt.UserError, match="returned the input 'pixel_values'.*does not declare"):
        vt.patch(broken, [llava_sample], corruption=vt.ImagePair(), grid=vt.Grid(layers=(0,)), progress=False)


def test_wrap_installs_the_adapter_fixes_once(tiny_blip):
    model, processor = tiny_blip.model, tiny_blip.processor
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    wrap(model, processor, name="again")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_the_self_check_scores_kl_sweeps_by_log_probability_and_passes(tiny_llava, llava_sample):
    # KL scores each row against row 0; alone, a corrupted row would be its own reference (KL 0)
    ds = vt.patch(
        tiny_llava,
        [llava_sample],
        corruption=vt.GaussianNoise("visual", samples=3),
        grid=vt.Grid(layers=(0,)),
        metric=vt.KL(),
        progress=False,
    )
    assert float(ds["clean"][0]) == 0.0 and float(ds["corrupt"][0]) > 0.0

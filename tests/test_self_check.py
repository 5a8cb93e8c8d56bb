"""Every sweep, and `vt.check`, hold the engine to the model's own forward.

A self-check that compares vlmtrace with vlmtrace passes an adapter that is wrong in the same
way everywhere. Each broken adapter here is a mistake the old self-check let through (issue
19): Qwen2-VL's M-RoPE positions declared as the engine's, an Mllama cross-attention mask
declared right-padded and run in bfloat16 (where a relative tolerance hid it), and PaliGemma
(a prefix LM) declared causal under prefix reuse, whose resumed chunks reported a clean value
no forward of the model gives. Each must stop the sweep and fail `vt.check`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from families import mllama, paligemma, qwen2_vl
from PIL import Image

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.invariants import SelfCheckError
from vlmtrace.engine.native import native_log_probs
from vlmtrace.engine.planning import prepare
from vlmtrace.engine.self_check import SweepCheck
from vlmtrace.models.adapter import ROW_PADDED

SHAPE = "this shape"


def picture(seed: int, size=(32, 32)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sample_for(family, replacement: str = "the circle the circle") -> vt.Sample:
    """A question whose replacement is longer than the phrase, so the clean row is padded."""
    return vt.Sample(
        prompt=family.FAMILY.prompt,
        answer="paris",
        image=picture(0),
        image_pair=picture(1),
        spans={"visual": SHAPE},
        replacements={"visual": replacement},
        id=family.FAMILY.name,
    )


def built(family, dtype=torch.float32) -> vt.VLM:
    model, processor = family.build()
    return vt.wrap(model.to(dtype), processor, name=f"tiny-{family.FAMILY.name}")


def rewrapped(vlm: vt.VLM, **changes) -> vt.VLM:
    return dataclasses.replace(vlm, adapter=dataclasses.replace(vlm.adapter, **changes))


def sweep(vlm: vt.VLM, sample: vt.Sample, **options):
    return vt.patch(
        vlm,
        [sample],
        corruption=vt.ReplaceSpan("visual"),
        grid=vt.Grid(sites=("block",), segments=("visual", "last")),
        progress=False,
        **options,
    )


def failed(report) -> list[str]:
    return [invariant.name for invariant in report.invariants if not invariant.ok]


@pytest.fixture(scope="module")
def qwen() -> vt.VLM:
    return built(qwen2_vl)


@pytest.fixture(scope="module")
def shapes_qwen() -> tuple[vt.VLM, vt.Sample]:
    vlm = vt.load("shapes-qwen")
    return vlm, synthetic_samples(vlm, "fact", 1)[0]


def test_the_engine_equals_the_models_own_forward_on_a_correct_adapter(qwen):
    sample = sample_for(qwen2_vl)
    ds = sweep(qwen, sample, metric=vt.LogProb())
    answer = qwen.tokenizer(" paris", add_special_tokens=False).input_ids[0]
    own = native_log_probs(qwen, sample.prompt, sample.image)
    assert float(ds["clean"][0]) == pytest.approx(float(own[answer]), abs=1e-5)
    assert vt.check(qwen, sample).ok


def test_m_rope_positions_declared_as_the_engines_stop_the_sweep_and_fail_the_check(shapes_qwen):
    vlm, sample = shapes_qwen
    broken = rewrapped(vlm, positions="engine")  # the engine then passes 1-D position ids
    with pytest.raises(SelfCheckError, match="row gives log P.* but the model's own forward gives"):
        vt.patch(
            broken, [sample], corruption=vt.ImagePair(), grid=vt.Grid(segments=("last",)), progress=False
        )
    assert vt.check(vlm).ok
    assert any("equals the model's own forward" in name for name in failed(vt.check(broken)))


def test_a_wrong_mllama_mask_is_caught_in_bfloat16():
    vlm = built(mllama, torch.bfloat16)
    sample = sample_for(mllama)
    sweep(vlm, sample)  # the right declaration passes in bfloat16
    broken = rewrapped(vlm, inputs={**vlm.adapter.inputs, "cross_attention_mask": ROW_PADDED})
    with pytest.raises(SelfCheckError, match="model's own forward"):
        sweep(broken, sample)
    report = vt.check(broken, sample)
    assert any("padded clean row equals the model's own forward" in name for name in failed(report))


def test_a_prefix_lm_declared_causal_is_caught_in_a_resumed_chunk():
    vlm = built(paligemma)
    stack = dataclasses.replace(vlm.adapter.stacks["lm"], causal=True)
    broken = rewrapped(vlm, stacks={"lm": stack})
    sample = sample_for(paligemma, replacement="the circle")
    sweep(vlm, sample, reuse_prefix=True, max_batch=8)  # declared right, prefix reuse passes
    with pytest.raises(SelfCheckError, match="row gives log P"):  # its resumed rows, from the first
        sweep(broken, sample, reuse_prefix=True, max_batch=8)


def test_a_later_chunk_whose_baseline_rows_differ_from_the_first_stops_the_sweep(qwen):
    """The second line of defence: samples the model's own forward was not asked about are held
    to their first forward (a resumed prefix-reuse chunk, another packing)."""
    prepared = prepare(qwen, sample_for(qwen2_vl), vt.ReplaceSpan("visual"), vt.LogProb(), False)
    check = SweepCheck(qwen)
    ids = check.probes_for(3, prepared, native=False)
    first = torch.tensor([[-1.0] * len(ids), [-2.0] * len(ids)])
    check.verify(3, prepared, first)
    check.verify(3, prepared, first + 5e-5)  # within float32's 1e-4 nats
    with pytest.raises(SelfCheckError, match="baseline row gives log P.* but its first forward gives"):
        check.verify(3, prepared, first + torch.tensor([[0.0], [0.3]]))


def test_the_tolerance_can_be_set_and_a_tight_one_is_still_met(qwen):
    ds = sweep(qwen, sample_for(qwen2_vl), verify=1e-6)
    assert np.isfinite(ds["clean"].values).all()

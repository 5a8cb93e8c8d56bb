"""Cross-sample batching (`vlmtrace.engine.packing`) changes how many forwards a sweep takes, not its values.

Each test sweeps samples of unequal prompt lengths twice: packed (the default: a forward that
one sample's cells leave room in takes the next samples' rows) and one sample per forward
(`pack_samples=False`), and requires every value to agree. A spy on `sweep.run_plans` counts
the samples of each forward, so that no test passes without a forward that packs several.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from families.qwen2_vl import FAMILY as QWEN2_VL
from test_families import picture

import vlmtrace as vt
import vlmtrace.engine.sweep as sweep
from vlmtrace.engine.self_check import SweepCheck
from vlmtrace.results.store import SweepStore

TOLERANCE = dict(rtol=1e-5, atol=1e-6)

QUESTIONS = (  # unequal lengths, every word in the tiny tokenizers' vocabularies
    "which city did this shape represent in year 2006 ?",
    "which city did this shape represent ?",
    "this shape represent which city ?",
    "which city did this shape represent in year 2006 in year 2006 ?",
)


def samples(n: int = 8, *, template: str = "<image> {question}") -> list[vt.Sample]:
    return [
        vt.Sample(
            prompt=template.format(question=QUESTIONS[i % len(QUESTIONS)]),
            answer="paris",
            image=picture(10 + i, (32, 32)),
            image_pair=picture(40 + i, (32, 32)),
            spans={"visual": "this shape"},
            replacements={"visual": "the circle" if i % 2 else "this"},  # unequal lengths too
            foil="rome",
            id=f"s{i}",
        )
        for i in range(n)
    ]


@contextmanager
def forwards(monkeypatch):
    """The number of samples of each forward a sweep ran (`run_plans` calls: one scoring group
    per sample)."""
    seen: list[int] = []
    original = sweep.run_plans

    def spy(vlm, plans, *args, **kwargs):
        seen.extend(len(plan.scoring) for plan in plans)
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", spy)
    yield seen
    monkeypatch.setattr(sweep, "run_plans", original)


def assert_same(got, expected, names) -> None:
    for name in names:
        np.testing.assert_allclose(got[name].values, expected[name].values, err_msg=name, **TOLERANCE)
    assert np.array_equal(got["done"].values, expected["done"].values)


def packed_and_alone(vlm, batch, monkeypatch, **kwargs):
    """(packed result, one-sample-per-forward result, samples per packed forward)."""
    with forwards(monkeypatch) as seen:
        packed = vt.patch(vlm, batch, progress=False, **kwargs)
    with forwards(monkeypatch) as apart:
        alone = vt.patch(vlm, batch, progress=False, pack_samples=False, **kwargs)
    assert max(seen) > 1, "no forward held rows of two samples: the test compared nothing packed"
    assert max(apart) == 1 and len(seen) <= len(apart)
    return packed, alone, seen


CORRUPTIONS = {
    "replace_span": lambda: vt.ReplaceSpan("visual"),
    "image_pair": lambda: vt.ImagePair(),
    "image_noise": lambda: vt.GaussianNoise("image", samples=2, seed=5),
    "token_noise": lambda: vt.GaussianNoise("visual", samples=2, seed=5),
}
SEGMENTS = vt.Grid(sites=("mlp", "block"), windows=(1, 3), positions="segments")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_packed_llava_sweep_equals_one_sample_per_forward(tiny_llava, corruption, direction, monkeypatch):
    packed, alone, _ = packed_and_alone(
        tiny_llava,
        samples(),
        monkeypatch,
        corruption=CORRUPTIONS[corruption](),
        grid=SEGMENTS,
        direction=direction,
        max_batch=48,
    )
    assert_same(packed, alone, ("mlp", "block", "clean", "corrupt"))


@pytest.mark.parametrize("metric", [vt.KL(), vt.LogitDiff(), vt.LogProb()])
def test_every_sample_is_scored_by_its_own_answer_and_clean_row(tiny_llava, metric, monkeypatch):
    batch = samples()
    for i in range(0, len(batch), 2):  # other answers and foils: a shared answer would pass wrongly
        batch[i] = batch[i].with_(answer="rome", foil="tokyo")
    packed, alone, _ = packed_and_alone(
        tiny_llava,
        batch,
        monkeypatch,
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("attn_head",), windows=(1,), positions="segments", segments=("visual", "last")),
        metric=metric,
        max_batch=64,
    )
    assert_same(packed, alone, ("attn_head", "clean", "corrupt"))


def test_whole_answers_of_unequal_lengths(tiny_llava, monkeypatch):
    batch = [s.with_(answer="paris rome" if i % 2 else "paris") for i, s in enumerate(samples())]
    packed, alone, _ = packed_and_alone(
        tiny_llava,
        batch,
        monkeypatch,
        corruption=vt.ReplaceSpan("visual"),
        grid=SEGMENTS,
        metric=vt.LogProb(),
        whole_answer=True,
        max_batch=48,
    )
    assert_same(packed, alone, ("mlp", "block", "clean", "corrupt"))


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("corruption", ["image_pair", "image_noise"])
def test_packed_blip_sweep_equals_one_sample_per_forward(tiny_blip, stack, corruption, monkeypatch):
    grid = vt.Grid(sites=("block", "cross_attn"), windows=(1,), stack=stack, positions="segments")
    packed, alone, _ = packed_and_alone(
        tiny_blip,
        samples(template="{question}"),
        monkeypatch,
        corruption=CORRUPTIONS[corruption](),
        grid=grid,
        max_batch=48,
    )
    assert_same(packed, alone, ("block", "cross_attn", "clean", "corrupt"))


def test_blip_answers_of_unequal_decoder_lengths_run_apart(tiny_blip, monkeypatch):
    """A decoder-predicted answer is read from the decoder's first positions: samples whose
    decoder inputs differ in length are never padded into one forward."""
    batch = [
        s.with_(answer="paris rome" if i >= 4 else "paris")
        for i, s in enumerate(samples(template="{question}"))
    ]
    grid = vt.Grid(sites=("block",), windows=(1,), stack="decoder")
    with forwards(monkeypatch) as seen:
        packed = vt.patch(
            tiny_blip,
            batch,
            corruption=vt.ImagePair(),
            grid=grid,
            metric=vt.LogProb(),
            whole_answer=True,
            max_batch=64,
            progress=False,
        )
    alone = vt.patch(
        tiny_blip,
        batch,
        corruption=vt.ImagePair(),
        grid=grid,
        metric=vt.LogProb(),
        whole_answer=True,
        max_batch=64,
        progress=False,
        pack_samples=False,
    )
    assert seen == [4, 4]  # the short answers together, the long ones together
    assert_same(packed, alone, ("block", "clean", "corrupt"))


@functools.cache
def qwen2_vl() -> vt.VLM:
    model, processor = QWEN2_VL.build()
    return vt.wrap(model, processor, name="tiny-qwen2_vl")


@pytest.mark.parametrize("corruption", ["replace_span", "image_pair", "image_noise"])
def test_packed_flat_input_family_equals_one_sample_per_forward(corruption, monkeypatch):
    """Qwen2-VL: flat patches concatenated over rows, positions made by the model (M-RoPE),
    and image noise on the merger's [image token, hidden] output, by each row's token count."""
    template = QWEN2_VL.prompt.replace("which city did this shape represent in year 2006 ?", "{question}")
    batch = [s.with_(replacements={"visual": "the circle"}) for s in samples(8, template=template)]
    packed, alone, _ = packed_and_alone(
        qwen2_vl(),
        batch,
        monkeypatch,
        corruption=CORRUPTIONS[corruption](),
        grid=vt.Grid(sites=("mlp",), windows=(1,), positions="segments"),
        max_batch=64,
    )
    assert_same(packed, alone, ("mlp", "clean", "corrupt"))


STORE_KWARGS = dict(
    corruption=vt.ImagePair(),
    grid=vt.Grid(sites=("mlp",), windows=(1, 2), positions="segments"),
    max_batch=24,
    progress=False,
)


@pytest.fixture
def reference(tiny_llava):
    return vt.patch(tiny_llava, samples(), pack_samples=False, **STORE_KWARGS)


def test_a_store_killed_after_a_packed_forward_resumes_to_the_same_values(
    tiny_llava, reference, tmp_path, monkeypatch
):
    store = tmp_path / "killed.zarr"
    original = sweep.run_plans
    seen: list[int] = []

    def dies_at_the_fifth(vlm, plans, *args, **kwargs):
        if len(seen) == 4:
            raise KeyboardInterrupt
        seen.extend(len(plan.scoring) for plan in plans)
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        vt.patch(tiny_llava, samples(), store=store, **STORE_KWARGS)
    partial = vt.open_result(store)
    progress, done = partial["progress"].values, partial["done"].values
    assert max(seen) > 1 and done.any() and not done.all()
    assert ((progress > 0) & ~done).any(), "a packed forward should have left a sample half done"
    monkeypatch.setattr(sweep, "run_plans", original)
    resumed = vt.patch(tiny_llava, samples(), store=store, **STORE_KWARGS)
    assert_same(resumed, reference, ("mlp", "clean", "corrupt"))


def test_a_store_killed_between_the_writes_of_one_forward_resumes(
    tiny_llava, reference, tmp_path, monkeypatch
):
    """A forward that finishes sample i and starts i + 1 writes both; a kill between the two
    writes leaves i finished and i + 1 where it was, and the rerun goes on from there."""
    store = tmp_path / "between.zarr"
    original = SweepStore.write
    written: list[int] = []

    def dies_at_the_first_second_write(self, ds, sample):
        if written and sample == written[-1] + 1 and ds["progress"].values[sample] > 0 and len(written) > 1:
            raise KeyboardInterrupt
        written.append(sample)
        return original(self, ds, sample)

    monkeypatch.setattr(SweepStore, "write", dies_at_the_first_second_write)
    with pytest.raises(KeyboardInterrupt):
        vt.patch(tiny_llava, samples(), store=store, **STORE_KWARGS)
    partial = vt.open_result(store)
    killed_at = written[-1] + 1
    assert partial["done"].values[written[-1]] and int(partial["progress"].values[killed_at]) == 0
    monkeypatch.setattr(SweepStore, "write", original)
    resumed = vt.patch(tiny_llava, samples(), store=store, **STORE_KWARGS)
    assert_same(resumed, reference, ("mlp", "clean", "corrupt"))


def test_shards_of_a_packed_sweep_fill_the_store_of_one_process(tiny_llava, reference, tmp_path):
    store = tmp_path / "sharded.zarr"
    for i in range(2):
        vt.patch(tiny_llava, samples(), store=store, shard=(i, 2), **STORE_KWARGS)
    assert_same(vt.open_result(store), reference, ("mlp", "clean", "corrupt"))


def test_out_of_memory_halves_a_packed_forward(tiny_llava, monkeypatch):
    kwargs = dict(
        STORE_KWARGS, grid=vt.Grid(sites=("mlp",), windows=(1,), positions="segments"), max_batch=64
    )
    expected = vt.patch(tiny_llava, samples(), pack_samples=False, **kwargs)
    original = sweep.run_plans
    sizes: list[tuple[int, int]] = []

    def small_memory(vlm, plans, *args, **kwargs):
        (plan,) = plans  # run here, one forward at a time
        sizes.append((len(plan.scoring), plan.rows))  # one scoring group per sample
        if plan.rows > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", small_memory)
    got = vt.patch(tiny_llava, samples(), **kwargs)
    assert sizes[0][0] > 1 and sizes[0][1] > 40  # the first forward packed samples and failed
    assert any(n > 1 and rows <= 40 for n, rows in sizes), "halved forwards should still pack"
    assert_same(got, expected, ("mlp", "clean", "corrupt"))


def test_the_self_check_verifies_the_most_padded_sample_of_the_first_forward(tiny_llava, monkeypatch):
    checked = []
    original = SweepCheck._native

    def spy(check, prepared):
        checked.append(prepared.sample.id)
        return original(check, prepared)

    monkeypatch.setattr(SweepCheck, "_native", spy)
    batch = samples(4)  # s0 (longest but s3) .. s3; all four share the first forward
    vt.patch(
        tiny_llava,
        batch,
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp",), windows=(1,), positions="segments"),
        max_batch=64,
        progress=False,
    )
    assert checked == ["s2"]  # the shortest prompt: the most left padding


def test_screening_selects_the_same_cells_packed(tiny_llava, monkeypatch):
    packed, alone, _ = packed_and_alone(
        tiny_llava,
        samples(),
        monkeypatch,
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp",), windows=(1,)),
        screen=3,
        max_batch=32,
    )
    assert_same(packed, alone, ("mlp", "clean", "corrupt"))

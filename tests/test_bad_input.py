"""Bad input gets an error that names the problem and the fix, raised before any work."""

from __future__ import annotations

import pytest
import torch
import transformers

import vlmtrace as vt
from vlmtrace.data.loaders.question import DatasetError
from vlmtrace.engine.admission import AdmissionError
from vlmtrace.engine.corruptions import CorruptionError
from vlmtrace.engine.inputs import AnswerTokenWarning
from vlmtrace.engine.positions import MissingImageTokenError, SpanNotFoundError
from vlmtrace.engine.sites import GridError
from vlmtrace.models.adapter import UnknownArchitectureError


def patch(vlm, sample, **kwargs):
    kwargs.setdefault("corruption", vt.ImagePair())
    kwargs.setdefault("grid", vt.Grid(sites=("block",), layers=(0,), segments=("last",)))
    return vt.patch(vlm, [sample], progress=False, **kwargs)


def test_a_constraint_span_missing_from_the_prompt_is_named(tiny_llava, llava_sample):
    sample = llava_sample.with_(spans={"visual": "this place"})
    with pytest.raises(SpanNotFoundError, match="'visual' = 'this place' does not occur"):
        patch(tiny_llava, sample)


def test_a_llava_prompt_without_the_image_token_is_refused(tiny_llava, llava_sample):
    sample = llava_sample.with_(prompt="which city did this shape represent in year 2006 ?")
    with pytest.raises(MissingImageTokenError, match="Put the processor's image placeholder"):
        patch(tiny_llava, sample)


def test_symmetric_replacement_of_another_length_is_refused(tiny_llava, llava_sample):
    with pytest.raises(CorruptionError, match="'this shape' is 2 tokens but 'a' is 1"):
        patch(tiny_llava, llava_sample, corruption=vt.SymmetricTokenReplacement("visual", text="a"))


def test_an_unknown_architecture_names_the_adapter_fields(tiny_llava):
    with pytest.raises(UnknownArchitectureError, match="stacks.*register"):
        vt.wrap(torch.nn.Linear(2, 2), tiny_llava.processor, name="linear")


def test_loading_an_unknown_architecture_fails_before_reading_weights(tmp_path):
    config = transformers.BertConfig(architectures=["BertForMaskedLM"])
    config.save_pretrained(tmp_path)  # a config and no weights at all
    with pytest.raises(UnknownArchitectureError, match="no adapter for BertForMaskedLM"):
        vt.load(str(tmp_path))


def test_a_multi_token_answer_warns_which_token_is_scored(tiny_llava, llava_sample):
    with pytest.warns(AnswerTokenWarning, match="scores only the first, 'paris'"):
        patch(tiny_llava, llava_sample.with_(answer="paris rome"))


def test_an_answer_outside_the_vocabulary_is_refused(tiny_llava, llava_sample):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        patch(tiny_llava, llava_sample.with_(answer="zanzibar"))


def test_a_window_larger_than_the_model_is_refused(tiny_llava, llava_sample):
    with pytest.raises(GridError, match="window 7 does not fit a stack of 3 layers"):
        patch(tiny_llava, llava_sample, grid=vt.Grid(windows=(7,)))


def test_a_head_index_out_of_range_is_refused(tiny_llava, llava_sample):
    with pytest.raises(GridError, match="head 9 is out of range: the model has 4 heads"):
        patch(tiny_llava, llava_sample, grid=vt.Grid(sites=("attn_head",), heads=(9,)))


def test_a_site_the_model_lacks_is_refused(tiny_llava, llava_sample):
    with pytest.raises(GridError, match="site 'cross_attn' is not available"):
        patch(tiny_llava, llava_sample, grid=vt.Grid(sites=("cross_attn",)))


def test_logit_difference_without_a_foil_is_refused(tiny_llava, llava_sample):
    with pytest.raises(ValueError, match="needs a foil answer"):
        patch(tiny_llava, llava_sample.with_(foil=None), metric=vt.LogitDiff())


def test_an_image_pair_corruption_needs_a_pair(tiny_llava, llava_sample):
    with pytest.raises(CorruptionError, match="has no image_pair"):
        patch(tiny_llava, llava_sample.with_(image_pair=None))


def test_an_empty_data_set_is_refused(tiny_llava):
    with pytest.raises(ValueError, match="data set is empty"):
        vt.patch(tiny_llava, [], corruption=vt.ImagePair(), progress=False)


def test_a_span_replacement_without_a_phrase_says_where_to_put_one(tiny_llava, llava_sample):
    with pytest.raises(CorruptionError, match="set Sample.replacements"):
        patch(tiny_llava, llava_sample.with_(replacements={}), corruption=vt.ReplaceSpan("visual"))


def test_a_corruption_that_changes_nothing_is_reported_by_sample(tiny_llava, llava_sample):
    from vlmtrace.engine.planning import NoEffectWarning

    unchanged = llava_sample.with_(image_pair=llava_sample.image)
    with pytest.warns(NoEffectWarning, match="q0.*normalised effects are NaN"):
        patch(tiny_llava, unchanged)


def test_a_full_disk_is_reported_and_finished_chunks_are_kept(
    tiny_llava, llava_sample, tmp_path, monkeypatch
):
    import errno

    import xarray as xr

    from vlmtrace.results.dataset import StoreError

    grid = vt.Grid(sites=("mlp",), skip=("image",))
    store = tmp_path / "t.zarr"
    original = xr.Dataset.to_zarr
    writes = {"n": 0}

    def fills_up(self, *args, **kwargs):
        if kwargs.get("region") is not None:
            writes["n"] += 1
            if writes["n"] > 6:  # two chunks (pending digests, values, ledger) fit, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", fills_up)
    with pytest.raises(StoreError, match="No space left on device.*rerun the same command"):
        patch(tiny_llava, llava_sample, grid=grid, store=store, max_batch=6)
    monkeypatch.setattr(xr.Dataset, "to_zarr", original)
    assert int(vt.open_result(store)["progress"].sum()) == 8  # 2 chunks x 4 cells survived


def test_a_non_blocking_submit_backend_in_a_sweep_names_the_modes_that_work(tiny_llava, llava_sample):
    from vlmtrace.remote.client import ServerBackend

    submit = ServerBackend("tiny-llava", host="http://127.0.0.1:9", api_key="k", mode="submit")
    with pytest.raises(ValueError, match="mode='poll'"):
        vt.patch(tiny_llava, [llava_sample], corruption=vt.ImagePair(), backend=submit, progress=False)


# --- issue 20: inputs that used to return numbers, refused before any forward ------------------


def nan_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), mode="F")


def test_an_all_nan_image_is_refused(tiny_llava, llava_sample):
    with pytest.raises(AdmissionError, match="image holds non-finite pixel values"):
        patch(tiny_llava, llava_sample.with_(image=nan_image()))


def test_a_prompt_longer_than_the_models_positions_is_refused(tiny_llava, llava_sample):
    long = "<image> " + "which city " * 300 + "did this shape represent in year 2006 ?"
    with pytest.raises(AdmissionError, match=r"is \d+ tokens .* more than the 256 positions the model has"):
        patch(tiny_llava, llava_sample.with_(prompt=long))


def test_a_span_that_holds_the_prompts_last_token_is_refused(tiny_llava, llava_sample):
    ends = llava_sample.with_(prompt="<image> which city did this shape represent in year 2006")
    with pytest.raises(AdmissionError, match="span 'textual' = 'year 2006' holds the prompt's last token"):
        patch(tiny_llava, ends)


def test_a_prompt_ending_in_its_image_placeholder_is_refused(tiny_llava, llava_sample):
    late = llava_sample.with_(prompt="which city did this shape represent in year 2006 ? <image>")
    with pytest.raises(AdmissionError, match="ends in its image placeholder"):
        patch(tiny_llava, late)


def test_the_image_token_as_the_answer_is_refused(tiny_llava, llava_sample):
    with pytest.raises(AdmissionError, match="the answer '<image>' is .* the image token"):
        patch(tiny_llava, llava_sample.with_(answer="<image>"))


def test_a_nan_answer_is_refused(tiny_llava, llava_sample):
    with pytest.raises(AdmissionError, match="answer is NaN, a missing value"):
        patch(tiny_llava, llava_sample.with_(answer=float("nan")))


def test_a_nan_in_a_jsonl_table_is_refused_by_the_loader(tmp_path):
    from vlmtrace.data.loaders import load_dataset

    (tmp_path / "q.jsonl").write_text('{"image": "a.png", "question": "which city ?", "answer": NaN}\n')
    with pytest.raises(DatasetError, match="line 1 of .*q.jsonl holds NaN, which is not JSON"):
        load_dataset(tmp_path / "q.jsonl")


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (None, "image is None, but this model reads an image"),
        (b"\x89PNG", "image is bytes, not an image"),
        ("scene.png", "image is the path 'scene.png', not an image"),
        ("http://example.com/scene.png", "image is the URL .* fetches nothing from the network"),
    ],
)
def test_an_image_that_is_not_a_picture_is_refused(tiny_llava, llava_sample, image, says):
    with pytest.raises(AdmissionError, match=says):
        patch(tiny_llava, llava_sample.with_(image=image))


def test_an_empty_image_is_refused(tiny_llava, llava_sample):
    from PIL import Image

    with pytest.raises(AdmissionError, match="image is 0×0 pixels"):
        patch(tiny_llava, llava_sample.with_(image=Image.new("RGB", (0, 0))))


def test_two_image_placeholders_are_refused(tiny_llava, llava_sample):
    twice = llava_sample.with_(prompt="<image> <image> which city did this shape represent in year 2006 ?")
    with pytest.raises(AdmissionError, match="holds 2 image placeholders"):
        patch(tiny_llava, twice)


@pytest.mark.parametrize(
    ("samples", "says"),
    [
        ("one", "got a single Sample: pass \\[sample\\]"),
        ("generator", "got generator: pass list"),
        ("none", "samples\\[0\\] is None, not a Sample"),
    ],
)
def test_samples_that_are_not_a_list_of_samples_are_refused(tiny_llava, llava_sample, samples, says):
    given = {"one": llava_sample, "generator": (s for s in [llava_sample]), "none": [None]}[samples]
    with pytest.raises(AdmissionError, match=says):
        vt.patch(tiny_llava, given, corruption=vt.ImagePair(), progress=False)


@pytest.mark.parametrize("metric", [vt.Probability, None, "probability"])
def test_a_metric_that_is_not_a_metric_instance_is_refused(tiny_llava, llava_sample, metric):
    with pytest.raises(AdmissionError, match="metric"):
        patch(tiny_llava, llava_sample, metric=metric)


@pytest.mark.parametrize("seed", [1.5, float("nan"), 2**70])
def test_a_noise_seed_torch_cannot_take_is_refused(tiny_llava, llava_sample, seed):
    with pytest.raises(CorruptionError, match="whole-number seed between 0 and 2\\*\\*63 - 1"):
        patch(tiny_llava, llava_sample, corruption=vt.GaussianNoise("image", samples=2, seed=seed))


@pytest.mark.parametrize("memory", [float("nan"), float("inf")])
def test_a_memory_limit_that_is_not_finite_is_refused(tiny_llava, llava_sample, memory):
    with pytest.raises(AdmissionError, match="max_memory must be a finite number of bytes"):
        patch(tiny_llava, llava_sample, max_memory=memory)
    with pytest.raises(vt.UserError, match="max_memory must be a finite number of bytes"):
        vt.Options(max_memory=memory)


def test_a_float_shard_is_refused(tiny_llava, llava_sample):
    with pytest.raises(AdmissionError, match="shard must be two whole numbers"):
        patch(tiny_llava, llava_sample, shard=(0.5, 2))


@pytest.mark.parametrize(("field", "value"), [("layers", ()), ("heads", ()), ("segments", ())])
def test_an_empty_grid_is_refused(field, value):
    with pytest.raises(GridError, match=rf"Grid\({field}=\(\)\) is empty"):
        vt.Grid(sites=("attn_head",), **{field: value})


def test_a_grid_that_skips_every_segment_is_refused(tiny_llava, llava_sample):
    every = ("image", "question", "visual", "textual", "last", "special")
    with pytest.raises(GridError, match="the grid selects no position of any sample"):
        patch(tiny_llava, llava_sample, grid=vt.Grid(sites=("block",), skip=every))


def test_a_device_torch_does_not_know_is_refused_before_loading(tmp_path):
    from vlmtrace.models.load import NotAModelError

    with pytest.raises(NotAModelError, match="device 'bogus' is not a device"):
        vt.load(str(tmp_path), device="bogus")


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    from vlmtrace.models.load import NotAModelError

    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(
        NotAModelError, match=r"is a folder but not a model: it has no config.json .*notes.txt"
    ):
        vt.load(str(tmp_path))

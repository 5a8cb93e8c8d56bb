"""Results are labelled Datasets that survive a zarr round trip with their provenance."""

from __future__ import annotations

import json

import pytest

import vlmtrace as vt
from vlmtrace.results import StoreError


@pytest.fixture
def result(tiny_llava, llava_sample):
    return vt.patch(
        tiny_llava,
        [
            llava_sample,
            llava_sample.with_(id="q1", image=llava_sample.image_pair, image_pair=llava_sample.image),
        ],
        corruption=vt.GaussianNoise("image", samples=2, seed=5),
        grid=vt.Grid(sites=("mlp", "attn_head"), windows=(1, 3), segments=("visual", "last")),
        metric=vt.LogitDiff(),
        progress=False,
    )


def test_result_dims_and_coordinates_are_named(result):
    assert result["mlp"].dims == ("sample", "window", "layer", "position")
    assert result["attn_head"].dims == ("sample", "window", "layer", "head", "position")
    assert list(result["sample"].values) == ["q0", "q1"]
    assert list(result["token"].sel(sample="q0").values) == ["this", "shape", "?"]
    assert list(result["label"].sel(sample="q0").values) == ["visual", "visual", "last"]


def test_provenance_records_model_corruption_metric_and_versions(result):
    attrs = result.attrs
    assert attrs["model"] == "tiny-llava" and attrs["metric"] == "logit_diff"
    assert json.loads(attrs["corruption"]) == {
        "kind": "gaussian_noise",
        "target": "image",
        "scale": 3.0,
        "samples": 2,
        "seed": 5,
    }
    assert {"version_vlmtrace", "version_nnsight", "version_torch", "version_transformers"} <= set(attrs)


def test_zarr_round_trip_is_identical(result, tmp_path):
    path = vt.save(result, tmp_path / "trace.zarr")
    back = vt.open_result(path)
    assert back.identical(result)
    assert back.attrs == result.attrs


def test_saving_over_an_existing_store_needs_overwrite(result, tmp_path):
    vt.save(result, tmp_path / "trace.zarr")
    with pytest.raises(StoreError, match="overwrite=True"):
        vt.save(result, tmp_path / "trace.zarr")


def test_normalised_effect_is_one_for_clean_and_zero_for_corrupt(result):
    data = result.copy()
    data["mlp"] = data["clean"].broadcast_like(data["mlp"])
    assert float(vt.normalised(data, "mlp").mean()) == pytest.approx(1.0)
    data["mlp"] = data["corrupt"].broadcast_like(data["mlp"])
    assert float(vt.normalised(data, "mlp").mean()) == pytest.approx(0.0)

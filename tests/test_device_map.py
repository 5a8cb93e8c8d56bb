"""Models bigger than one device: `load(device="auto")` splits them with accelerate, and a sweep on
the split model equals the unsplit one.

What is tested here, on a CPU-only machine: the shipped organism loaded with `device="auto"`
and a `max_memory` that holds only its first layers, so accelerate's device map puts the
vision tower, projector, embeddings and layer 0 in CPU memory and the other layers and the
LM head on disk (`offload_folder`); the offloaded weights stay on the meta device and
accelerate's hooks load them for each forward. The recipes' own code paths (answer check,
restoration sweeps, per-head patching, attention knockout) then run through those hooks.

What is not tested here: a split over several GPUs (activations moved between devices by
the hooks), which needs the GPUs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmtrace as vt
from vlmtrace import recipes as registry
from vlmtrace.models.load import DevicePlacementError
from vlmtrace.options import Options

HOLDS_LAYER_0 = {"cpu": "1MB"}
"""CPU memory for the vision tower, projector, embeddings and the first decoder layer only."""


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> vt.VLM:
    folder = tmp_path_factory.mktemp("offload")
    return vt.load("shapes-llava", device="auto", max_memory=HOLDS_LAYER_0, offload_folder=folder)


@pytest.fixture(scope="module")
def whole() -> vt.VLM:
    return vt.load("shapes-llava")


def traced(recipe: str, vlm: vt.VLM):
    """The recipe as the CLI runs it: its samples, those the model answers, the sweep."""
    module = registry.get(recipe)
    samples = registry.usable(module, vlm, module.default_samples(vlm, n=8, seed=0)).samples
    return module.run(vlm, samples, seed=0, options=Options(progress=False))


def test_the_device_map_keeps_the_first_layers_in_memory_and_the_rest_on_disk(split):
    placement = split.model.hf_device_map
    assert placement["model.language_model.layers.0"] == "cpu"
    assert placement["model.language_model.layers.5"] == "disk" and placement["lm_head"] == "disk"


def test_offloaded_weights_are_not_in_memory_between_forwards(split):
    layer = split.model.model.language_model.layers[5]
    assert {p.device for p in layer.parameters()} == {torch.device("meta")}


@pytest.mark.parametrize("recipe", ["visual_constraint", "notice", "information_flow"])
def test_a_recipe_on_the_split_model_equals_the_unsplit_model(split, whole, recipe):
    """Restoration sweeps (visual_constraint), per-head patching (notice), knockout (information_flow)."""
    expected, got = traced(recipe, whole), traced(recipe, split)
    assert list(got.data_vars) == list(expected.data_vars) and got.sizes == expected.sizes
    for name in expected.data_vars:
        if expected[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name].values, expected[name].values, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name].values, expected[name].values, err_msg=name)


def test_placement_options_without_device_auto_are_refused():
    with pytest.raises(DevicePlacementError, match="give device='auto'"):
        vt.load("shapes-llava", device="cpu", max_memory=HOLDS_LAYER_0)


def test_a_device_map_that_offloads_the_first_modules_is_refused_naming_max_memory(tmp_path):
    with pytest.raises(DevicePlacementError, match="Give the first device more memory in max_memory"):
        vt.load("shapes-llava", device="auto", max_memory={"cpu": "1KB"}, offload_folder=tmp_path)

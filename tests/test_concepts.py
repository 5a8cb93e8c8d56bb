"""Visual complex concepts (the seed's B_s / B_d sets): pairs built from CLEVR's scenes and the organisms'
scenes, and `vlmtrace recipe concepts` from CLEVR files on disk to a store."""

from __future__ import annotations

import json

import layouts
import numpy as np
import pytest
from typer.testing import CliRunner

from vlmtrace.cli import app
from vlmtrace.data.concepts import Concept, clevr_concept_samples, interleaved, synthetic_concept_samples
from vlmtrace.data.loaders import DatasetError
from vlmtrace.results.dataset import open_result

RED_CYLINDER = Concept.conjunction("color", "red", "shape", "cylinder")
METAL_OR_CUBE = Concept.disjunction("material", "metal", "shape", "cube")


def scene_objects(root, scene_id: str) -> list[dict]:
    """The objects CLEVR's scenes file lists for `clevr-{image_index}` (read here, not by the library)."""
    scenes = json.loads((root / "scenes" / "CLEVR_val_scenes.json").read_text())["scenes"]
    return next(s["objects"] for s in scenes if f"clevr-{s['image_index']}" == scene_id)


def test_and_pairs_a_red_cylinder_with_scenes_of_each_member_of_b_d_in_turn(tmp_path):
    root = layouts.clevr_concept_scenes(tmp_path / "CLEVR_v1.0")
    samples = clevr_concept_samples(RED_CYLINDER, root, 6)
    for sample in samples:
        clean = scene_objects(root, sample.meta["clean_image"])
        pair = scene_objects(root, sample.meta["pair_id"])
        assert any(o["color"] == "red" and o["shape"] == "cylinder" for o in clean)
        assert not any(o["color"] == "red" and o["shape"] == "cylinder" for o in pair)
    assert [s.meta["member"] for s in samples[:3]] == [
        "red AND NOT cylinder",
        "NOT red AND cylinder",
        "NOT red AND NOT cylinder",
    ]


def test_or_pairs_each_member_of_b_s_with_a_scene_of_neither(tmp_path):
    root = layouts.clevr_concept_scenes(tmp_path / "CLEVR_v1.0")
    samples = clevr_concept_samples(METAL_OR_CUBE, root, 3)
    for sample in samples:
        clean = scene_objects(root, sample.meta["clean_image"])
        pair = scene_objects(root, sample.meta["pair_id"])
        assert any(o["material"] == "metal" or o["shape"] == "cube" for o in clean)
        assert all(o["material"] != "metal" and o["shape"] != "cube" for o in pair)
    members = ["metal AND NOT cube", "NOT metal AND cube", "metal AND cube"]
    assert [s.meta["member"] for s in samples] == members
    assert samples[0].prompt == "Is there a metal thing or a cube?"
    assert samples[0].spans == {"concept": "metal thing or a cube"}


def test_scenes_without_b_d_are_refused_naming_the_set(tmp_path):
    root = layouts.clevr_concept_scenes(tmp_path / "CLEVR_v1.0")
    only_cubes = Concept.disjunction("shape", "cube", "size", "large")  # every object is large
    with pytest.raises(DatasetError, match="B_d"):
        clevr_concept_samples(only_cubes, root, 2)


def test_synthetic_pairs_change_only_the_target_object(tmp_path):
    for concept in (
        Concept.conjunction("colour", "red", "kind", "square"),
        Concept.disjunction("colour", "red", "kind", "square"),
    ):
        for sample in synthetic_concept_samples(concept, 6):
            x0, y0, x1, y1 = sample.meta["regions"][0]
            changed = (np.asarray(sample.image) != np.asarray(sample.image_pair)).any(-1)
            outside = changed.copy()
            outside[y0:y1, x0:x1] = False
            assert changed.any() and not outside.any()
            assert concept.holds(_attributes(sample.meta["clean_member"], concept))
            assert not concept.holds(_attributes(sample.meta["pair_member"], concept))


def test_synthetic_pairs_ask_for_the_attribute_the_member_changes_and_name_the_object_by_the_other():
    concept = Concept.conjunction("colour", "red", "kind", "square")
    for sample in synthetic_concept_samples(concept, 4):
        target = next(o for o in sample.meta["scene"] if o["colour"] == "red" and o["kind"] == "square")
        if sample.meta["member"] == "red AND NOT square":
            assert sample.prompt == "what kind is the red shape ?" and sample.answer == "square"
            assert sample.foil in ("circle", "triangle", "cross")
        else:
            assert sample.meta["member"] == "NOT red AND square" and sample.answer == target["colour"]
            assert sample.prompt == "what colour is the square shape ?" and sample.foil != "red"


def test_synthetic_pairs_differ_in_the_one_attribute_they_ask_for():
    for operator in (Concept.conjunction, Concept.disjunction):
        for sample in synthetic_concept_samples(operator("colour", "red", "kind", "square"), 6):
            clean, pair = sample.meta["scene"], sample.meta["pair_scene"]
            pairs = enumerate(zip(clean, pair, strict=True))
            differences = [(i, key) for i, (a, b) in pairs for key in a if a[key] != b[key]]
            assert [key for _, key in differences] == [sample.meta["changed"]]
            assert (sample.answer, sample.foil) == tuple(
                scene[differences[0][0]][sample.meta["changed"]] for scene in (clean, pair)
            )
            assert np.array_equal(np.asarray(sample.image_pair), render_scene(pair))


def render_scene(objects: list[dict]) -> np.ndarray:
    from vlmtrace.data.drawing import Shape, render

    shapes = (Shape(**{**o, "cell": tuple(o["cell"]), "jitter": tuple(o["jitter"])}) for o in objects)
    return render(tuple(shapes))


def _attributes(member: str, concept: Concept) -> dict[str, str]:
    """An object of `member` ("NOT red AND square"), written from the member's words for the check."""
    first, second = member.split(" AND ")
    return {
        concept.first[0]: concept.first[1] if not first.startswith("NOT ") else "other",
        concept.second[0]: concept.second[1] if not second.startswith("NOT ") else "other",
    }


def test_interleaving_keeps_both_concepts_in_a_cut():
    ands, ors = ["a1", "a2", "a3"], ["o1", "o2"]
    assert interleaved([ands, ors], 4) == ["a1", "o1", "a2", "o2"]


def test_concepts_runs_from_clevr_scenes_on_disk_to_a_store_with_traced_cells(tmp_path):
    root = layouts.clevr_concept_scenes(tmp_path / "CLEVR_v1.0")
    out = tmp_path / "concepts.zarr"
    args = ["recipe", "concepts", "--data", str(root), "--out", str(out), "--n-samples", "8", "--keep-wrong"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = open_result(out)
    assert ds.sizes["sample"] == 8 and sorted(set(ds["concept"].values)) == ["AND", "OR"]
    traced = np.isfinite(ds["block"]).any("position")  # prompts of AND and OR differ in length: padded
    assert bool(traced.all()) and ds.attrs["data"]["kept"] == 8

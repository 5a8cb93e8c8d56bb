"""Loaders of NOTICE's semantic image pairs (SVO-Probes, MIT-States, facial expressions) and of the seed's
proposed data sets (COOCO, ShapeWorld, CLEVR-Math), on tiny copies written in their published layouts
(`tests/layouts.py`). `tests/test_data_end_to_end.py` runs each layout from the CLI to a store."""

from __future__ import annotations

from pathlib import Path

import layouts
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtrace.cli import app
from vlmtrace.data.loaders import DatasetError, load_cooco, load_dataset
from vlmtrace.results.dataset import open_result


def shows(picture: Image.Image | None, path: Path) -> bool:
    """The loaded image is the file's (its pixels, decoded the same way)."""
    with Image.open(path) as expected:
        return picture is not None and np.array_equal(
            np.asarray(picture), np.asarray(expected.convert("RGB"))
        )


def test_svo_probes_rows_become_two_questions_whose_images_pair_each_other(tmp_path):
    csv_file = layouts.svo_probes(tmp_path / "svo" / "svo_probes.csv")
    positive, negative = load_dataset(csv_file)[:2]
    images = tmp_path / "svo" / "images"
    assert (
        (positive.answer, positive.foil, negative.answer, negative.foil) == ("bike", "boat", "boat", "bike")
        and positive.spans == negative.spans == {"visual": "bike or boat"}
        and shows(positive.image, images / "5000.jpg")
        and shows(positive.image_pair, images / "5001.jpg")
        and shows(negative.image_pair, images / "5000.jpg")
    )


def test_svo_probes_asks_about_the_role_the_negative_changes(tmp_path):
    samples = load_dataset(layouts.svo_probes(tmp_path / "svo" / "svo_probes.csv"))
    verb = [s for s in samples if s.meta["negative"] == "verb"]
    assert [s.prompt for s in verb] == ["is lady ride or walk bike?"] * 2


def test_mit_states_pairs_each_image_with_the_same_noun_in_another_state(tmp_path):
    root = layouts.mit_states(tmp_path / "mit")
    states = root / "release_dataset" / "images"
    for sample in load_dataset(root):
        noun, foil = sample.meta["noun"], sample.foil
        partners = sorted((states / f"{foil} {noun}").iterdir())
        assert sample.spans["visual"] in (f"{sample.answer} or {foil}", f"{foil} or {sample.answer}")
        assert any(shows(sample.image_pair, p) for p in partners) and foil != sample.answer


def test_mit_states_folders_named_by_the_noun_alone_are_not_read(tmp_path):
    samples = load_dataset(layouts.mit_states(tmp_path / "mit"))
    assert len(samples) == 12 and all(" " in Path(s.meta["image"]).parent.name for s in samples)


def test_mit_states_never_asks_to_choose_between_near_synonyms(tmp_path):
    root = tmp_path / "mit"
    for i, state in enumerate(["old car", "ancient car", "new car", "rusty car"]):
        layouts.image(root / "release_dataset" / "images" / state / "image_0.jpg", i)
    foils = {s.answer: s.foil for s in load_dataset(root)}
    assert foils == {"old": "new", "ancient": "new", "rusty": "new", "new": foils["new"]}
    assert foils["new"] in ("old", "ancient", "rusty")


def test_facial_expressions_pair_each_face_with_a_face_of_the_foils_emotion(tmp_path):
    root = layouts.facial_expressions(tmp_path / "faces")
    samples = load_dataset(root, n=8)
    train = root / "images" / "train"
    assert {s.answer for s in samples} == {"angry", "happy"} and all(
        any(shows(s.image_pair, p) for p in (train / s.foil).iterdir()) for s in samples
    )


def test_facial_expressions_ask_with_nouns_made_adjectives(tmp_path):
    root = layouts.facial_expressions(tmp_path / "faces")
    (root / "images" / "train" / "angry").rename(root / "images" / "train" / "disgust")
    answers = {s.answer for s in load_dataset(root)}
    assert answers == {"disgusted", "happy"}


def test_cooco_asks_about_the_original_scene_paired_with_the_edited_one(tmp_path):
    root = layouts.cooco(tmp_path / "cooco")
    sample = next(s for s in load_dataset(root) if s.meta["replacement"] == "owl")
    edited = root / "generated_images" / "000000478726__kitchen__cup__owl_relscore_low.jpg"
    assert (
        (sample.answer, sample.foil, sample.meta["relatedness"]) == ("cup", "owl", "low")
        and shows(sample.image, root / "images" / "000000478726.jpg")
        and shows(sample.image_pair, edited)
    )


def test_cooco_by_scene_folders_takes_the_target_from_the_original_file_name(tmp_path):
    root = layouts.cooco_by_scene(tmp_path / "cooco")
    samples = load_dataset(root)
    folder = root / "generated_images" / "living_room"
    teddy = next(s for s in samples if s.meta["replacement"] == "toy car")
    assert (
        (teddy.answer, teddy.foil, teddy.meta["relatedness"], teddy.meta["scene"])
        == ("teddy bear", "toy car", "middle", "living room")
        and shows(teddy.image, folder / "000000004321_living_room_teddy_bear_original.jpg")
        and shows(
            teddy.image_pair, folder / "000000004321_living_room_teddy_bear_toy_car_relscore_middle.jpg"
        )
    )
    assert len(samples) == 6  # the same-target control and the clean (object removed) files are not read


def test_cooco_reads_the_same_target_control_only_when_asked(tmp_path):
    root = layouts.cooco(tmp_path / "cooco")
    levels = [s.meta["relatedness"] for s in load_dataset(root)]
    control = load_cooco(root, levels=("same_target",))
    assert "same_target" not in levels and [(s.prompt, s.answer) for s in control] == [
        ("Is there a bus in the scene?", "yes")
    ]


def knocked_out(data, out):
    """`vlmtrace recipe information_flow` on `data` at n = 8, into `out`; the store it wrote.
    The organisms answer these real words wrongly, so the run keeps them (`--keep-wrong`)."""
    args = ["recipe", "information_flow", "--data", str(data), "--out", str(out), "--n-samples", "8"]
    result = CliRunner().invoke(app, [*args, "--keep-wrong"])
    assert result.exit_code == 0, result.output
    return open_result(out)


def test_cooco_relatedness_is_a_coordinate_of_the_stored_results(tmp_path):
    data = layouts.cooco(tmp_path / "cooco")
    ds = knocked_out(data, tmp_path / "cooco.zarr")
    expected = {s.id: s.meta["relatedness"] for s in load_dataset(data)}
    assert ds["relatedness"].dims == ("sample",) and [str(level) for level in ds["relatedness"].values] == [
        expected[str(i)] for i in ds["sample"].values
    ]


@pytest.mark.parametrize("layout", [layouts.mit_states, layouts.facial_expressions], ids=lambda f: f.__name__)
def test_a_notice_pair_set_reaches_traced_cells_from_the_cli_at_n_8(tmp_path, layout):
    """The cheap knockout recipe; `notice` on every pair set is the README's command (slow tests)."""
    data = layout(tmp_path / "data")
    ds = knocked_out(data, tmp_path / "run.zarr")
    traced = np.isfinite(ds["knockout"]).any(["block", "window", "layer"])
    assert ds.sizes["sample"] == 8 and bool(traced.all())


def test_shapeworld_captions_are_answered_by_their_agreement(tmp_path):
    samples = load_dataset(layouts.shapeworld(tmp_path / "shapeworld"))
    expected = ["yes" if agreement else "no" for _, agreement, _, _ in layouts.SHAPEWORLD_WORLDS]
    assert [s.answer for s in samples] == expected and samples[
        0
    ].prompt == "Is it true that there is a red square?"


def test_shapeworld_world_model_boxes_become_object_regions_in_pixels(tmp_path):
    samples = load_dataset(layouts.shapeworld(tmp_path / "shapeworld"))
    assert samples[0].meta["regions"] == [(8.0, 16.0, 24.0, 32.0)]
    assert "regions" not in samples[1].meta  # world 1 shows a blue circle; the caption names a red square


def test_shapeworld_worlds_with_several_captions_are_read_block_by_block(tmp_path):
    root = layouts.shapeworld(tmp_path / "shapeworld")
    (root / "world_model.json").unlink()
    for n in range(2, 10):
        (root / f"world-{n}.bmp").unlink()
    (root / "caption.txt").write_text(
        "a square is red .\nthere is a cross .\n\nthere is a circle .\na shape is blue .\n"
    )
    (root / "agreement.txt").write_text("1.0;0.0\n0.5;1.0\n")
    samples = load_dataset(root)
    assert [(s.meta["world"], s.meta["caption"], s.answer) for s in samples] == [
        (0, "a square is red", "yes"),
        (0, "there is a cross", "no"),
        (1, "a shape is blue", "yes"),  # agreement 0.5: ambiguous, not read
    ]


def test_clevr_math_finds_clevr_images_by_split(tmp_path):
    root = layouts.clevr_math(tmp_path / "clevr-math")
    sample = load_dataset(root)[4]
    assert (
        (sample.answer, sample.meta["template"]) == ("5", "subtraction")
        and sample.prompt == "Remove all blue spheres. How many objects are left?"
        and shows(sample.image, root / "CLEVR_v1.0" / "images" / "val" / "CLEVR_val_000004.png")
    )


def test_clevr_math_with_several_splits_and_no_val_asks_which_to_load(tmp_path):
    root = layouts.clevr_math(tmp_path / "clevr-math")
    (root / "clevr-math-val.json").rename(root / "clevr-math-train.json")
    (root / "clevr-math-test.json").write_text((root / "clevr-math-train.json").read_text())
    with pytest.raises(DatasetError, match="pass the one to load"):
        load_dataset(root)

"""E-VQA (MMEdit) and VLKEB edit records, written here in their published layout, read as cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import vlmtrace as vt
from vlmtrace.data.edit_case import PROBES, probes_of
from vlmtrace.data.loaders.edit_records import load_edit_records
from vlmtrace.data.loaders.question import DatasetError
from vlmtrace.data.scenes import make_samples
from vlmtrace.engine.editing import edit, evaluate

PROMPT = "<image> {question}"


def _write(root: Path, name: str, records: list[dict]) -> Path:
    path = root / name
    path.write_text(json.dumps(records))
    return path


def _vlkeb(root: Path) -> tuple[Path, list[vt.Sample]]:
    """A VLKEB folder: VLKEB_images/mmkb_images/<entity>/*.png and eval_multihop.json."""
    scenes = make_samples("fact", 6, seed=21)
    folder = root / "VLKEB_images" / "mmkb_images"
    for i, scene in enumerate(scenes):
        (folder / f"m.{i}").mkdir(parents=True)
        scene.image.save(folder / f"m.{i}" / "google_0.png")
    record = {
        "src": scenes[0].prompt.removeprefix("<image> "),
        "pred": scenes[0].answer,
        "alt": "brenmoor" if scenes[0].answer != "brenmoor" else "avalor",
        "rephrase": "the cross shape is the mascot of which city ?",
        "image": "m.0/google_0.png",
        "image_rephrase": "m.1/google_0.png",
        "loc": "the blue circle is the mascot of which city ?",
        "loc_ans": "cindral",
        "m_loc": "m.2/google_0.png",
        "m_loc_q": "what colour is the circle shape ?",
        "m_loc_a": "blue",
        "port_new": [
            {"port_type": "1-hop", "Q&A": {"Question": "which city in year 2006 ?", "Answer": "dunhollow"}},
            {"port_type": "2-hop", "Q&A": {"Question": "which city in year 2010 ?", "Answer": "avalor"}},
        ],
    }
    empty = {**record, "alt": ""}  # left out, as VLKEB's and EasyEdit's loaders do
    second = {**record, "image": "m.3/google_0.png", "alt": "cindral", "port_new": []}
    return _write(root, "eval_multihop.json", [record, empty, second]), scenes


def test_a_vlkeb_file_reads_into_cases_with_every_probe_and_its_image(tmp_path):
    path, scenes = _vlkeb(tmp_path)
    cases = load_edit_records(path, prompt_template=PROMPT)
    assert len(cases) == 2
    first = cases[0]
    assert first.request.new_answer in ("brenmoor", "avalor")
    assert first.request.sample.prompt == scenes[0].prompt
    probes = first.probes
    assert sorted(probes) == sorted(PROBES)
    assert [s.answer for s in probes["portability"]] == ["dunhollow", "avalor"]
    assert [s.meta["hop"] for s in probes["portability"]] == [1, 2]
    assert probes["text_generality"][0].prompt == "<image> the cross shape is the mascot of which city ?"
    pixels = [np.asarray(probes[k][0].image) for k in ("reliability", "image_generality", "image_locality")]
    for got, scene in zip(pixels, (scenes[0], scenes[1], scenes[2]), strict=True):
        assert np.array_equal(got, np.asarray(scene.image.convert("RGB")))
    text = probes["text_locality"][0]
    assert text.image is None and text.prompt == "the blue circle is the mascot of which city ?"
    assert text.answer == "cindral" and probes["image_locality"][0].answer == "blue"
    assert first.request.sample.meta["pred"] == scenes[0].answer
    assert first.request.sample.meta["dataset"] == "vlkeb"
    assert "portability" not in cases[1].probes and cases[1].request.sample.id == "vlkeb-2/reliability"
    only_two = load_edit_records(path, prompt_template=PROMPT, hops=(2,), n=1)
    assert len(only_two) == 1 and [s.answer for s in only_two[0].probes["portability"]] == ["avalor"]


def test_an_e_vqa_file_reads_images_from_the_coco_and_rephrase_folders(tmp_path):
    scenes = make_samples("visual", 3, seed=4)
    for folder, scene in (("val2014", scenes[0]), ("rephrase", scenes[1])):
        (tmp_path / folder).mkdir()
        scene.image.save(tmp_path / folder / "COCO_val2014_000000000001.jpg", quality=100)
    record = {
        "src": "what colour is the cross shape ?", "pred": "red", "alt": "green",
        "rephrase": "which colour is the cross shape ?", "image": "val2014/COCO_val2014_000000000001.jpg",
        "image_rephrase": "COCO_val2014_000000000001.jpg", "loc": "nq question: who wrote it", "loc_ans": "x",
        "m_loc": "val2014/COCO_val2014_000000000001.jpg", "m_loc_q": "what is it ?", "m_loc_a": "y",
    }  # fmt: skip
    path = _write(tmp_path, "vqa_eval.json", [record])
    (case,) = load_edit_records(path, tmp_path, rephrase_images=tmp_path / "rephrase", prompt_template=PROMPT)
    assert case.request.sample.id == "e_vqa-0/reliability" and "portability" not in case.probes
    reliability, rephrased = case.probes["reliability"][0], case.probes["image_generality"][0]
    assert reliability.image.tobytes() != rephrased.image.tobytes()
    assert np.abs(np.asarray(rephrased.image, float) - np.asarray(scenes[1].image, float)).mean() < 3  # jpeg


def test_edit_records_refuse_a_file_of_another_layout_and_name_missing_images(tmp_path):
    with pytest.raises(DatasetError, match="has no 'image_rephrase'"):
        other = [{"src": "q", "alt": "a", "rephrase": "r", "image": "i"}]
        load_edit_records(_write(tmp_path, "a.json", other))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_edit_records(_write(tmp_path, "b.json", {"questions": []}))
    path, _ = _vlkeb(tmp_path)
    (tmp_path / "VLKEB_images" / "mmkb_images" / "m.1" / "google_0.png").unlink()
    with pytest.raises(FileNotFoundError, match="m.1/google_0.png.*images="):
        load_edit_records(path, prompt_template=PROMPT)


def test_vlkeb_records_edited_and_evaluated_end_to_end_into_a_store(tmp_path):
    path, _ = _vlkeb(tmp_path)
    cases = load_edit_records(path, prompt_template=PROMPT, n=1)
    vlm = vt.load("shapes-llava")
    ordinary = [s for f in ("fact", "visual") for s in make_samples(f, 16, seed=5, split="train")]
    changed = edit(vlm, [c.request for c in cases], layers=(5,), preserve=ordinary, span="last")
    probes = probes_of(cases)
    probes.pop("text_locality")  # LLaVA's adapter reads no prompt without an image
    scores = evaluate(vlm, changed, **probes)
    vt.save(scores, tmp_path / "scores.zarr")
    stored = vt.open_result(tmp_path / "scores.zarr")
    assert float(stored["score"].sel(metric="reliability", model="edited")) == 1.0
    assert float(stored["score"].sel(metric="reliability", model="unedited")) == 0.0
    assert {"portability", "image_locality", "efficacy", "specificity"} <= set(stored["metric"].values)
    assert list(stored["probe"].sel(item=stored["set"] == "portability").values) == ["portability"] * 2

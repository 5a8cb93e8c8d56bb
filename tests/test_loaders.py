"""Specification of the dataset loaders (vlmtrace.data.loaders), on tiny files in the published formats."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import layouts
import pytest
from PIL import Image

from vlmtrace.data.loaders import (
    DatasetError,
    SkippedSamplesWarning,
    load_clevr,
    load_coco_qa,
    load_dataset,
    load_gqa,
    load_table,
    load_vqa_v2,
)

LLAVA = "USER: <image>\n{question} ASSISTANT:"


def _image(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> Path:
    """A small image whose size tells which file was loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)
    return path


def _json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# --- VQA v2 ------------------------------------------------------------------------------------


def _vqa(root: Path, *, image_names: str = "COCO_val2014_{:012d}.jpg", image_folder: str = "images") -> Path:
    """DIR/v2_OpenEnded_mscoco_val2014_questions.json + annotations, images for ids 9 and 42."""
    _json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 9, "question": "What color is the bus?", "question_id": 9000},
                {"image_id": 42, "question": "How many dogs are there?", "question_id": 42001},
            ],
        },
    )
    _json(
        root / "v2_mscoco_val2014_annotations.json",
        {
            "annotations": [
                {
                    "question_id": 42001,
                    "image_id": 42,
                    "multiple_choice_answer": "2",
                    "answers": [{"answer": "2", "answer_id": i} for i in range(1, 11)],
                    "answer_type": "number",
                    "question_type": "how many",
                },
                {
                    "question_id": 9000,
                    "image_id": 9,
                    "multiple_choice_answer": "red",
                    "answers": [{"answer": "red", "answer_id": i} for i in range(1, 11)],
                    "answer_type": "other",
                    "question_type": "what color is the",
                },
            ]
        },
    )
    _image(root / image_folder / image_names.format(9), (12, 8))
    _image(root / image_folder / image_names.format(42), (10, 6))
    return root


def _load_vqa(root: Path, **options) -> list:
    return load_vqa_v2(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        root / "v2_mscoco_val2014_annotations.json",
        root / "images",
        **options,
    )


def test_vqa_v2_prompt_is_the_question_in_the_template(tmp_path):
    samples = _load_vqa(_vqa(tmp_path), prompt_template=LLAVA)
    assert samples[0].prompt == "USER: <image>\nWhat color is the bus? ASSISTANT:"


def test_vqa_v2_default_prompt_is_the_bare_question(tmp_path):
    assert _load_vqa(_vqa(tmp_path))[0].prompt == "What color is the bus?"


def test_vqa_v2_keeps_the_raw_question_in_meta(tmp_path):
    samples = _load_vqa(_vqa(tmp_path), prompt_template=LLAVA)
    assert samples[1].meta["question"] == "How many dogs are there?"


def test_vqa_v2_answer_is_the_multiple_choice_answer_of_the_same_question(tmp_path):
    assert [s.answer for s in _load_vqa(_vqa(tmp_path))] == ["red", "2"]


def test_vqa_v2_keeps_the_ten_human_answers_in_meta(tmp_path):
    assert _load_vqa(_vqa(tmp_path))[0].meta["answers"] == ["red"] * 10


def test_vqa_v2_ids_are_dataset_and_question_id(tmp_path):
    assert [s.id for s in _load_vqa(_vqa(tmp_path))] == ["vqa_v2-9000", "vqa_v2-42001"]


def test_vqa_v2_finds_images_named_with_the_coco_2014_split_prefix(tmp_path):
    assert [s.image.size for s in _load_vqa(_vqa(tmp_path))] == [(12, 8), (10, 6)]


def test_vqa_v2_finds_images_named_by_bare_id(tmp_path):
    samples = _load_vqa(_vqa(tmp_path, image_names="{:012d}.jpg"))
    assert [s.image.size for s in samples] == [(12, 8), (10, 6)]


def test_vqa_v2_finds_images_in_a_split_folder_inside_the_image_folder(tmp_path):
    samples = _load_vqa(_vqa(tmp_path, image_folder="images/val2014"))
    assert [s.image.size for s in samples] == [(12, 8), (10, 6)]


def test_vqa_v2_images_are_rgb(tmp_path):
    root = _vqa(tmp_path)
    Image.new("L", (12, 8)).save(root / "images" / "COCO_val2014_000000000009.jpg", format="JPEG")
    assert _load_vqa(root)[0].image.mode == "RGB"


def test_vqa_v2_question_without_annotation_is_an_error_naming_the_split_fix(tmp_path):
    root = _vqa(tmp_path)
    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": []})
    with pytest.raises(DatasetError, match="annotations file of the same split"):
        _load_vqa(root)


def test_vqa_v2_missing_image_error_names_the_image_and_the_questions_file(tmp_path):
    root = _vqa(tmp_path)
    (root / "images" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"COCO_val2014_000000000042\.jpg.*questions\.json"):
        _load_vqa(root)


# --- GQA ---------------------------------------------------------------------------------------


def _gqa(root: Path) -> Path:
    _json(
        root / "val_balanced_questions.json",
        {
            "201307251": {
                "imageId": "2354786",
                "question": "Is the sky dark?",
                "answer": "yes",
                "fullAnswer": "Yes, the sky is dark.",
                "types": {"structural": "verify"},
            },
            "05515938": {
                "imageId": "n161313",
                "question": "What is on the table?",
                "answer": "cup",
                "fullAnswer": "The cup is on the table.",
            },
        },
    )
    _image(root / "images" / "2354786.jpg", (9, 7))
    _image(root / "images" / "n161313.jpg", (7, 9))
    return root


def test_gqa_answer_is_the_short_answer(tmp_path):
    root = _gqa(tmp_path)
    assert [s.answer for s in load_gqa(root / "val_balanced_questions.json", root / "images")] == [
        "yes",
        "cup",
    ]


def test_gqa_keeps_the_full_answer_in_meta(tmp_path):
    root = _gqa(tmp_path)
    samples = load_gqa(root / "val_balanced_questions.json", root / "images")
    assert samples[0].meta["full_answer"] == "Yes, the sky is dark."


def test_gqa_images_are_named_by_image_id(tmp_path):
    root = _gqa(tmp_path)
    samples = load_gqa(root / "val_balanced_questions.json", root / "images")
    assert [s.image.size for s in samples] == [(9, 7), (7, 9)]


def test_gqa_ids_keep_the_question_id_as_written(tmp_path):
    root = _gqa(tmp_path)
    samples = load_gqa(root / "val_balanced_questions.json", root / "images")
    assert [s.id for s in samples] == ["gqa-201307251", "gqa-05515938"]


def test_gqa_unanswered_split_is_an_error(tmp_path):
    _json(tmp_path / "test_balanced_questions.json", {"1": {"imageId": "a", "question": "Is it?"}})
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="load the val or testdev"):
        load_gqa(tmp_path / "test_balanced_questions.json", tmp_path / "images")


def test_gqa_loader_rejects_a_vqa_questions_file(tmp_path):
    root = _vqa(tmp_path)
    with pytest.raises(DatasetError, match="not a GQA questions file"):
        load_gqa(root / "v2_OpenEnded_mscoco_val2014_questions.json", root / "images")


# --- CLEVR -------------------------------------------------------------------------------------


def _clevr_question(question: str, answer: str = "no", image: int = 0, index: int = 0) -> dict:
    return {
        "image_index": image,
        "image_filename": f"CLEVR_val_{image:06d}.png",
        "question": question,
        "answer": answer,
        "question_index": index,
        "question_family_index": 7,
        "split": "val",
    }


def _clevr(root: Path) -> Path:
    """CLEVR_v1.0 as unpacked: questions/CLEVR_val_questions.json, images/val/CLEVR_val_*.png."""
    questions = [
        _clevr_question("What size is the cube?", "large", image=0, index=100),
        _clevr_question("Is there a sphere?", "no", image=0, index=101),
        _clevr_question("How many cubes?", "3", image=1, index=102),
    ]
    _json(root / "questions" / "CLEVR_val_questions.json", {"info": {"split": "val"}, "questions": questions})
    _image(root / "images" / "val" / "CLEVR_val_000000.png", (16, 12), fmt="PNG")
    _image(root / "images" / "val" / "CLEVR_val_000001.png", (12, 16), fmt="PNG")
    return root


def test_clevr_reads_every_question_with_its_answer(tmp_path):
    root = _clevr(tmp_path)
    samples = load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images")
    assert [s.answer for s in samples] == ["large", "no", "3"]


def test_clevr_finds_images_in_the_split_folder(tmp_path):
    root = _clevr(tmp_path)
    samples = load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images")
    assert [s.image.size for s in samples] == [(16, 12), (16, 12), (12, 16)]


def test_clevr_accepts_the_split_folder_itself_as_image_folder(tmp_path):
    root = _clevr(tmp_path)
    samples = load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images" / "val")
    assert samples[2].image.size == (12, 16)


def test_clevr_ids_are_dataset_and_question_index(tmp_path):
    root = _clevr(tmp_path)
    samples = load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images")
    assert [s.id for s in samples] == ["clevr-100", "clevr-101", "clevr-102"]


# --- COCO-QA -----------------------------------------------------------------------------------


def _coco_qa(root: Path) -> Path:
    """DIR/test/{questions,answers,img_ids,types}.txt; COCO images in DIR/images/val2014/."""
    split = root / "test"
    split.mkdir(parents=True)
    (split / "questions.txt").write_text("what is the man riding\nhow many cats are on the bed\n")
    (split / "answers.txt").write_text("horse\ntwo\n")
    (split / "img_ids.txt").write_text("139\n285\n")
    (split / "types.txt").write_text("0\n1\n")
    _image(root / "images" / "val2014" / "COCO_val2014_000000000139.jpg", (14, 10))
    _image(root / "images" / "val2014" / "COCO_val2014_000000000285.jpg", (10, 14))
    return root


def test_coco_qa_reads_the_parallel_files_line_by_line(tmp_path):
    root = _coco_qa(tmp_path)
    samples = load_coco_qa(root, image_dir=root / "images")
    assert [(s.prompt, s.answer) for s in samples] == [
        ("what is the man riding", "horse"),
        ("how many cats are on the bed", "two"),
    ]


def test_coco_qa_finds_coco_images_by_id(tmp_path):
    root = _coco_qa(tmp_path)
    assert [s.image.size for s in load_coco_qa(root, image_dir=root / "images")] == [(14, 10), (10, 14)]


def test_coco_qa_names_the_question_type(tmp_path):
    root = _coco_qa(tmp_path)
    assert [s.meta["type"] for s in load_coco_qa(root, image_dir=root / "images")] == ["object", "number"]


def test_coco_qa_ids_are_dataset_split_and_line(tmp_path):
    root = _coco_qa(tmp_path)
    assert [s.id for s in load_coco_qa(root, image_dir=root / "images")] == [
        "coco_qa-test-0",
        "coco_qa-test-1",
    ]


def test_coco_qa_files_of_different_lengths_are_an_error(tmp_path):
    root = _coco_qa(tmp_path)
    (root / "test" / "answers.txt").write_text("horse\n")
    with pytest.raises(DatasetError, match="one line per question"):
        load_coco_qa(root, image_dir=root / "images")


def test_coco_qa_missing_split_names_the_files_it_needs(tmp_path):
    root = _coco_qa(tmp_path)
    with pytest.raises(FileNotFoundError, match="questions.txt, answers.txt, img_ids.txt, types.txt"):
        load_coco_qa(root, image_dir=root / "images", split="train")


# --- tables ------------------------------------------------------------------------------------


def _jsonl(root: Path, rows: list[dict]) -> Path:
    path = root / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _csv(root: Path, rows: list[dict]) -> Path:
    path = root / "mine.csv"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table_rows(root: Path) -> list[dict]:
    _image(root / "pics" / "a.png", (5, 4), fmt="PNG")
    _image(root / "pics" / "b.png", (4, 5), fmt="PNG")
    return [
        {"image": "pics/a.png", "question": "what colour is the left shape ?", "answer": "red"},
        {"image": "pics/b.png", "question": "what kind is the red shape ?", "answer": "circle"},
    ]


def test_jsonl_table_reads_question_and_answer(tmp_path):
    samples = load_table(_jsonl(tmp_path, _table_rows(tmp_path)))
    assert [(s.prompt, s.answer) for s in samples] == [
        ("what colour is the left shape ?", "red"),
        ("what kind is the red shape ?", "circle"),
    ]


def test_table_image_paths_are_relative_to_the_table(tmp_path):
    samples = load_table(_jsonl(tmp_path, _table_rows(tmp_path)))
    assert [s.image.size for s in samples] == [(5, 4), (4, 5)]


def test_table_ids_default_to_file_stem_and_row(tmp_path):
    samples = load_table(_jsonl(tmp_path, _table_rows(tmp_path)))
    assert [s.id for s in samples] == ["mine-0", "mine-1"]


def test_table_keeps_given_ids(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0]["id"] = "q-left"
    assert load_table(_jsonl(tmp_path, rows))[0].id == "q-left"


def test_jsonl_table_reads_spans_and_replacements(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0] |= {"spans": {"visual": "the left shape"}, "replacements": {"visual": "the right shape"}}
    sample = load_table(_jsonl(tmp_path, rows))[0]
    assert (sample.spans, sample.replacements) == (
        {"visual": "the left shape"},
        {"visual": "the right shape"},
    )


def test_csv_table_reads_span_and_replacement_columns(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0] |= {"span:visual": "the left shape", "replacement:visual": "the right shape"}
    sample = load_table(_csv(tmp_path, rows))[0]
    assert (sample.spans, sample.replacements) == (
        {"visual": "the left shape"},
        {"visual": "the right shape"},
    )


def test_csv_table_empty_span_cells_mark_no_span(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0] |= {"span:visual": "the left shape"}
    assert load_table(_csv(tmp_path, rows))[1].spans == {}


def test_table_reads_image_pair_and_foil(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0] |= {"image_pair": "pics/b.png", "foil": "blue"}
    sample = load_table(_csv(tmp_path, rows))[0]
    assert (sample.image_pair.size, sample.foil) == ((4, 5), "blue")


def test_table_prompt_column_is_used_verbatim(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0] = {"image": "pics/a.png", "prompt": "<image> colour of the left shape ?", "answer": "red"}
    sample = load_table(_jsonl(tmp_path, rows), prompt_template=LLAVA)[0]
    assert sample.prompt == "<image> colour of the left shape ?"


def test_table_keeps_unknown_columns_in_meta(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0]["family"] = "visual"
    assert load_table(_csv(tmp_path, rows))[0].meta["family"] == "visual"


def test_table_span_absent_from_the_prompt_is_an_error(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0]["spans"] = {"visual": "the top shape"}
    with pytest.raises(DatasetError, match="copy the span verbatim"):
        load_table(_jsonl(tmp_path, rows))


def test_table_replacement_without_its_span_is_an_error(tmp_path):
    rows = _table_rows(tmp_path)
    rows[0]["replacements"] = {"visual": "the right shape"}
    with pytest.raises(DatasetError, match="add the span or drop the replacement"):
        load_table(_jsonl(tmp_path, rows))


def test_table_row_without_answer_is_an_error_naming_the_required_fields(tmp_path):
    rows = _table_rows(tmp_path)
    del rows[1]["answer"]
    with pytest.raises(DatasetError, match="every row needs image, question"):
        load_table(_csv(tmp_path, rows))


def test_unreadable_image_is_an_error_naming_it(tmp_path):
    rows = _table_rows(tmp_path)
    (tmp_path / "pics" / "a.png").write_text("not a picture")
    with pytest.raises(DatasetError, match=r"a\.png .*cannot be read"):
        load_table(_jsonl(tmp_path, rows))


# --- spans, n, templates -----------------------------------------------------------------------


def test_span_mapping_marks_the_text_in_each_prompt(tmp_path):
    samples = _load_vqa(_vqa(tmp_path), spans={"subject": "the bus"}, n=1)
    assert samples[0].spans == {"subject": "the bus"}


def test_questions_lacking_a_requested_span_are_skipped(tmp_path):
    with pytest.warns(SkippedSamplesWarning):
        samples = _load_vqa(_vqa(tmp_path), spans={"subject": "the bus"})
    assert [s.id for s in samples] == ["vqa_v2-9000"]


def test_skipped_questions_give_a_single_warning(tmp_path):
    root = _clevr(tmp_path)
    (root / "questions" / "CLEVR_val_questions.json").write_text(
        json.dumps({"questions": [_clevr_question("Is there a sphere?")] * 2 + [_clevr_question("a cube ?")]})
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images", spans={"s": "cube"})
    assert len([w for w in caught if w.category is SkippedSamplesWarning]) == 1


def test_skip_warning_counts_the_skipped_questions(tmp_path):
    root = _clevr(tmp_path)
    with pytest.warns(SkippedSamplesWarning, match="skipped 1 of 3 questions"):
        load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images", spans={"s": "cube"})


def test_span_function_receives_the_raw_question(tmp_path):
    def subject(question: str) -> dict[str, str]:
        return {"subject": question.split()[-1].rstrip("?")}

    samples = _load_vqa(_vqa(tmp_path), prompt_template=LLAVA, spans=subject)
    assert [s.spans for s in samples] == [{"subject": "bus"}, {"subject": "there"}]


def test_span_function_returning_nothing_skips_the_question(tmp_path):
    def subject(question: str) -> dict[str, str] | None:
        return {"subject": "the bus"} if "bus" in question else None

    with pytest.warns(SkippedSamplesWarning):
        assert len(_load_vqa(_vqa(tmp_path), spans=subject)) == 1


def test_n_keeps_the_first_n_samples_in_file_order(tmp_path):
    root = _clevr(tmp_path)
    samples = load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images", n=2)
    assert [s.id for s in samples] == ["clevr-100", "clevr-101"]


def test_n_counts_samples_after_skipping(tmp_path):
    root = _clevr(tmp_path)
    with pytest.warns(SkippedSamplesWarning):
        samples = load_clevr(
            root / "questions" / "CLEVR_val_questions.json", root / "images", n=1, spans={"s": "sphere"}
        )
    assert [s.id for s in samples] == ["clevr-101"]


def test_images_beyond_n_are_never_opened(tmp_path):
    root = _vqa(tmp_path)
    (root / "images" / "COCO_val2014_000000000042.jpg").unlink()
    assert len(_load_vqa(root, n=1)) == 1


def test_template_with_another_field_is_rejected_before_reading(tmp_path):
    with pytest.raises(ValueError, match="no other"):
        load_table(tmp_path / "absent.jsonl", prompt_template="{question} {answer}")


def test_template_without_the_question_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"must use the field \{question\}"):
        load_table(tmp_path / "absent.jsonl", prompt_template="USER: <image> ASSISTANT:")


def test_n_of_zero_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="positive int or None"):
        load_table(tmp_path / "absent.jsonl", n=0)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="holds no questions"):
        load_table(tmp_path / "empty.jsonl")


def test_spans_in_no_question_is_an_error_naming_them(tmp_path):
    with pytest.warns(SkippedSamplesWarning), pytest.raises(DatasetError, match=r"\['subject'\]"):
        _load_vqa(_vqa(tmp_path), spans={"subject": "the zebra"})


# --- load_dataset: layout detection ------------------------------------------------------------


def test_dataset_directory_with_vqa_files_loads_vqa_v2(tmp_path):
    assert load_dataset(_vqa(tmp_path))[0].id == "vqa_v2-9000"


def test_dataset_directory_with_a_balanced_questions_file_loads_gqa(tmp_path):
    assert load_dataset(_gqa(tmp_path))[0].id == "gqa-201307251"


def test_dataset_directory_unpacked_from_clevr_loads_clevr(tmp_path):
    assert load_dataset(_clevr(tmp_path))[0].id == "clevr-100"


def test_dataset_directory_with_split_text_files_loads_coco_qa(tmp_path):
    assert load_dataset(_coco_qa(tmp_path))[0].id == "coco_qa-test-0"


def test_dataset_coco_qa_split_folder_loads_that_split(tmp_path):
    root = _coco_qa(tmp_path)
    (root / "test").rename(root / "train")
    assert load_dataset(root / "train")[0].id == "coco_qa-train-0"


def test_dataset_jsonl_file_loads_a_table(tmp_path):
    assert load_dataset(_jsonl(tmp_path, _table_rows(tmp_path)))[0].id == "mine-0"


def test_dataset_csv_file_loads_a_table(tmp_path):
    assert load_dataset(_csv(tmp_path, _table_rows(tmp_path)))[1].answer == "circle"


def test_dataset_passes_the_prompt_template_on(tmp_path):
    assert load_dataset(_gqa(tmp_path), prompt_template=LLAVA)[0].prompt.startswith("USER: <image>\n")


def test_dataset_directory_with_several_splits_asks_for_the_file(tmp_path):
    root = _clevr(tmp_path)
    _json(root / "questions" / "CLEVR_train_questions.json", {"questions": []})
    with pytest.raises(DatasetError, match="pass the one to load as PATH"):
        load_dataset(root)


def test_dataset_question_file_picks_its_split(tmp_path):
    root = _clevr(tmp_path)
    _json(root / "questions" / "CLEVR_train_questions.json", {"questions": []})
    assert len(load_dataset(root / "questions" / "CLEVR_val_questions.json")) == 3


def test_dataset_unknown_layout_error_lists_the_accepted_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="(?s)VQA v2.*GQA.*CLEVR.*COCO-QA"):
        load_dataset(tmp_path)


def test_dataset_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("through", ["load_clevr", "load_dataset"])
def test_the_skip_warning_points_at_the_callers_line_not_inside_the_loaders(tmp_path, through):
    root = _clevr(tmp_path)
    questions = root / "questions" / "CLEVR_val_questions.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if through == "load_clevr":
            load_clevr(questions, root / "images", spans={"s": "cube"})
        else:
            load_dataset(questions, spans={"s": "cube"})
    (warning,) = [w for w in caught if w.category is SkippedSamplesWarning]
    assert warning.filename == __file__


# --- The seed papers' data and the datasets they used: IconQA, FineCops-Ref, Basu, Zhang, Palit ---


def _by_id(samples):
    return {s.id: s for s in samples}


def test_iconqa_choice_question_shows_its_choices_and_answers_with_the_right_one(tmp_path):
    sample = _by_id(load_dataset(layouts.iconqa(tmp_path / "iconqa_data")))["iconqa-101"]
    assert (sample.prompt, sample.answer, sample.foil) == (
        "How likely is it that you will pick a black one? Choices: certain, unlikely, impossible.",
        "unlikely",
        "certain",
    )


def test_iconqa_fill_in_blank_answer_is_its_text(tmp_path):
    assert _by_id(load_dataset(layouts.iconqa(tmp_path / "iconqa_data")))["iconqa-202"].answer == "5"


def test_iconqa_image_choice_problems_are_not_read(tmp_path):
    assert "iconqa-300" not in _by_id(load_dataset(layouts.iconqa(tmp_path / "iconqa_data")))


def test_iconqa_loads_from_the_inner_iconqa_folder_too(tmp_path):
    layouts.iconqa(tmp_path / "iconqa_data")
    assert len(load_dataset(tmp_path / "iconqa_data" / "iconqa")) == 12


def test_finecops_positive_is_a_yes_question_with_its_expression_as_visual_span(tmp_path):
    sample = _by_id(load_dataset(layouts.finecops(tmp_path / "f" / "annotations" / "test_coco_format.json")))
    assert (sample["finecops-0"].prompt, sample["finecops-0"].answer, dict(sample["finecops-0"].spans)) == (
        "Is there the red box on the left in the image?",
        "yes",
        {"visual": "the red box on the left"},
    )


def test_finecops_text_negative_is_the_positives_replacement(tmp_path):
    sample = _by_id(load_dataset(layouts.finecops(tmp_path / "f" / "annotations" / "test_coco_format.json")))
    assert sample["finecops-0"].replacements == {"visual": "the blue box on the left"}


def test_finecops_image_negative_is_the_positives_image_pair(tmp_path):
    sample = _by_id(load_dataset(layouts.finecops(tmp_path / "f" / "annotations" / "test_coco_format.json")))
    assert (
        sample["finecops-0"].image_pair is not None and sample["finecops-0"].meta["pair_id"] == "finecops-200"
    )


def test_finecops_negative_answers_no(tmp_path):
    sample = _by_id(load_dataset(layouts.finecops(tmp_path / "f" / "annotations" / "test_coco_format.json")))
    assert (sample["finecops-100"].answer, sample["finecops-100"].foil) == ("no", "yes")


def test_finecops_box_becomes_the_object_region(tmp_path):
    sample = _by_id(load_dataset(layouts.finecops(tmp_path / "f" / "annotations" / "test_coco_format.json")))
    assert sample["finecops-0"].meta["regions"] == [(20.0, 10.0, 38.0, 26.0)]


def test_basu_main_entity_is_the_visual_span_in_the_questions_own_words(tmp_path):
    samples = load_dataset(layouts.basu(tmp_path / "data_constraints"))
    assert [s.spans.get("visual") for s in samples[5:7]] == ["This application", "this place"]


def test_basu_constraint_missing_from_its_question_gives_no_span(tmp_path):
    assert load_dataset(layouts.basu(tmp_path / "data_constraints"))[9].spans == {}


def test_basu_rows_without_answers_are_marked_for_the_models_own_answer(tmp_path):
    sample = load_dataset(layouts.basu(tmp_path / "data_constraints"))[0]
    assert (sample.answer, sample.meta["answer_from"]) == ("", "model")


def test_basu_answer_column_is_used_when_given(tmp_path):
    path = layouts.basu(tmp_path / "data_constraints")
    rows = list(csv.reader(path.open()))
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([rows[0] + ["answer"]] + [row + ["Seattle"] for row in rows[1:]])
    assert load_dataset(path)[0].answer == "Seattle"


def test_basu_image_url_naming_a_folder_opens_the_image_inside(tmp_path):
    sample = load_dataset(layouts.basu(tmp_path / "data_constraints"))[0]
    assert sample.meta["image"].endswith("A photo of Space Needle/Image_1.jpg")


def test_zhang_central_object_box_becomes_the_region(tmp_path):
    path = layouts.zhang_gqa(tmp_path / "zhang" / "GQA_val_correct_question_with_choose_ChooseAttr.csv")
    assert load_dataset(path)[0].meta["regions"] == [(14.0, 18.0, 30.0, 30.0)]


def test_zhang_false_option_is_the_foil(tmp_path):
    path = layouts.zhang_gqa(tmp_path / "zhang" / "GQA_val_correct_question_with_choose_ChooseAttr.csv")
    sample = load_dataset(path)[0]
    assert (sample.answer, sample.foil) == ("red", "green")


def test_zhang_question_ids_keep_their_leading_zeros(tmp_path):
    path = layouts.zhang_gqa(tmp_path / "zhang" / "GQA_val_correct_question_with_choose_ChooseAttr.csv")
    rows = list(csv.reader(path.open()))
    rows[1][0] = "08213952"
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    assert load_dataset(path)[0].id == "zhang_gqa-08213952"


def test_zhang_object_name_is_what_the_object_finder_marks(tmp_path):
    from vlmtrace.data.spans import object_span

    path = layouts.zhang_gqa(tmp_path / "zhang" / "GQA_val_correct_question_with_choose_ChooseAttr.csv")
    sample = load_dataset(path)[0]
    assert object_span(sample.meta["question"], sample.meta) == "jar"


def test_palit_coco_qa_rows_read_question_answer_and_coco_train_image(tmp_path):
    sample = load_dataset(layouts.palit_coco_qa(tmp_path / "Datasets" / "color_coco_qa.csv"))[0]
    assert (sample.prompt, sample.answer, Path(sample.meta["image"]).name) == (
        "what is the color of the horses",
        "brown",
        "COCO_train2014_000000023004.jpg",
    )


def test_palit_clevr_row_becomes_one_yes_no_sample_per_question(tmp_path):
    samples = load_dataset(layouts.palit_clevr(tmp_path / "Datasets" / "clevr_vqa_dataset_3.csv"))
    assert len(samples) == 12 and [s.answer for s in samples[:2]] == ["yes", "no"]


def test_palit_clevr_images_are_found_in_their_split_folder(tmp_path):
    sample = load_dataset(layouts.palit_clevr(tmp_path / "Datasets" / "clevr_vqa_dataset_3.csv"))[0]
    assert sample.meta["image"].endswith("images/val/CLEVR_val_000145.png")


def test_missing_image_is_marked_not_raised_when_asked(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    (data / "images" / "n16000.jpg").unlink()
    sample = load_dataset(data, missing_images="mark")[0]
    assert (sample.image, sample.meta["image_error"]) == (None, "image missing")


def test_unreadable_image_is_marked_unreadable(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    (data / "images" / "n16000.jpg").write_bytes(b"not an image")
    assert load_dataset(data, missing_images="mark")[0].meta["image_error"] == "image unreadable"


def test_missing_image_still_raises_by_default(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    (data / "images" / "n16000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="n16000.jpg"):
        load_dataset(data)

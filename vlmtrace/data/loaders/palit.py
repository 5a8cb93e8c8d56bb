"""Palit et al.'s BLIP causal-tracing CSVs, read as released: COCO-QA subsets and CLEVR yes/no questions.

Palit et al. ("Towards Vision-Language Mechanistic Interpretability: A Causal Tracing Tool for
BLIP", 2023, github vedantpalit/Towards-Vision-Language-Mechanistic-Interpretability) traced BLIP
on four CSVs in `Datasets/`. Three are COCO-QA subsets by question type, one row per question,
with COCO train2014 image ids:

    ,train_image_id_count,question_count,answer_count      # color_coco_qa.csv, count_..., location_...
    0,23004,what is the color of the horses,brown

The fourth holds CLEVR val images, each with a list of spatial yes/no questions written as a
Python literal, answers 1 (yes) and 0 (no):

    ,Image_IDs,Questions_Answers                            # clevr_vqa_dataset_3.csv
    0,CLEVR_val_000145,"[{'question': 'Is the large red cylinder right of ...?', 'answer': 1}, ...]"

    samples = load_palit_coco_qa("Datasets/color_coco_qa.csv", "coco/train2014", n=100)
    samples = load_palit_clevr("Datasets/clevr_vqa_dataset_3.csv", "CLEVR_v1.0/images", n=100)

A CLEVR row becomes one sample per question ("{stem}-{row}-{k}"), its answer "yes" or "no" and
the other as its foil. Images: COCO files found by id anywhere in the folder (`CocoImages`);
CLEVR's `{Image_IDs}.png` in the folder or in its split's subfolder (`val/`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .clevr import clevr_image
from .coco_images import CocoImages
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    csv_row_label,
    csv_rows,
    require_dir,
)

COCO_QA_COLUMNS = ("train_image_id_count", "question_count", "answer_count")
CLEVR_COLUMNS = ("Image_IDs", "Questions_Answers")
YES_NO = {1: "yes", 0: "no"}  # True and False hash as 1 and 0


def load_palit_coco_qa(
    path: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """One of Palit et al.'s COCO-QA CSVs; COCO train2014 images in `image_dir` (or a folder in it)."""
    check_options(n, prompt_template, spans)
    path = Path(path)
    rows = csv_rows(path, "a COCO-QA CSV of Palit et al.", COCO_QA_COLUMNS)
    images = CocoImages(require_dir(image_dir, "COCO image"), "train2014")

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            image_id = _integer(row["train_image_id_count"], path, index)
            yield RawQuestion(
                id=f"palit-{path.stem}-{csv_row_label(row, index)}",
                question=row["question_count"].strip(),
                answer=row["answer_count"].strip(),
                image=images.path(image_id),
                meta={"image_id": image_id, "subset": path.stem},
            )

    hint = "the ids are COCO train2014 images (COCO_train2014_{id:012d}.jpg); pass the folder holding them."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def load_palit_clevr(
    path: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """Palit et al.'s CLEVR CSV: one sample per listed question; images `{Image_IDs}.png`."""
    check_options(n, prompt_template, spans)
    path, image_dir = Path(path), require_dir(image_dir, "CLEVR image")
    rows = csv_rows(path, "the CLEVR CSV of Palit et al.", CLEVR_COLUMNS)

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            image_id = row["Image_IDs"].strip()
            for k, item in enumerate(_questions(row["Questions_Answers"], path, index)):
                answer = YES_NO.get(item.get("answer"))
                if answer is None or not isinstance(item.get("question"), str):
                    raise DatasetError(
                        f"question {k} of row {index} of {path} is {item!r}; each is "
                        "{'question': text, 'answer': 1 or 0}."
                    )
                yield RawQuestion(
                    id=f"palit-{path.stem}-{csv_row_label(row, index)}-{k}",
                    question=item["question"].strip(),
                    answer=answer,
                    image=clevr_image(image_dir, f"{image_id}.png", _clevr_split(image_id)),
                    foil="no" if answer == "yes" else "yes",
                    meta={"image_id": image_id},
                )

    hint = "CLEVR images are {Image_IDs}.png in CLEVR_v1.0/images/{split}/; pass that folder or its parent."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _questions(cell: str, path: Path, index: int) -> list[dict]:
    try:
        items = ast.literal_eval(cell)  # a Python literal (single quotes), not JSON
    except (ValueError, SyntaxError) as error:
        raise DatasetError(
            f"Questions_Answers of row {index} of {path} is not a list literal ({error}); "
            "re-download the CSV."
        ) from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise DatasetError(f"Questions_Answers of row {index} of {path} is not a list of question dicts.")
    return items


def _clevr_split(image_id: str) -> str | None:
    """The split an image id names: "val" in CLEVR_val_000145."""
    return image_id.split("_")[1] if image_id.count("_") >= 2 else None


def _integer(text: str, path: Path, index: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"row {index} of {path} has image id {text!r}, not a COCO image id.") from None

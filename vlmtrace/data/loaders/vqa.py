"""VQA v2, read as published: questions and answers in two JSON files, COCO images by id.

VQA v2 keeps the answers (ten human answers and a consensus) in an annotations file apart from the
questions, and names images after their COCO split, so this loader joins the two files by question
id and finds each image through `CocoImages`.

    samples = load_vqa_v2("v2_OpenEnded_mscoco_val2014_questions.json",
                          "v2_mscoco_val2014_annotations.json", "coco/val2014", n=100)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .coco_images import CocoImages
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    list_field,
    read_json,
    require_dir,
    required_field,
)

_SPLIT = re.compile(r"(?:train|val|test-dev|test)\d{4}")


def load_vqa_v2(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """VQA v2 questions with their consensus answer (`multiple_choice_answer`).

    `image_dir` holds the COCO images of the questions' split, named COCO_{split}_{id:012d}.jpg
    (2014 release) or {id:012d}.jpg (2017 release), directly or in a folder inside it (val2014/).
    `meta` keeps the ten human `answers`, `answer_type`, `question_type` and the ids. A
    `*_complementary_pairs.json` beside the questions (a list of [question id, question id]: the
    same question on a similar image with another answer) gives each paired question its partner's
    image as `image_pair` and the partner's answer as `foil` (NOTICE's semantic image pairs).
    """
    check_options(n, prompt_template, spans)
    questions_json, annotations_json = Path(questions_json), Path(annotations_json)
    questions = read_json(questions_json, "VQA v2 questions")
    rows = list_field(questions, "questions", questions_json, "a VQA v2 questions file")
    annotations = list_field(
        read_json(annotations_json, "VQA v2 annotations"),
        "annotations",
        annotations_json,
        "a VQA v2 annotations file",
    )
    by_question = {
        required_field(a, "question_id", annotations_json, i): a for i, a in enumerate(annotations)
    }
    subtype = questions.get("data_subtype")
    images = CocoImages(require_dir(image_dir, "COCO image"), subtype)

    partners = _complementary_pairs(questions_json)
    by_id = {row.get("question_id"): row for row in rows if isinstance(row, dict)}

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            question_id = required_field(row, "question_id", questions_json, index)
            annotation = by_question.get(question_id)
            if annotation is None:
                raise DatasetError(
                    f"{annotations_json} has no annotation for question {question_id} of "
                    f"{questions_json}; pass the annotations file of the same split (VQA v2 test "
                    "questions have no public answers)."
                )
            image_id = int(required_field(row, "image_id", questions_json, index))
            partner = by_id.get(partners.get(question_id))
            partner_answer = by_question.get(partners.get(question_id), {}).get("multiple_choice_answer")
            yield RawQuestion(
                id=f"vqa_v2-{question_id}",
                question=required_field(row, "question", questions_json, index),
                answer=required_field(annotation, "multiple_choice_answer", annotations_json, index),
                image=images.path(image_id),
                meta={
                    "question_id": question_id,
                    "image_id": image_id,
                    "answers": [a["answer"] for a in annotation.get("answers", [])],
                    "answer_type": annotation.get("answer_type"),
                    "question_type": annotation.get("question_type"),
                    **({"pair_question_id": partners[question_id]} if partner is not None else {}),
                },
                image_pair=images.path(int(partner["image_id"])) if partner is not None else None,
                foil=partner_answer if partner is not None else None,
            )

    prefix = f"COCO_{subtype}_" if subtype else "COCO_{split}_"
    hint = (
        f"VQA v2 images are named {prefix}{{image_id:012d}}.jpg or {{image_id:012d}}.jpg, in the "
        "image folder or a folder inside it; pass the COCO image folder of the questions' split."
    )
    return assemble(
        read(),
        source=questions_json,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _complementary_pairs(questions_json: Path) -> dict[int, int]:
    """question id -> its complementary question's id, from VQA v2's `*_complementary_pairs.json`."""
    subtype = _SPLIT.search(questions_json.name)
    files = sorted(questions_json.parent.glob("*_complementary_pairs.json"))
    if subtype is not None and len(files) > 1:
        files = [f for f in files if subtype.group(0) in f.name] or files
    partners: dict[int, int] = {}
    for path in files[:1]:
        pairs = read_json(path, "VQA v2 complementary pairs")
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise DatasetError(
                f"{path} is not a VQA v2 complementary pairs file: expected a JSON list of "
                "[question_id, question_id] pairs."
            )
        for a, b in pairs:
            partners.setdefault(a, b)
            partners.setdefault(b, a)
    return partners

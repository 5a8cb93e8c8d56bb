"""CLEVR (and CLEVR-CoGenT), read as published: a questions list per split, a folder of images per split.

CLEVR_v1.0 unpacks to questions/CLEVR_{split}_questions.json and images/{split}/, so an image is
found under the image folder itself or under its split's folder inside it.

    samples = load_clevr("CLEVR_v1.0/questions/CLEVR_val_questions.json", "CLEVR_v1.0/images", n=100)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    list_field,
    read_json,
    require_dir,
    required_field,
)


def load_clevr(
    questions_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
) -> list[Sample]:
    """CLEVR questions (also CLEVR-CoGenT), images image_dir/{image_filename} or image_dir/{split}/...

    `image_dir` may be CLEVR_v1.0/images (a folder per split) or the split's folder itself.
    `meta` keeps `question_family_index`, `image_index` and `split`.
    """
    check_options(n, prompt_template, spans)
    questions_json, image_dir = Path(questions_json), require_dir(image_dir, "CLEVR image")
    rows = list_field(
        read_json(questions_json, "CLEVR questions"), "questions", questions_json, "a CLEVR file"
    )

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            if "answer" not in row:
                raise DatasetError(
                    f"question {index} of {questions_json} has no answer; CLEVR's test questions are "
                    "unanswered, load the val (or train) questions."
                )
            filename = required_field(row, "image_filename", questions_json, index)
            split = row.get("split")
            image = image_dir / filename
            if not image.exists() and split and (image_dir / split / filename).exists():
                image = image_dir / split / filename
            question_id = row.get("question_index", index)
            yield RawQuestion(
                id=f"clevr-{question_id}",
                question=required_field(row, "question", questions_json, index),
                answer=str(row["answer"]),
                image=image,
                meta={
                    "question_index": question_id,
                    "image_index": row.get("image_index"),
                    "split": split,
                    "question_family_index": row.get("question_family_index"),
                },
            )

    hint = "CLEVR images lie in images/{split}/; pass CLEVR_v1.0/images or the split's folder."
    return assemble(
        read(), source=questions_json, n=n, prompt_template=prompt_template, spans=spans, hint=hint
    )

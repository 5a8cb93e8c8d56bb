"""GQA, read as published: a balanced questions file keyed by question id, images by imageId.

GQA's questions file is one JSON object from question id to question, unlike the lists of the
other datasets, and its test and challenge splits carry no answers; this loader reads that
layout and says which split to load instead.

    samples = load_gqa("gqa/val_balanced_questions.json", "gqa/images", n=100)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    describe_json,
    read_json,
    require_dir,
    required_field,
)


def load_gqa(
    questions_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """GQA questions (the balanced files: a JSON object keyed by question id), images {imageId}.jpg.

    The short `answer` is the answer; `meta` keeps `full_answer` and the question `types`.
    """
    check_options(n, prompt_template, spans)
    questions_json, image_dir = Path(questions_json), require_dir(image_dir, "GQA image")
    document = read_json(questions_json, "GQA questions")
    if not isinstance(document, dict) or not all(isinstance(row, dict) for row in document.values()):
        raise DatasetError(
            f"{questions_json} is not a GQA questions file: expected a JSON object keyed by question "
            'id, each {"imageId", "question", "answer", ...}; got ' + describe_json(document) + "."
        )

    scene_graphs = _scene_graphs(questions_json)

    def read() -> Iterator[RawQuestion]:
        for question_id, row in document.items():
            if "answer" not in row:
                raise DatasetError(
                    f"question {question_id} of {questions_json} has no answer; GQA's test and "
                    "challenge questions are unanswered, load the val or testdev balanced questions."
                )
            image_id = required_field(row, "imageId", questions_json, question_id)
            yield RawQuestion(
                id=f"gqa-{question_id}",
                question=required_field(row, "question", questions_json, question_id),
                answer=str(row["answer"]),
                image=image_dir / f"{image_id}.jpg",
                meta={
                    "question_id": question_id,
                    "image_id": image_id,
                    "full_answer": row.get("fullAnswer"),
                    "types": row.get("types", {}),
                    "annotations": row.get("annotations", {}),  # question word index -> object id
                    "semantic": row.get("semantic", []),
                    **_regions(scene_graphs, image_id, row),
                },
            )

    hint = "GQA images are named {imageId}.jpg; pass the folder images.zip unpacks to."
    return assemble(
        read(),
        source=questions_json,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _scene_graphs(questions_json: Path) -> dict:
    """{imageId: scene graph} from the split's `{split}_sceneGraphs.json` beside the questions, if any."""
    split = questions_json.name.split("_")[0]
    for folder in (questions_json.parent, questions_json.parent.parent):
        path = folder / f"{split}_sceneGraphs.json"
        if path.is_file():
            document = read_json(path, "GQA scene graphs")
            return document if isinstance(document, dict) else {}
    return {}


def _regions(scene_graphs: dict, image_id: str, row: dict) -> dict:
    """`regions`: boxes (x0, y0, x1, y1) in image pixels of the objects the question is about."""
    graph = scene_graphs.get(str(image_id))
    if not graph:
        return {}
    annotated = (row.get("annotations") or {}).get("question") or {}
    objects = graph.get("objects", {})
    boxes = []
    for object_id in dict.fromkeys(annotated.values()):
        found = objects.get(str(object_id).split(",")[0])
        if found is not None:
            x, y, w, h = (float(found[k]) for k in ("x", "y", "w", "h"))
            boxes.append((x, y, x + w, y + h))
    return {"regions": boxes} if boxes else {}

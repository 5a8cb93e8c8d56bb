"""CLEVR (and CLEVR-CoGenT), read as published: a questions list per split, a folder of images per split.

CLEVR_v1.0 unpacks to questions/CLEVR_{split}_questions.json and images/{split}/, so an image is
found under the image folder itself or under its split's folder inside it.

    samples = load_clevr("CLEVR_v1.0/questions/CLEVR_val_questions.json", "CLEVR_v1.0/images", n=100)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    first_found,
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
    missing_images: MissingImages = "raise",
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

    scenes = _scenes(questions_json)

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            if "answer" not in row:
                raise DatasetError(
                    f"question {index} of {questions_json} has no answer; CLEVR's test questions are "
                    "unanswered, load the val (or train) questions."
                )
            filename = required_field(row, "image_filename", questions_json, index)
            split = row.get("split")
            question_id = row.get("question_index", index)
            image = clevr_image(image_dir, filename, split)
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
                    "program": row.get("program"),
                    **_regions(scenes, row, image),
                },
            )

    hint = "CLEVR images lie in images/{split}/; pass CLEVR_v1.0/images or the split's folder."
    return assemble(
        read(),
        source=questions_json,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def clevr_image(image_dir: Path, filename: str, split: str | None) -> Path:
    """A CLEVR image: in `image_dir` itself (a split's folder) or in its split's folder inside it."""
    return first_found(filename, [image_dir, image_dir / split] if split else [image_dir])


OBJECT_RADIUS = 0.06
"""Half the side of the box drawn around a CLEVR object's `pixel_coords`, as a fraction of the
width of the image file (CLEVR objects are about 30-70 px across in its 480 px images). A fixed
pixel size would cover the whole of a smaller image, and object->question would be image->question."""


def _scenes(questions_json: Path) -> dict:
    """{image_index: scene} from CLEVR's scenes/CLEVR_{split}_scenes.json, if it was unpacked."""
    split = questions_json.stem.removeprefix("CLEVR_").removesuffix("_questions")
    root = questions_json.parent
    root = root.parent if root.name == "questions" else root
    for path in (root / "scenes" / f"CLEVR_{split}_scenes.json", root / f"CLEVR_{split}_scenes.json"):
        if path.is_file():
            scenes = read_json(path, "CLEVR scenes").get("scenes", [])
            return {scene.get("image_index"): scene for scene in scenes}
    return {}


def _regions(scenes: dict, row: dict, image: Path) -> dict:
    """`regions`: a box around each object the program's first filter chain selects.

    `pixel_coords` are in the pixels of the image file (CLEVR renders its scenes at the size of its
    images); the box's size follows the file's width, read from its header.
    """
    scene = scenes.get(row.get("image_index"))
    if not scene:
        return {}
    try:
        with Image.open(image) as opened:
            width = opened.size[0]
    except (OSError, UnidentifiedImageError):  # missing or unreadable: the sample is left out for that
        return {}
    filters = {}
    for step in row.get("program") or []:
        function = step.get("function") or step.get("type") or ""
        if function.startswith("filter_") and step.get("value_inputs"):
            filters.setdefault(function.removeprefix("filter_"), step["value_inputs"][0])
        elif filters and function in ("unique", "relate", "same_shape", "same_color"):
            break
    if not filters:
        return {}
    chosen = [o for o in scene.get("objects", []) if all(o.get(k) == v for k, v in filters.items())]
    if not chosen:
        return {}
    boxes = []
    for obj in chosen:
        x, y = obj["pixel_coords"][0], obj["pixel_coords"][1]
        r = OBJECT_RADIUS * width
        boxes.append((x - r, y - r, x + r, y + r))
    return {"regions": boxes}

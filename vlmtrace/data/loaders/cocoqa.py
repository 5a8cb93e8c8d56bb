"""COCO-QA, read as published: parallel text files per split, one line per question, COCO images.

COCO-QA has no JSON: DIR/{split}/ holds questions.txt, answers.txt, img_ids.txt and types.txt,
whose lines belong together by position. This loader checks that the files agree in length and
finds the COCO 2014 images through `CocoImages`.

    samples = load_coco_qa("cocoqa", image_dir="coco", split="test", n=100)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .coco_images import CocoImages
from .question import (
    DEFAULT_TEMPLATE,
    DataFileMissing,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    require_dir,
)

_COCO_QA_FILES = ("questions", "answers", "img_ids", "types")
_COCO_QA_TYPES = {"0": "object", "1": "number", "2": "color", "3": "location"}


def load_coco_qa(
    directory: str | Path,
    *,
    image_dir: str | Path,
    split: str = "test",
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """COCO-QA: parallel text files in directory/{split}/, one line per question, COCO images.

    The files are questions.txt, answers.txt, img_ids.txt (COCO image ids) and types.txt
    (0 object, 1 number, 2 color, 3 location, kept as `meta["type"]`). Question ids are
    "{split}-{line index}". `image_dir` holds the COCO 2014 images, directly or in train2014/
    and val2014/ inside it.
    """
    check_options(n, prompt_template, spans)
    split_dir = Path(directory) / split
    paths = {name: split_dir / f"{name}.txt" for name in _COCO_QA_FILES}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise DataFileMissing(
            f"COCO-QA split {split!r} needs {', '.join(p.name for p in paths.values())} in {split_dir}; "
            f"missing {', '.join(missing)}. The published archive unpacks to DIR/train and DIR/test."
        )
    columns = {name: path.read_text(encoding="utf-8").splitlines() for name, path in paths.items()}
    lengths = {f"{name}.txt": len(lines) for name, lines in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DatasetError(
            f"COCO-QA files in {split_dir} must have one line per question each; got {lengths}. "
            "Re-extract the archive."
        )
    images = CocoImages(require_dir(image_dir, "COCO image"), None)

    def read() -> Iterator[RawQuestion]:
        rows = zip(*(columns[name] for name in _COCO_QA_FILES), strict=True)
        for index, (question, answer, image_id, kind) in enumerate(rows):
            yield RawQuestion(
                id=f"coco_qa-{split}-{index}",
                question=question.strip(),
                answer=answer.strip(),
                image=images.path(int(image_id)),
                meta={
                    "question_id": f"{split}-{index}",
                    "image_id": int(image_id),
                    "type": _COCO_QA_TYPES.get(kind.strip(), kind.strip()),
                },
            )

    hint = "COCO-QA uses COCO 2014 images (COCO_train2014_/COCO_val2014_{image_id:012d}.jpg)."
    return assemble(
        read(),
        source=paths["questions"],
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )

"""FineCops-Ref, read as published in COCO format: referring expressions, their boxes, and their negatives.

FineCops-Ref (Liu et al., EMNLP 2024, github liujunzhuo/FineCops-Ref) asks a model to find the
object a referring expression names ("the cup on the left of the red plate") in a GQA image, and to
reject hard negatives: the expression with one word edited ("negative_cate": "text"), or an edited
image ("negative_cate": "image"). Its COCO-format annotations, which the benchmark's own evaluation
reads (`data/annotations/test_coco_format.json`, GQA images in `data/gqa/`), keep one expression
per `images` entry and one box per `annotations` entry:

    {"images": [{"id": 7, "file_name": "2370301.jpg", "caption": "the cup ...", "width", "height"}],
     "annotations": [{"image_id": 7, "bbox": [x, y, w, h], "level": 2,
                      "negative_type": "attribute", "negative_cate": "text", "positive_id": 3, ...}]}
    (negatives only: negative_type, negative_level, negative_cate, positive_id)

    samples = load_finecops_ref("data/annotations/test_coco_format.json", "data/gqa", n=100)

Causal tracing scores an answer token, so each expression becomes the yes/no question
`QUESTION` ("Is there the cup ... in the image?"): "yes" for a positive, "no" for a negative, the
other as foil. The expression is the question's `visual` span (the phrase that picks the object
out of the image), its box `meta["regions"]`. A positive with a text negative gets that negative's
expression as its replacement for `visual` (STR: one word changed, the answer flips); one with an
image negative gets that image as its `image_pair` (SIP). The vanilla (non-COCO) annotations hold
no boxes and are not read. Negative images are looked up by `file_name` in the image folder, then
beside the annotations; where the figshare archive puts them is not documented in the repository.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
)

QUESTION = "Is there {expression} in the image?"
"""How an expression becomes a question with a one-token answer (yes / no)."""
SPAN = "visual"


def is_finecops(document: Any) -> bool:
    """Whether a parsed JSON document is FineCops-Ref's COCO format (images carry captions)."""
    images = document.get("images") if isinstance(document, dict) else None
    return (
        isinstance(images, list)
        and bool(images)
        and isinstance(images[0], dict)
        and "caption" in images[0]
        and isinstance(document.get("annotations"), list)
    )


def load_finecops_ref(
    annotations_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """FineCops-Ref COCO-format annotations; GQA images (and negative images) by `file_name`."""
    check_options(n, prompt_template, spans)
    path, image_dir = Path(annotations_json), require_dir(image_dir, "GQA image")
    document = read_json(path, "FineCops-Ref annotations")
    images = list_field(document, "images", path, "FineCops-Ref annotations in COCO format")
    boxes = {a.get("image_id"): a for a in list_field(document, "annotations", path, "COCO annotations")}
    if not is_finecops(document):
        raise DatasetError(f"{path} is COCO-style but its images carry no caption; it is not FineCops-Ref.")
    negatives: dict[Any, dict[str, dict]] = {}  # positive id -> negative_cate -> first such negative
    for entry in images:
        annotation = boxes.get(entry.get("id"), {})
        if annotation.get("negative_type") is not None:
            cate = annotation.get("negative_cate", "text")
            negatives.setdefault(annotation.get("positive_id"), {}).setdefault(cate, entry)
    folders = [image_dir, path.parent, path.parent.parent, path.parent.parent / "images"]

    def read() -> Iterator[RawQuestion]:
        for entry in images:
            expression = " ".join(str(entry["caption"]).split()).rstrip(".")
            annotation = boxes.get(entry.get("id"))
            if annotation is None:
                raise DatasetError(f"image entry {entry.get('id')} of {path} has no annotation.")
            negative = annotation.get("negative_type") is not None
            paired = {} if negative else negatives.get(entry.get("id"), {})
            text, image = paired.get("text"), paired.get("image")
            replacement = " ".join(str(text["caption"]).split()).rstrip(".") if text else None
            meta: dict[str, Any] = {
                "question_id": entry.get("id"),
                "expression": expression,
                "level": annotation.get("level"),
                "negative_type": annotation.get("negative_type"),
                "negative_cate": annotation.get("negative_cate"),
            }
            if not negative and annotation.get("bbox"):
                x, y, w, h = (float(v) for v in annotation["bbox"])
                meta["regions"] = [(x, y, x + w, y + h)]
            if text:
                meta["replaced_from"] = {SPAN: f"finecops-{text.get('id')}"}
            if image:
                meta["pair_id"] = f"finecops-{image.get('id')}"
            yield RawQuestion(
                id=f"finecops-{entry.get('id')}",
                question=QUESTION.format(expression=expression),
                answer="no" if negative else "yes",
                image=first_found(entry["file_name"], folders),
                spans={SPAN: expression},
                replacements={SPAN: replacement} if replacement and replacement != expression else {},
                image_pair=first_found(image["file_name"], folders) if image else None,
                foil="yes" if negative else "no",
                meta=meta,
            )

    hint = "FineCops-Ref uses GQA images (images.zip) and its own negative images; pass the GQA image folder."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )

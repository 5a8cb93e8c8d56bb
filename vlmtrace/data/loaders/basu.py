"""Basu et al.'s constraint CSVs, read as released: a question, its visual constraint, an image.

Basu et al. (NeurIPS 2024, github microsoft/MLLMInterpret) released their probe questions as
`data_constraints/multimodal_known.csv`, `multimodal_movies.csv` and `okvqa.csv`. Each row is a
question whose *visual constraint* ("This building", "this director") is written out in the
`main_entity` column, so the constraint span comes with the data instead of from a rule:

    ,question,subject,main_entity,image_url            # multimodal_known.csv
    0,This building is located in,Space Needle,This building,./A photo of Space Needle
    ,question,director,main_entity,image_url           # multimodal_movies.csv
    ,question,main_entity,image_url                    # okvqa.csv (image_url ./val2014/COCO_val2014_...jpg)

    samples = load_basu_constraints("data_constraints/multimodal_known.csv", n=100)

What the files do not hold, and how this loader fills it:
- No answers. The paper traces the answer the model itself gives (its top next token), so a row
  without an `answer` column gets `meta["answer_from"] = "model"` and `vlmtrace.data.preparation`
  asks the model before any trace. Add an `answer` column to trace given answers instead.
- `main_entity` is the constraint as annotated, sometimes with a trailing comma ("This software,")
  or another case than the question's ("this place," in "In this place, ..."). The span is the
  question's own words that match it, ignoring case and trailing punctuation. A row whose
  constraint is not in its question ("this hat" in "What type of hat is this gentleman wearing?")
  gets no span, and a recipe that needs one leaves it out with that reason.
- `image_url` is a path relative to the folder the images were unpacked to: IMAGES is the CSV's
  folder, or `images/` beside it. For the Known and Movies archives it names a folder per entity
  ("./A photo of Space Needle", as an image search tool saves them) whose first image is used;
  for OK-VQA it names a COCO val2014 file. The archives' inner layout is not documented in the
  repository: the folder-or-file rule is the best reading of `image_url`, not a published spec.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    csv_row_label,
    csv_rows,
    images_folder,
)

COLUMNS = ("question", "main_entity", "image_url")
"""Columns every constraint CSV has (with an unnamed index column first)."""
ENTITY_COLUMNS = ("subject", "director")
"""The entity the image shows: `subject` in multimodal_known.csv, `director` in multimodal_movies.csv."""
SPAN = "visual"
"""The span name of the visual constraint, as the recipes call it."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def load_basu_constraints(
    path: str | Path,
    *,
    image_dir: str | Path | None = None,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """One constraint CSV of Basu et al.; the `visual` span is the row's `main_entity`.

    `image_dir` defaults to the CSV's folder, or `images/` inside it when that exists. Rows without
    an `answer` column are marked for the model's own answer (`meta["answer_from"] == "model"`).
    """
    check_options(n, prompt_template, spans)
    path = Path(path)
    rows = csv_rows(path, "a constraint CSV of Basu et al. (MLLMInterpret data_constraints/)", COLUMNS)
    images = Path(image_dir) if image_dir is not None else images_folder(path.parent)

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            question = row["question"].strip()
            found = constraint_in(question, row["main_entity"])
            entity = next((row[c] for c in ENTITY_COLUMNS if row.get(c)), None)
            answer = (row.get("answer") or "").strip()
            yield RawQuestion(
                id=f"basu-{path.stem}-{csv_row_label(row, index)}",
                question=question,
                answer=answer,
                image=entity_image(images, row["image_url"]),
                spans={SPAN: found} if found else {},
                meta={
                    "constraint": row["main_entity"],
                    **({"entity": entity} if entity else {}),
                    **({} if answer else {"answer_from": "model"}),
                },
            )

    hint = (
        "image_url is relative to the folder the images were unpacked to (the CSV's folder or images/ "
        "beside it): Multimodal Known and Movies images from the Google Drive links of the MLLMInterpret "
        "README, OK-VQA's from COCO val2014."
    )
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def constraint_in(question: str, constraint: str) -> str | None:
    """The words of `question` that the annotated constraint names (case and trailing commas aside)."""
    words = constraint.strip().rstrip(",.;:?!").strip()
    if not words:
        return None
    match = re.search(rf"(?<!\w){re.escape(words)}(?!\w)", question, re.IGNORECASE)
    return match.group(0) if match else None


def entity_image(images: Path, url: str) -> Path:
    """The image an `image_url` names: a file, a file without its suffix, or a folder's first image."""
    relative = url.strip().removeprefix("./")
    target = images / relative
    if target.is_dir():
        inside = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return inside[0] if inside else target / "Image_1.jpg"  # where a missing image would be
    if not target.exists():
        for suffix in IMAGE_SUFFIXES:
            if target.with_name(target.name + suffix).is_file():
                return target.with_name(target.name + suffix)
    return target

"""ShapeWorld caption-agreement data, read as its generator extracts it: world images and caption files.

ShapeWorld (Kuhnle & Copestake 2017, github AlexKuhnle/ShapeWorld) generates abstract scenes of
coloured shapes with captions that do or do not agree with them. `generate.py` extracts a
caption-agreement set into one folder per shard (`examples/agreement/*` in the repository show
it; `shapeworld/dataset.py`, `serialize_value`, writes it):

    world-{n}.bmp (or .png with -G)   one image per world
    caption.txt                       one caption per world; with several captions per world
                                      (examples/agreement/combination), one per line and worlds
                                      separated by a blank line
    agreement.txt                     1.0 / 0.0 per caption, ';'-separated per world
    world_model.json                  optional (-M): each world's entities, with shape, colour and
                                      bounding_box (topleft / bottomright, fractions of the image)

Each (world, caption) with agreement 1.0 or 0.0 becomes "Is it true that {caption}?" answered
yes or no (foil the other). With world_model.json, the entities whose shape or colour the
caption names give `meta["regions"]` (their boxes in pixels). A caption of another world with
the same words and the other answer is an image pair (`vlmtrace.data.preparation` finds it).

    samples = load_shapeworld("examples/agreement/existential-oneshape", n=100)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    read_json,
    require_dir,
)

QUESTION = "Is it true that {caption}?"
IMAGE_SUFFIXES = (".bmp", ".png", ".jpg")


def is_shapeworld(root: Path) -> bool:
    return (root / "caption.txt").is_file() and (root / "agreement.txt").is_file()


def load_shapeworld(
    directory: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """One extracted ShapeWorld caption-agreement folder (world-*.bmp, caption.txt, agreement.txt)."""
    check_options(n, prompt_template, spans)
    root = require_dir(directory, "ShapeWorld")
    if not is_shapeworld(root):
        raise DatasetError(
            f"{root} has no caption.txt and agreement.txt; pass a folder ShapeWorld extracted."
        )
    agreements = [line for line in (root / "agreement.txt").read_text(encoding="utf-8").splitlines() if line]
    captions = _captions(root, len(agreements))
    models = (
        read_json(root / "world_model.json", "ShapeWorld world model")
        if (root / "world_model.json").is_file()
        else None
    )

    def read() -> Iterator[RawQuestion]:
        for world, (texts, values) in enumerate(zip(captions, agreements, strict=True)):
            scores = [float(v) for v in values.split(";")]
            if len(scores) != len(texts):
                raise DatasetError(
                    f"world {world} of {root} has {len(texts)} captions but {len(scores)} agreement values; "
                    "extract the set again."
                )
            image = _world_image(root, world)
            for index, (caption, score) in enumerate(zip(texts, scores, strict=True)):
                if score not in (0.0, 1.0):
                    continue  # ambiguous captions (agreement 0.5) have no answer
                sentence = caption.rstrip(" .")
                yes = score == 1.0
                meta: dict[str, Any] = {"world": world, "caption": sentence, "agreement": score}
                if models is not None:
                    boxes = _entity_boxes(models[world], sentence, image)
                    if boxes:
                        meta["regions"] = boxes
                yield RawQuestion(
                    id=f"shapeworld-{world}-{index}",
                    question=QUESTION.format(caption=sentence),
                    answer="yes" if yes else "no",
                    image=image,
                    foil="no" if yes else "yes",
                    meta=meta,
                )

    hint = "ShapeWorld writes world-{n}.bmp (or .png) beside caption.txt."
    return assemble(
        read(),
        source=root / "caption.txt",
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _captions(root: Path, worlds: int) -> list[list[str]]:
    """Each world's captions: blocks separated by blank lines (several captions a world), else one a line."""
    text = (root / "caption.txt").read_text(encoding="utf-8").strip("\n")
    if "\n\n" in text:
        blocks = [block.splitlines() for block in text.split("\n\n")]
    else:
        blocks = [[line] for line in text.splitlines() if line.strip()]
    if len(blocks) != worlds:
        raise DatasetError(
            f"{root / 'caption.txt'} holds captions for {len(blocks)} worlds, agreement.txt for {worlds}; "
            "extract the set again."
        )
    return blocks


def _world_image(root: Path, world: int) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (root / f"world-{world}{suffix}").is_file():
            return root / f"world-{world}{suffix}"
    return root / f"world-{world}.bmp"


def _entity_boxes(model: dict, caption: str, image: Path) -> list[tuple[float, float, float, float]]:
    """Boxes (pixels) of the entities whose shape or colour name is a word of the caption."""
    words = set(caption.lower().split())
    try:
        with Image.open(image) as picture:
            width, height = picture.size
    except OSError:
        return []
    boxes = []
    for entity in model.get("entities", []):
        names = {str(entity.get("shape", {}).get("name", "")), str(entity.get("color", {}).get("name", ""))}
        if names & words:
            box = entity.get("bounding_box", {})
            top, bottom = box.get("topleft", {}), box.get("bottomright", {})
            # shapes may reach past the border (boxes of -0.001 or 1.008 in the published examples)
            boxes.append(
                (
                    min(max(top.get("x", 0), 0.0), 1.0) * width,
                    min(max(top.get("y", 0), 0.0), 1.0) * height,
                    min(max(bottom.get("x", 0), 0.0), 1.0) * width,
                    min(max(bottom.get("y", 0), 0.0), 1.0) * height,
                )
            )
    return boxes

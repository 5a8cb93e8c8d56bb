"""Zhang et al.'s GQA subsets, read as released: one CSV per task, with the question's objects and boxes.

Zhang et al. ("Cross-modal Information Flow in Multimodal Large Language Models", CVPR 2025, github
FightingFighting/cross-modal-information-flow-in-MLLM) picked GQA val questions LLaVA answers
correctly and wrote each task to `datasets/GQA_val_correct_question_with_{task}.csv`. The rows
carry what their object knockouts need: the object a question is about and its box in image
pixels, so object regions come with the data, without GQA's scene graphs.

    question_id,img_id,question,answer,true option,false option,central object name,central object id,
        ...,image_w,image_h,central object w,central object h,central object x,central object y,...
    (ChooseAttr, QueryAttr, ChooseCat: one "central object"; ChooseRel, CompareAttr, LogicalObj:
     "object1 ..." and "object2 ...", "-" where the question names an object the image lacks)

    samples = load_zhang_gqa("datasets/GQA_val_correct_question_with_choose_ChooseAttr.csv",
                             "gqa/images", n=100)

Each sample gets `meta["regions"]` (boxes x0, y0, x1, y1 of the objects, for
`vlmtrace.data.regions`), `meta["object_names"]` (for `--span object=@object`), and the false
option of choose questions as its `foil`. Images are GQA's, `{img_id}.jpg`.
"""

from __future__ import annotations

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
    csv_rows,
    require_dir,
)

COLUMNS = ("question_id", "img_id", "question", "answer")
OBJECTS = ("central object", "object1", "object2")
"""Column prefixes of the objects a row names: `{prefix} name`, `{prefix} x` (y, w, h)."""


def load_zhang_gqa(
    path: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """One task CSV of Zhang et al.'s GQA subsets; images `image_dir/{img_id}.jpg` (GQA images.zip)."""
    check_options(n, prompt_template, spans)
    path, image_dir = Path(path), require_dir(image_dir, "GQA image")
    rows = csv_rows(path, "a GQA subset CSV of Zhang et al.", COLUMNS)

    def read() -> Iterator[RawQuestion]:
        for row in rows:
            names, boxes = [], []
            for prefix in OBJECTS:
                name = (row.get(f"{prefix} name") or "").strip()
                if name and name != "-":
                    names.append(name)
                box = _box(row, prefix)
                if box is not None:
                    boxes.append(box)
            false = (row.get("false option") or "").strip()
            yield RawQuestion(
                id=f"zhang_gqa-{row['question_id']}",
                question=row["question"].strip(),
                answer=row["answer"].strip(),
                image=image_dir / f"{row['img_id']}.jpg",
                foil=false or None,
                meta={
                    "question_id": row["question_id"],
                    "image_id": row["img_id"],
                    "task": row.get("type_detailed"),
                    "full_answer": row.get("full answer"),
                    "object_names": names,
                    **({"regions": boxes} if boxes else {}),
                },
            )

    hint = "GQA images are named {img_id}.jpg; pass the folder GQA's images.zip unpacks to."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _box(row: dict[str, str], prefix: str) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) from `{prefix} x`, `y`, `w`, `h`; None when absent or "-"."""
    try:
        x, y, w, h = (float(row[f"{prefix} {k}"]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        return None
    return (x, y, x + w, y + h)

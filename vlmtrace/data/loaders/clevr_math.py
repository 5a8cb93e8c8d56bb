"""CLEVR-Math, read as published: CLEVR scenes with arithmetic questions ("Remove all gray spheres. How many
spheres are there?").

CLEVR-Math (Lindström & Abraham 2022, github dali-does/clevr-math; Hugging Face dali-does/clevr-math,
whose loading script `clevr-math.py` reads it) ships `clevr-math.zip` (and `clevr-math-multihop.zip`)
holding `clevr-math-{train,val,test}.json`: CLEVR's question-file format, `{"questions": [...]}` with
`question`, `answer` (an integer), `image_filename`, `split`, `image_index` and `template_filename`
(subtraction, addition, adversarial, subtraction-multihop), on CLEVR's own images,
`CLEVR_v1.0/images/{split}/{image_filename}` (the test split's in `clevr-math-test-images.zip`).
The loading script joins `CLEVR_v1.0/images/{split}/{image_filename}` to the folder CLEVR_v1.0.zip
was extracted in; this loader reads one question file and looks for its images in
CLEVR_v1.0/images/{split}/, images/{split}/ or images/ beside the file or one folder up.
`meta["template"]` keeps the question family (without ".json"). Another image with the same
question and another count is an image pair (`vlmtrace.data.preparation` finds it).

    samples = load_clevr_math("clevr-math/clevr-math-val.json", n=100)
"""

from __future__ import annotations

import re
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
    first_found,
    list_field,
    read_json,
    required_field,
)

FILE = re.compile(r"^clevr-math(?:-multihop)?-(?:train|val|test)\.json$")


def clevr_math_files(root: Path) -> list[Path]:
    """CLEVR-Math question files in ROOT (or ROOT/clevr-math, as the archive unpacks)."""
    folders = [folder for folder in (root, root / "clevr-math") if folder.is_dir()]
    return [p for folder in folders for p in sorted(folder.glob("*.json")) if FILE.match(p.name)]


def load_clevr_math(
    questions_json: str | Path,
    *,
    image_dir: str | Path | None = None,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """One CLEVR-Math question file; images found by split under `image_dir` (default: beside the file)."""
    check_options(n, prompt_template, spans)
    path = Path(questions_json)
    rows = list_field(read_json(path, "CLEVR-Math questions"), "questions", path, "a CLEVR-Math file")
    roots = (path.parent, path.parent.parent)  # beside the file, or beside the folder the zip unpacked to
    bases = (
        [Path(image_dir)]
        if image_dir is not None
        else [root / sub for root in roots for sub in ("CLEVR_v1.0/images", "images")]
    )

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            if "answer" not in row:
                raise DatasetError(f"question {index} of {path} has no answer; is it a CLEVR-Math file?")
            filename = required_field(row, "image_filename", path, index)
            split = str(row.get("split") or "")
            folders = [base / split for base in bases if split] + bases
            template = str(row.get("template_filename") or "").removesuffix(".json")
            yield RawQuestion(
                id=f"clevr_math-{split or path.stem}-{index}",
                question=required_field(row, "question", path, index),
                answer=str(row["answer"]),
                image=first_found(filename, folders),
                meta={"template": template, "image_index": row.get("image_index"), "split": split},
            )

    hint = "CLEVR-Math uses CLEVR's images: CLEVR_v1.0/images/{split}/ beside the question files."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )

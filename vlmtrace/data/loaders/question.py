"""What every loader shares: a dataset's question as read, and how it becomes a `Sample`.

Each format module reads its own file layout into `RawQuestion` records and hands them to
`assemble`, which applies the choices every loader makes the same way (see the package
docstring): the prompt template, the requested constraint spans and the skip warning, `n`, and
images opened only for the samples kept, with errors naming the image and the dataset file. The
checks on options, the readers of JSON fields and CSV rows, and the lookups of image folders live
here too, so that every format rejects bad input with the same messages.

    check_options(n, prompt_template, spans)           # before reading a large file
    rows = list_field(read_json(path, "CLEVR questions"), "questions", path, "a CLEVR file")
    return assemble(read(), source=path, n=n, prompt_template=prompt_template, spans=spans, hint=hint)
"""

from __future__ import annotations

import csv
import json
import os
import string
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from ...errors import UserError
from ..sample import Sample

DEFAULT_TEMPLATE = "{question}"
"""The bare question: what BLIP-style models, which read the image by cross-attention, expect."""

SpanRequest = Mapping[str, str] | Callable[[str], Mapping[str, str] | None]
"""Constraint spans to mark: fixed texts by name, or a function of the raw question."""

MissingImages = Literal["raise", "mark"]
"""What a loader does with an image that is missing or unreadable: "raise" an error naming it (the
default: a silently shorter data set changes results), or "mark" the sample (image None and
`meta["image_error"]` saying why) for `vlmtrace.data.preparation` to leave out and count."""


class DatasetError(UserError):
    """A dataset file does not hold what its format promises, or yields no samples."""


class DataFileMissing(DatasetError, FileNotFoundError):
    """A file that a dataset's layout needs is not where the layout keeps it. Also a
    FileNotFoundError, so code that catches a missing file (an image to mark) still does."""


class SkippedSamplesWarning(UserWarning):
    """Some questions were left out because their prompt lacks a requested constraint span."""


@dataclass(frozen=True)
class RawQuestion:
    """One question as a dataset file states it, before its prompt is made and its image opened."""

    id: str
    question: str
    answer: str
    image: Path
    meta: Mapping[str, Any] = field(default_factory=dict)
    prompt: str | None = None  # a table row's verbatim prompt: the template is not applied to it
    spans: Mapping[str, str] = field(default_factory=dict)  # spans the file marks itself (tables)
    replacements: Mapping[str, str] = field(default_factory=dict)
    image_pair: Path | None = None
    foil: str | None = None


def assemble(
    questions: Iterable[RawQuestion],
    *,
    source: Path,
    n: int | None,
    prompt_template: str,
    spans: SpanRequest | None,
    hint: str,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """Prompts, spans and images for the first n questions that have every requested span."""
    samples: list[Sample] = []
    seen = skipped = 0
    for question in questions:
        if n is not None and len(samples) >= n:
            break
        seen += 1
        prompt = (
            question.prompt
            if question.prompt is not None
            else prompt_template.format(question=question.question)
        )
        for name, text in question.spans.items():
            if text not in prompt:
                raise DatasetError(
                    f"span {name!r} of sample {question.id} in {source} is {text!r}, which does not occur "
                    f"in its prompt {prompt!r}; copy the span verbatim from the question."
                )
        requested = _requested_spans(spans, question.question, prompt)
        if requested is None:
            skipped += 1
            continue
        marked = {**question.spans, **requested}
        unmatched = sorted(set(question.replacements) - set(marked))
        if unmatched:
            raise DatasetError(
                f"sample {question.id} in {source} has replacements for {unmatched} but no span of that "
                f"name (spans: {sorted(marked)}); add the span or drop the replacement."
            )
        errors: dict[str, str] = {}  # "image_error" when an image is marked missing, not raised
        opened, pair = (
            _image_or_mark(path, question.id, source, hint, missing_images, errors)
            for path in (question.image, question.image_pair)
        )
        samples.append(
            Sample(
                prompt=prompt,
                answer=question.answer,
                image=opened,
                spans=marked,
                replacements=dict(question.replacements),
                image_pair=pair,
                foil=question.foil,
                id=question.id,
                meta={
                    "question": question.question,
                    "image": str(question.image),
                    **({"verbatim_prompt": True} if question.prompt is not None else {}),
                    **question.meta,
                    **errors,
                },
            )
        )
    if skipped:
        warnings.warn(
            f"{source}: skipped {skipped} of {seen} questions whose prompt lacks a requested span "
            f"({_describe_request(spans)}); {len(samples)} remain.",
            SkippedSamplesWarning,
            stacklevel=_caller_level(),
        )
    if not samples:
        if skipped:
            raise DatasetError(
                f"no question of {source} has every requested span ({_describe_request(spans)}); "
                "choose spans that occur in its questions."
            )
        raise DatasetError(f"{source} holds no questions; check that it is the right file.")
    return samples


_PACKAGE_DIR = os.path.dirname(__file__)  # frames in any loader module are skipped by _caller_level


def _caller_level() -> int:
    """The warnings stacklevel of the first caller outside this package, however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    return level


def _requested_spans(spans: SpanRequest | None, question: str, prompt: str) -> dict[str, str] | None:
    """The requested spans of one prompt, or None when one is missing (the sample is skipped)."""
    if spans is None:
        return {}
    found = spans(question) if callable(spans) else spans
    if not found or any(not text or text not in prompt for text in found.values()):
        return None
    return dict(found)


def _describe_request(spans: SpanRequest | None) -> str:
    return f"spans {sorted(spans)}" if isinstance(spans, Mapping) else "spans from the spans function"


def _open_image(path: Path, sample_id: str, source: Path, hint: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataFileMissing(
            f"image {path} of sample {sample_id} in {source} does not exist; {hint}"
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(
            f"image {path} of sample {sample_id} in {source} cannot be read ({error}); replace the "
            "file or remove the question from the dataset."
        ) from error


def _image_or_mark(
    path: Path | None, sample_id: str, source: Path, hint: str, missing: MissingImages, errors: dict
) -> Image.Image | None:
    """The opened image; None with `errors["image_error"]` set when it fails and `missing` is "mark"."""
    if path is None:
        return None
    try:
        return _open_image(path, sample_id, source, hint)
    except (FileNotFoundError, DatasetError) as error:
        if missing == "raise":
            raise
        errors.setdefault("image_error", _image_problem(error))
        return None


def _image_problem(error: BaseException) -> str:
    """The reason a marked sample is left out for: its image is missing, or cannot be read."""
    return "image missing" if isinstance(error, FileNotFoundError) else "image unreadable"


def check_options(n: int | None, prompt_template: str, spans: SpanRequest | None) -> None:
    """Reject bad arguments before reading a dataset file, which can take a while."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n is the number of samples to load, a positive int or None (all); got {n!r}.")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(prompt_template) if name is not None}
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"prompt_template {prompt_template!r} is not a format string ({error}); write literal "
            "braces as {{ and }}."
        ) from None
    if fields != {"question"}:
        raise ValueError(
            f"prompt_template must use the field {{question}} and no other; {prompt_template!r} uses "
            f"{sorted(fields)}. Write literal braces as {{{{ and }}}}."
        )
    if spans is not None and not callable(spans):
        if not isinstance(spans, Mapping):
            raise TypeError(
                "spans is a mapping name -> text or a function question -> mapping; "
                f"got {type(spans).__name__}."
            )
        empty = [name for name, text in spans.items() if not isinstance(text, str) or not text]
        if empty:
            raise ValueError(f"spans {empty} are empty or not text; give each span the words it covers.")


class NotANumber(ValueError):
    """A JSON text held NaN or Infinity: not JSON, and a missing value where one is read."""


def strict_json(text: str) -> Any:
    """`json.loads` refusing NaN and Infinity, which Python's parser accepts: a NaN answer was
    read as the text "nan" and scored as the token "n"."""

    def refuse(constant: str) -> Any:
        raise NotANumber(constant)

    return json.loads(text, parse_constant=refuse)


def not_a_number(where: str, constant: str) -> DatasetError:
    return DatasetError(
        f"{where} holds {constant}, which is not JSON and not a value (a missing answer or field?); "
        "write the value, or drop the entry."
    )


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataFileMissing(f"{what} file {path} does not exist.")
    try:
        return strict_json(path.read_text(encoding="utf-8"))
    except NotANumber as constant:
        raise not_a_number(str(path), str(constant)) from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON ({error}); is it a {what} file?") from None


def list_field(document: Any, key: str, path: Path, what: str) -> list[dict[str, Any]]:
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise DatasetError(
            f"{path} is not {what}: expected a JSON object with a {key!r} list; "
            f"got {describe_json(document)}."
        )
    return document[key]


def required_field(record: Any, key: str, path: Path, where: int | str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DatasetError(
            f"entry {where} of {path} has no {key!r}; is this file in the format its loader reads?"
        )
    return record[key]


def describe_json(document: Any) -> str:
    if isinstance(document, dict):
        return f"an object with keys {sorted(document)[:5]}"
    return f"a JSON {type(document).__name__}"


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataFileMissing(f"{what} folder {path} does not exist; pass the folder holding the images.")
    return path


def images_folder(root: Path) -> Path:
    """A dataset's image folder: `root/images` when that folder exists, else `root` itself."""
    return root / "images" if (root / "images").is_dir() else root


def first_found(name: str, folders: Sequence[Path]) -> Path:
    """`name` in the first of `folders` holding it; in the first folder when none does (for the error)."""
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return folders[0] / name


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first row), [] for an empty file."""
    with path.open(encoding="utf-8-sig", newline="") as file:  # -sig: spreadsheets write a BOM
        return next(csv.reader(file), [])


def csv_rows(path: Path, what: str, columns: Iterable[str]) -> list[dict[str, str]]:
    """The rows of a CSV file as column -> cell, after checking that it has `columns`."""
    if not path.is_file():
        raise DataFileMissing(f"{what} file {path} does not exist.")
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{path} is not {what}: it has no column {', '.join(map(repr, missing))} "
                f"(its columns: {reader.fieldnames}); pass the file as its release publishes it."
            )
        return list(reader)


def csv_row_label(row: Mapping[str, str], index: int) -> str | int:
    """A released CSV row's label: the unnamed index column pandas writes first, else its position."""
    return row.get("") or index

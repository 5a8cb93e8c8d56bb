"""Your own questions as a table: a JSONL or CSV file, one sample per row.

The published datasets fix their layout; a table lets an experiment bring its own questions,
prompts already written for one model, constraint spans and counterfactual replacements marked
per row, and image pairs or foils. `load_table` documents the fields.

    samples = load_table("probes.csv", n=100)  # image,question,answer,span:visual,replacement:visual
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DataFileMissing,
    DatasetError,
    MissingImages,
    NotANumber,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    describe_json,
    not_a_number,
    strict_json,
)

_TABLE_FIELDS = {"image", "question", "prompt", "answer", "spans", "replacements", "image_pair", "foil", "id"}


def load_table(
    path: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """Your own questions: a JSONL or CSV file, one sample per row.

    Fields (JSONL keys; CSV columns):
    - `image`: path of the image, relative to the file's folder (or absolute). Required.
    - `question` (formatted with `prompt_template`) or `prompt` (used verbatim, for rows already
      written for one model). One of them is required.
    - `answer`. Required.
    - `spans`: constraint spans, a JSON object name -> text in JSONL; columns `span:NAME` in CSV.
      Each text must occur in the prompt.
    - `replacements`: counterfactual phrases for those spans, likewise (`replacement:NAME`).
    - `image_pair` (path, like `image`), `foil`, `id` (kept verbatim; default "{file stem}-{row}",
      rows counted from 0).
    Other fields go to `meta`; empty CSV cells count as absent.

        image,question,answer,span:visual,replacement:visual
        scene1.png,what colour is the left shape ?,red,the left shape,the right shape
    """
    check_options(n, prompt_template, spans)
    path = Path(path)
    if not path.is_file():
        raise DataFileMissing(f"table {path} does not exist; pass a .jsonl or .csv file.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path)
    elif suffix == ".csv":
        records = _csv_records(path)
    else:
        raise DatasetError(
            f"{path}: a table is a .jsonl or .csv file, not {suffix or 'a file without suffix'}."
        )

    def read() -> Iterator[RawQuestion]:
        for index, (where, record) in enumerate(records):
            yield _table_question(record, path=path, where=where, index=index)

    hint = "image paths in a table are relative to the table's folder."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = strict_json(line)
            except NotANumber as constant:
                raise not_a_number(f"line {number} of {path}", str(constant)) from None
            except json.JSONDecodeError as error:
                raise DatasetError(f"line {number} of {path} is not valid JSON ({error}).") from None
            if not isinstance(record, dict):
                raise DatasetError(
                    f"line {number} of {path} is {describe_json(record)}; each line is one JSON object."
                )
            yield f"line {number}", record


def _csv_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as file:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(file)
        for row in reader:
            record: dict[str, Any] = {"spans": {}, "replacements": {}}
            for column, value in row.items():
                if column is None or value in (None, ""):
                    continue
                if column.startswith("span:"):
                    record["spans"][column.removeprefix("span:")] = value
                elif column.startswith("replacement:"):
                    record["replacements"][column.removeprefix("replacement:")] = value
                else:
                    record[column] = value
            yield f"line {reader.line_num}", record


def _table_question(record: dict[str, Any], *, path: Path, where: str, index: int) -> RawQuestion:
    def given(key: str) -> bool:
        return record.get(key) not in (None, "")

    missing = [key for key in ("image", "answer") if not given(key)]
    if not given("question") and not given("prompt"):
        missing.append("question (or prompt)")
    if missing:
        raise DatasetError(
            f"{where} of {path} has no {', '.join(missing)}; every row needs image, question (or prompt) "
            "and answer."
        )
    for key in ("spans", "replacements"):
        value = record.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(text, str) for text in value.values()):
            raise DatasetError(f"{key} on {where} of {path} must be an object name -> text; got {value!r}.")
    return RawQuestion(
        id=str(record["id"]) if given("id") else f"{path.stem}-{index}",
        question=str(record["question"] if given("question") else record["prompt"]),
        answer=str(record["answer"]),
        image=path.parent / str(record["image"]),
        meta={key: value for key, value in record.items() if key not in _TABLE_FIELDS},
        prompt=str(record["prompt"]) if given("prompt") else None,
        spans=record.get("spans", {}),
        replacements=record.get("replacements", {}),
        image_pair=path.parent / str(record["image_pair"]) if given("image_pair") else None,
        foil=str(record["foil"]) if given("foil") else None,
    )

"""Real VQA datasets, read from local files in their published formats, as `Sample`s.

Causal tracing on a real model wants real questions, and every benchmark ships its own layout:
VQA v2 keeps answers apart from questions and names images after their COCO split, GQA keys
questions by id, CLEVR keeps a folder per split, COCO-QA stores parallel text files. Each loader
here reads one layout as published and returns the same `Sample`s, so an experiment never knows
which file its questions came from.

    samples = load_vqa_v2("v2_OpenEnded_mscoco_val2014_questions.json",
                          "v2_mscoco_val2014_annotations.json", "coco/val2014", n=100,
                          prompt_template="USER: <image>\\n{question} ASSISTANT:",
                          spans={"subject": "this animal"})
    samples = load_dataset("data/gqa", n=100)      # what the CLI's --data does: detects the layout

Choices every loader shares:
- The prompt is `prompt_template.format(question=...)`. Models read different prompts (LLaVA
  "USER: <image>\\n{question} ASSISTANT:", BLIP the bare question, the default), so the caller
  chooses; the raw question stays in `meta["question"]`.
- Real datasets do not mark constraint spans. `spans` names them: a mapping name -> text, or a
  function question -> mapping. A question whose prompt lacks a requested span is skipped, and a
  single `SkippedSamplesWarning` says how many were.
- `n` keeps the first n samples in file order (after skipping); only their images are opened.
- A missing or unreadable image raises an error naming the image and the dataset file. It is
  never skipped: a silently shorter data set changes results without a trace.
- Ids are "{dataset}-{question id}" ("vqa_v2-262148000"); they become the `sample` coordinate.

Layouts `load_dataset` recognises (IMAGES is DIR/images if that folder exists, else DIR):
- table: a `.jsonl` or `.csv` file (see `load_table`).
- VQA v2: DIR/*_questions.json with DIR/*_annotations.json beside it
  (v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json); images
  COCO_val2014_{image_id:012d}.jpg or {image_id:012d}.jpg in IMAGES or a folder inside it.
- GQA: DIR/{split}_balanced_questions.json; images IMAGES/{imageId}.jpg.
- CLEVR: DIR/questions/CLEVR_{split}_questions.json (CLEVR_v1.0 as unpacked) or
  DIR/CLEVR_{split}_questions.json; images IMAGES/{split}/{image_filename} or IMAGES/{image_filename}.
- COCO-QA: DIR/test/ (else DIR/train/) holding questions.txt, answers.txt, img_ids.txt and
  types.txt; COCO images in IMAGES or a folder inside it. PATH may also be DIR/train itself.
A directory with several question files (train and val, say) is ambiguous: pass the question
file itself as PATH (DIR/questions/CLEVR_val_questions.json).
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .sample import Sample

DEFAULT_TEMPLATE = "{question}"
"""The bare question: what BLIP-style models, which read the image by cross-attention, expect."""

SpanRequest = Mapping[str, str] | Callable[[str], Mapping[str, str] | None]
"""Constraint spans to mark: fixed texts by name, or a function of the raw question."""

_LAYOUTS = """\
  table:   PATH.jsonl or PATH.csv with image, question (or prompt) and answer per row
  VQA v2:  DIR/*_questions.json + DIR/*_annotations.json; COCO images in DIR/images (or DIR)
  GQA:     DIR/{split}_balanced_questions.json; images DIR/images/{imageId}.jpg
  CLEVR:   DIR/questions/CLEVR_{split}_questions.json; images DIR/images/{split}/
  COCO-QA: DIR/test/ or DIR/train/ with questions.txt answers.txt img_ids.txt types.txt;
           COCO images in DIR/images (or DIR)"""

_CLEVR_FILE = re.compile(r"^CLEVR_\w+_questions\.json$")
_GQA_FILE = re.compile(r"^\w+_balanced_questions\.json$")
_VQA_FILE = re.compile(r"^.+_questions\.json$")
_VQA_SUBTYPE = re.compile(r"(?:train|val|test-dev|test)\d{4}")
_COCO_IMAGE = re.compile(r"^(?:COCO_(\w+?)_)?(\d{12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_COCO_QA_FILES = ("questions", "answers", "img_ids", "types")
_COCO_QA_TYPES = {"0": "object", "1": "number", "2": "color", "3": "location"}
_TABLE_FIELDS = {"image", "question", "prompt", "answer", "spans", "replacements", "image_pair", "foil", "id"}


class DatasetError(ValueError):
    """A dataset file does not hold what its format promises, or yields no samples."""


class SkippedSamplesWarning(UserWarning):
    """Some questions were left out because their prompt lacks a requested constraint span."""


@dataclass(frozen=True)
class _Question:
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


def load_vqa_v2(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
) -> list[Sample]:
    """VQA v2 questions with their consensus answer (`multiple_choice_answer`).

    `image_dir` holds the COCO images of the questions' split, named COCO_{split}_{id:012d}.jpg
    (2014 release) or {id:012d}.jpg (2017 release), directly or in a folder inside it (val2014/).
    `meta` keeps the ten human `answers`, `answer_type`, `question_type` and the ids.
    """
    _check_options(n, prompt_template, spans)
    questions_json, annotations_json = Path(questions_json), Path(annotations_json)
    questions = _read_json(questions_json, "VQA v2 questions")
    rows = _list_field(questions, "questions", questions_json, "a VQA v2 questions file")
    annotations = _list_field(
        _read_json(annotations_json, "VQA v2 annotations"),
        "annotations",
        annotations_json,
        "a VQA v2 annotations file",
    )
    by_question = {_need(a, "question_id", annotations_json, i): a for i, a in enumerate(annotations)}
    subtype = questions.get("data_subtype")
    images = _CocoImages(_require_dir(image_dir, "COCO image"), subtype)

    def read() -> Iterator[_Question]:
        for index, row in enumerate(rows):
            question_id = _need(row, "question_id", questions_json, index)
            annotation = by_question.get(question_id)
            if annotation is None:
                raise DatasetError(
                    f"{annotations_json} has no annotation for question {question_id} of "
                    f"{questions_json}; pass the annotations file of the same split (VQA v2 test "
                    "questions have no public answers)."
                )
            image_id = int(_need(row, "image_id", questions_json, index))
            yield _Question(
                id=f"vqa_v2-{question_id}",
                question=_need(row, "question", questions_json, index),
                answer=_need(annotation, "multiple_choice_answer", annotations_json, index),
                image=images.path(image_id),
                meta={
                    "question_id": question_id,
                    "image_id": image_id,
                    "answers": [a["answer"] for a in annotation.get("answers", [])],
                    "answer_type": annotation.get("answer_type"),
                    "question_type": annotation.get("question_type"),
                },
            )

    prefix = f"COCO_{subtype}_" if subtype else "COCO_{split}_"
    hint = (
        f"VQA v2 images are named {prefix}{{image_id:012d}}.jpg or {{image_id:012d}}.jpg, in the "
        "image folder or a folder inside it; pass the COCO image folder of the questions' split."
    )
    return _assemble(
        read(), source=questions_json, n=n, prompt_template=prompt_template, spans=spans, hint=hint
    )


def load_gqa(
    questions_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
) -> list[Sample]:
    """GQA questions (the balanced files: a JSON object keyed by question id), images {imageId}.jpg.

    The short `answer` is the answer; `meta` keeps `full_answer` and the question `types`.
    """
    _check_options(n, prompt_template, spans)
    questions_json, image_dir = Path(questions_json), _require_dir(image_dir, "GQA image")
    document = _read_json(questions_json, "GQA questions")
    if not isinstance(document, dict) or not all(isinstance(row, dict) for row in document.values()):
        raise DatasetError(
            f"{questions_json} is not a GQA questions file: expected a JSON object keyed by question "
            'id, each {"imageId", "question", "answer", ...}; got ' + _describe(document) + "."
        )

    def read() -> Iterator[_Question]:
        for question_id, row in document.items():
            if "answer" not in row:
                raise DatasetError(
                    f"question {question_id} of {questions_json} has no answer; GQA's test and "
                    "challenge questions are unanswered, load the val or testdev balanced questions."
                )
            image_id = _need(row, "imageId", questions_json, question_id)
            yield _Question(
                id=f"gqa-{question_id}",
                question=_need(row, "question", questions_json, question_id),
                answer=str(row["answer"]),
                image=image_dir / f"{image_id}.jpg",
                meta={
                    "question_id": question_id,
                    "image_id": image_id,
                    "full_answer": row.get("fullAnswer"),
                    "types": row.get("types", {}),
                },
            )

    hint = "GQA images are named {imageId}.jpg; pass the folder images.zip unpacks to."
    return _assemble(
        read(), source=questions_json, n=n, prompt_template=prompt_template, spans=spans, hint=hint
    )


def load_clevr(
    questions_json: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
) -> list[Sample]:
    """CLEVR questions (also CLEVR-CoGenT), images image_dir/{image_filename} or image_dir/{split}/...

    `image_dir` may be CLEVR_v1.0/images (a folder per split) or the split's folder itself.
    `meta` keeps `question_family_index`, `image_index` and `split`.
    """
    _check_options(n, prompt_template, spans)
    questions_json, image_dir = Path(questions_json), _require_dir(image_dir, "CLEVR image")
    rows = _list_field(
        _read_json(questions_json, "CLEVR questions"), "questions", questions_json, "a CLEVR file"
    )

    def read() -> Iterator[_Question]:
        for index, row in enumerate(rows):
            if "answer" not in row:
                raise DatasetError(
                    f"question {index} of {questions_json} has no answer; CLEVR's test questions are "
                    "unanswered, load the val (or train) questions."
                )
            filename = _need(row, "image_filename", questions_json, index)
            split = row.get("split")
            image = image_dir / filename
            if not image.exists() and split and (image_dir / split / filename).exists():
                image = image_dir / split / filename
            question_id = row.get("question_index", index)
            yield _Question(
                id=f"clevr-{question_id}",
                question=_need(row, "question", questions_json, index),
                answer=str(row["answer"]),
                image=image,
                meta={
                    "question_index": question_id,
                    "image_index": row.get("image_index"),
                    "split": split,
                    "question_family_index": row.get("question_family_index"),
                },
            )

    hint = "CLEVR images lie in images/{split}/; pass CLEVR_v1.0/images or the split's folder."
    return _assemble(
        read(), source=questions_json, n=n, prompt_template=prompt_template, spans=spans, hint=hint
    )


def load_coco_qa(
    directory: str | Path,
    *,
    image_dir: str | Path,
    split: str = "test",
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
) -> list[Sample]:
    """COCO-QA: parallel text files in directory/{split}/, one line per question, COCO images.

    The files are questions.txt, answers.txt, img_ids.txt (COCO image ids) and types.txt
    (0 object, 1 number, 2 color, 3 location, kept as `meta["type"]`). Question ids are
    "{split}-{line index}". `image_dir` holds the COCO 2014 images, directly or in train2014/
    and val2014/ inside it.
    """
    _check_options(n, prompt_template, spans)
    split_dir = Path(directory) / split
    paths = {name: split_dir / f"{name}.txt" for name in _COCO_QA_FILES}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
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
    images = _CocoImages(_require_dir(image_dir, "COCO image"), None)

    def read() -> Iterator[_Question]:
        rows = zip(*(columns[name] for name in _COCO_QA_FILES), strict=True)
        for index, (question, answer, image_id, kind) in enumerate(rows):
            yield _Question(
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
    return _assemble(
        read(), source=paths["questions"], n=n, prompt_template=prompt_template, spans=spans, hint=hint
    )


def load_table(
    path: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
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
    _check_options(n, prompt_template, spans)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist; pass a .jsonl or .csv file.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path)
    elif suffix == ".csv":
        records = _csv_records(path)
    else:
        raise DatasetError(
            f"{path}: a table is a .jsonl or .csv file, not {suffix or 'a file without suffix'}."
        )

    def read() -> Iterator[_Question]:
        for index, (where, record) in enumerate(records):
            yield _table_question(record, path=path, where=where, index=index)

    hint = "image paths in a table are relative to the table's folder."
    return _assemble(read(), source=path, n=n, prompt_template=prompt_template, spans=spans, hint=hint)


def load_dataset(
    path: str | Path,
    *,
    n: int | None = None,
    prompt_template: str | None = None,
    spans: SpanRequest | None = None,
) -> list[Sample]:
    """Samples from a table file, a dataset directory or a dataset's question file, by its layout.

    The layouts are listed in this module's docstring. `prompt_template` None is the bare question.
    """
    path = Path(path)
    options: dict[str, Any] = {
        "n": n,
        "prompt_template": DEFAULT_TEMPLATE if prompt_template is None else prompt_template,
        "spans": spans,
    }
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a dataset in one of these layouts:\n{_LAYOUTS}")
    if path.is_dir():
        return _load_directory(path, options)
    if path.suffix.lower() in (".jsonl", ".csv"):
        return load_table(path, **options)
    if path.suffix.lower() == ".json":
        return _load_question_file(path, options)
    raise DatasetError(f"{path} is in no layout vlmtrace reads. Accepted layouts:\n{_LAYOUTS}")


def _load_directory(root: Path, options: dict[str, Any]) -> list[Sample]:
    for split in ("test", "train"):
        if (root / split / "questions.txt").is_file():
            return load_coco_qa(root, image_dir=_images(root), split=split, **options)
    if all((root / f"{name}.txt").is_file() for name in _COCO_QA_FILES):
        return load_coco_qa(root.parent, image_dir=_images(root.parent), split=root.name, **options)
    folders = [folder for folder in (root, root / "questions") if folder.is_dir()]
    candidates = [p for folder in folders for p in sorted(folder.glob("*.json")) if _kind(p) is not None]
    if len(candidates) == 1:
        return _load_question_file(candidates[0], options)
    if candidates:
        listing = "\n".join(f"  {p}" for p in candidates)
        raise DatasetError(
            f"{root} holds several question files:\n{listing}\npass the one to load as PATH "
            f"(for instance {candidates[0]})."
        )
    raise DatasetError(f"{root} matches no dataset layout vlmtrace reads. Accepted layouts:\n{_LAYOUTS}")


def _load_question_file(file: Path, options: dict[str, Any]) -> list[Sample]:
    root = file.parent.parent if file.parent.name == "questions" else file.parent
    kind = _kind(file)
    if kind == "clevr":
        return load_clevr(file, _images(root), **options)
    if kind == "gqa":
        return load_gqa(file, _images(root), **options)
    if kind == "vqa_v2":
        return load_vqa_v2(file, _vqa_annotations(file), _images(root), **options)
    raise DatasetError(
        f"{file} is not a question file of a known layout (its name decides). Accepted layouts:\n{_LAYOUTS}"
    )


def _kind(file: Path) -> str | None:
    """Which dataset a question file belongs to, by its published name."""
    if _CLEVR_FILE.match(file.name):
        return "clevr"
    if _GQA_FILE.match(file.name):
        return "gqa"
    if _VQA_FILE.match(file.name) and _vqa_annotation_files(file):
        return "vqa_v2"
    return None


def _vqa_annotation_files(questions: Path) -> list[Path]:
    folders = {
        questions.parent,
        questions.parent.parent if questions.parent.name == "questions" else questions.parent,
    }
    return sorted(p for folder in folders for p in folder.glob("*_annotations.json"))


def _vqa_annotations(questions: Path) -> Path:
    """The annotations file of the questions' split: the only one, or the one naming the same split."""
    files = _vqa_annotation_files(questions)
    if len(files) == 1:
        return files[0]
    subtype = _VQA_SUBTYPE.search(questions.name)
    matching = [p for p in files if subtype and subtype.group(0) in p.name]
    if len(matching) == 1:
        return matching[0]
    raise DatasetError(
        f"cannot tell which of {[p.name for p in files]} annotates {questions.name}; keep one split's "
        "questions and annotations per folder, or call load_vqa_v2 with both files."
    )


def _images(root: Path) -> Path:
    return root / "images" if (root / "images").is_dir() else root


class _CocoImages:
    """COCO images by id, whichever split prefix (COCO_val2014_) or subfolder (val2014/) they have."""

    def __init__(self, image_dir: Path, subtype: str | None):
        self.image_dir = image_dir
        self.subtype = subtype  # the questions' split: preferred when an id is found twice
        self._paths: dict[int, Path] | None = None

    def path(self, image_id: int) -> Path:
        """The image's file; where it would be if it is missing, for the error message."""
        if self._paths is None:
            self._paths = self._scan()
        found = self._paths.get(image_id)
        if found is not None:
            return found
        name = f"COCO_{self.subtype}_{image_id:012d}.jpg" if self.subtype else f"{image_id:012d}.jpg"
        return self.image_dir / name

    def _scan(self) -> dict[int, Path]:
        # One listing per folder: a COCO split holds 40k-120k files, too many to probe name by name.
        paths: dict[int, Path] = {}
        folders = [self.image_dir]
        with os.scandir(self.image_dir) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        folders += [Path(entry.path) for entry in listed if entry.is_dir()]
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    match = _COCO_IMAGE.match(entry.name)
                    if match is None:
                        continue
                    image_id = int(match.group(2))
                    if image_id not in paths or match.group(1) == self.subtype:
                        paths[image_id] = Path(entry.path)
        return paths


def _assemble(
    questions: Iterable[_Question],
    *,
    source: Path,
    n: int | None,
    prompt_template: str,
    spans: SpanRequest | None,
    hint: str,
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
        samples.append(
            Sample(
                prompt=prompt,
                answer=question.answer,
                image=_open_image(question.image, question.id, source, hint),
                spans=marked,
                replacements=dict(question.replacements),
                image_pair=None
                if question.image_pair is None
                else _open_image(question.image_pair, question.id, source, hint),
                foil=question.foil,
                id=question.id,
                meta={"question": question.question, "image": str(question.image), **question.meta},
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


def _caller_level() -> int:
    """The warnings stacklevel of the first caller outside this module, however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
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
        raise FileNotFoundError(
            f"image {path} of sample {sample_id} in {source} does not exist; {hint}"
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(
            f"image {path} of sample {sample_id} in {source} cannot be read ({error}); replace the "
            "file or remove the question from the dataset."
        ) from error


def _check_options(n: int | None, prompt_template: str, spans: SpanRequest | None) -> None:
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


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON ({error}); is it a {what} file?") from None


def _list_field(document: Any, key: str, path: Path, what: str) -> list[dict[str, Any]]:
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise DatasetError(
            f"{path} is not {what}: expected a JSON object with a {key!r} list; got {_describe(document)}."
        )
    return document[key]


def _need(record: Any, key: str, path: Path, where: int | str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DatasetError(
            f"entry {where} of {path} has no {key!r}; is this file in the format its loader reads?"
        )
    return record[key]


def _describe(document: Any) -> str:
    if isinstance(document, dict):
        return f"an object with keys {sorted(document)[:5]}"
    return f"a JSON {type(document).__name__}"


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist; pass the folder holding the images.")
    return path


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"line {number} of {path} is not valid JSON ({error}).") from None
            if not isinstance(record, dict):
                raise DatasetError(
                    f"line {number} of {path} is {_describe(record)}; each line is one JSON object."
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


def _table_question(record: dict[str, Any], *, path: Path, where: str, index: int) -> _Question:
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
    return _Question(
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


__all__ = [
    "DEFAULT_TEMPLATE",
    "DatasetError",
    "SkippedSamplesWarning",
    "SpanRequest",
    "load_clevr",
    "load_coco_qa",
    "load_dataset",
    "load_gqa",
    "load_table",
    "load_vqa_v2",
]

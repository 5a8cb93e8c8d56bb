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

One module per format (`vqa`, `gqa`, `clevr`, `cocoqa`, `table`), each reading its layout into the
records that `question` turns into `Sample`s; `coco_images` finds COCO images by id for VQA v2 and
COCO-QA. This module recognises a layout and calls the format's loader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..sample import Sample
from .clevr import load_clevr
from .cocoqa import _COCO_QA_FILES, load_coco_qa
from .gqa import load_gqa
from .question import DEFAULT_TEMPLATE, DatasetError, SkippedSamplesWarning, SpanRequest
from .table import load_table
from .vqa import load_vqa_v2

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

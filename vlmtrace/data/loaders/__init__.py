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
- A missing or unreadable image raises an error naming the image and the dataset file: a silently
  shorter data set changes results without a trace. `missing_images="mark"` keeps the sample
  marked instead, for `vlmtrace.data.preparation` to leave out and count in its table.
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

The seed papers' own data, recognised by their published names and columns:
- IconQA: DIR/iconqa/{split}/{choose_txt,fill_in_blank}/{pid}/ (data.json, image.png); DIR is
  iconqa_data (or iconqa_data/iconqa).
- FineCops-Ref: its COCO-format annotations JSON (images with captions); GQA images in ROOT/gqa,
  ROOT/images or ROOT, ROOT being the JSON's folder (its parent if that is annotations/).
- Basu et al.'s constraint CSVs (question, main_entity, image_url); images as `image_url` says,
  relative to the CSV's folder (or images/ beside it).
- Zhang et al.'s GQA subset CSVs (question_id, img_id, question, answer, object columns); GQA
  images {img_id}.jpg in IMAGES of the CSV's folder.
- Palit et al.'s COCO-QA CSVs (train_image_id_count, question_count, answer_count; COCO images in
  IMAGES) and CLEVR CSV (Image_IDs, Questions_Answers; {Image_IDs}.png in IMAGES or IMAGES/val).
Any other CSV is a table.

NOTICE's semantic image pairs and the seed's proposed data sets:
- SVO-Probes: svo_probes.csv (sentence, pos_triplet, neg_triplet, subj_neg, verb_neg, obj_neg,
  pos_url, neg_url, pos_image_id, neg_image_id); downloaded images {image_id}.jpg in IMAGES.
- MIT-States: release_dataset/images/'adjective noun'/*.jpg (DIR, DIR/images or DIR/release_dataset/images).
- Facial expressions (NOTICE's Kaggle set): DIR/images/{train,validation}/{emotion}/*.jpg.
- COOCO: DIR/generated_images/{scene}/{image}_{scene}_{target}_{replacement}_relscore_{level}.jpg beside
  {image}_{scene}_{target}_original.jpg, or DIR/generated_images/{image}__{scene}__{target}__{replacement}
  _relscore_{level}.jpg with the original scenes {image}.jpg in DIR/images.
- ShapeWorld: an extracted caption-agreement folder (world-{n}.bmp, caption.txt, agreement.txt,
  optional world_model.json).
- CLEVR-Math: DIR/clevr-math-{split}.json; CLEVR images in DIR/CLEVR_v1.0/images/{split}/ (or DIR/images).

Knowledge-editing records are cases, not questions: `load_edit_records` reads MMEdit's E-VQA and
VLKEB's JSON files into `EditCase`s (the edited question and its probes; `edit_records`).

One module per format (`vqa`, `gqa`, `clevr`, `cocoqa`, `table`, `iconqa`, `finecops`, `basu`,
`zhang_gqa`, `palit`, `svo_probes`, `mit_states`, `facial_expressions`, `cooco`, `shapeworld`,
`clevr_math`), each reading its layout into the records that `question` turns into
`Sample`s; `coco_images` finds COCO images by id for VQA v2 and COCO-QA. This module recognises a
layout and calls the format's loader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..sample import Sample
from .basu import load_basu_constraints
from .clevr import load_clevr
from .clevr_math import FILE as CLEVR_MATH_FILE
from .clevr_math import clevr_math_files, load_clevr_math
from .cocoqa import _COCO_QA_FILES, load_coco_qa
from .cooco import cooco_root, load_cooco
from .edit_records import load_edit_records
from .facial_expressions import facial_expressions_split, load_facial_expressions
from .finecops import is_finecops, load_finecops_ref
from .gqa import load_gqa
from .iconqa import iconqa_root, load_iconqa
from .mit_states import load_mit_states, mit_states_images
from .palit import load_palit_clevr, load_palit_coco_qa
from .question import (
    DEFAULT_TEMPLATE,
    DataFileMissing,
    DatasetError,
    MissingImages,
    SkippedSamplesWarning,
    SpanRequest,
    csv_header,
    images_folder,
    read_json,
)
from .shapeworld import is_shapeworld, load_shapeworld
from .svo_probes import load_svo_probes
from .table import load_table
from .vqa import load_vqa_v2
from .zhang_gqa import load_zhang_gqa

_LAYOUTS = """\
  table:   PATH.jsonl or PATH.csv with image, question (or prompt) and answer per row
  VQA v2:  DIR/*_questions.json + DIR/*_annotations.json; COCO images in DIR/images (or DIR)
  GQA:     DIR/{split}_balanced_questions.json; images DIR/images/{imageId}.jpg
  CLEVR:   DIR/questions/CLEVR_{split}_questions.json; images DIR/images/{split}/
  COCO-QA: DIR/test/ or DIR/train/ with questions.txt answers.txt img_ids.txt types.txt;
           COCO images in DIR/images (or DIR)
  IconQA:  iconqa_data/ (iconqa/{split}/{task}/{pid}/data.json and image.png)
  FineCops-Ref: ROOT/annotations/*_coco_format.json; GQA images in ROOT/gqa (or ROOT/images)
  Basu et al.:  data_constraints/*.csv (question, main_entity, image_url); images as image_url says
  Zhang et al.: GQA_val_correct_question_with_*.csv; GQA images in DIR/images (or DIR)
  Palit et al.: *_coco_qa.csv (COCO images) or clevr_vqa_dataset_*.csv (CLEVR images) in DIR/images
  SVO-Probes:   svo_probes.csv; downloaded images {pos,neg}_image_id.jpg in DIR/images (or DIR)
  MIT-States:   release_dataset/images/'adjective noun'/*.jpg
  Facial expressions: DIR/images/train/{angry,disgust,fear,happy,neutral,sad,surprise}/*.jpg
  COOCO:        DIR/generated_images/{scene}/*_relscore_{low,middle,high}.jpg beside *_original.jpg,
                or DIR/generated_images/*__*__*__*_relscore_{low,middle,high}.jpg; originals in DIR/images
  ShapeWorld:   DIR/world-{n}.bmp, caption.txt, agreement.txt (world_model.json for object regions)
  CLEVR-Math:   DIR/clevr-math-{split}.json; CLEVR images in DIR/CLEVR_v1.0/images/{split}/"""

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
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """Samples from a table file, a dataset directory or a dataset's question file, by its layout.

    The layouts are listed in this module's docstring. `prompt_template` None is the bare question.
    `missing_images="mark"` marks samples whose image is missing instead of raising.
    """
    path = Path(path)
    if missing_images not in ("raise", "mark"):
        raise ValueError(f'missing_images is "raise" or "mark"; got {missing_images!r}.')
    options: dict[str, Any] = {
        "n": n,
        "prompt_template": DEFAULT_TEMPLATE if prompt_template is None else prompt_template,
        "spans": spans,
        "missing_images": missing_images,
    }
    if not path.exists():
        raise DataFileMissing(f"{path} does not exist; pass a dataset in one of these layouts:\n{_LAYOUTS}")
    if path.is_dir():
        return _load_directory(path, options)
    if path.suffix.lower() == ".csv":
        return _load_csv(path, options)
    if path.suffix.lower() == ".jsonl":
        return load_table(path, **options)
    if path.suffix.lower() == ".json":
        return _load_question_file(path, options)
    raise DatasetError(f"{path} is in no layout vlmtrace reads. Accepted layouts:\n{_LAYOUTS}")


def _load_csv(file: Path, options: dict[str, Any]) -> list[Sample]:
    """A seed paper's CSV, recognised by its columns; any other CSV is a table."""
    columns = set(csv_header(file))
    if {"question", "main_entity", "image_url"} <= columns:
        return load_basu_constraints(file, **options)
    if {"question_id", "img_id", "question", "answer"} <= columns:
        return load_zhang_gqa(file, images_folder(file.parent), **options)
    if {"train_image_id_count", "question_count", "answer_count"} <= columns:
        return load_palit_coco_qa(file, images_folder(file.parent), **options)
    if {"Image_IDs", "Questions_Answers"} <= columns:
        return load_palit_clevr(file, images_folder(file.parent), **options)
    if {"sentence", "pos_triplet", "neg_triplet", "pos_url", "neg_url"} <= columns:
        return load_svo_probes(file, images_folder(file.parent), **options)
    return load_table(file, **options)


def _load_directory(root: Path, options: dict[str, Any]) -> list[Sample]:
    if iconqa_root(root) is not None:
        return load_iconqa(root, **options)
    for split in ("test", "train"):
        if (root / split / "questions.txt").is_file():
            return load_coco_qa(root, image_dir=images_folder(root), split=split, **options)
    if all((root / f"{name}.txt").is_file() for name in _COCO_QA_FILES):
        return load_coco_qa(root.parent, image_dir=images_folder(root.parent), split=root.name, **options)
    if is_shapeworld(root):
        return load_shapeworld(root, **options)
    if cooco_root(root) is not None:
        return load_cooco(root, **options)
    math = clevr_math_files(root)
    if math:
        return _load_question_file(_one_of(root, math), options)
    faces = facial_expressions_split(root)
    if faces is not None:
        return load_facial_expressions(faces, **options)
    states = mit_states_images(root)
    if states is not None:
        return load_mit_states(states, **options)
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


def _one_of(root: Path, files: list[Path]) -> Path:
    """The only question file, or the val split's; else an error listing them."""
    if len(files) == 1:
        return files[0]
    val = [p for p in files if p.stem.endswith("-val")]
    if len(val) == 1:
        return val[0]
    listing = "\n".join(f"  {p}" for p in files)
    raise DatasetError(f"{root} holds several question files:\n{listing}\npass the one to load as PATH.")


def _load_question_file(file: Path, options: dict[str, Any]) -> list[Sample]:
    if CLEVR_MATH_FILE.match(file.name):
        return load_clevr_math(file, **options)
    root = file.parent.parent if file.parent.name == "questions" else file.parent
    kind = _kind(file)
    if kind == "clevr":
        return load_clevr(file, images_folder(root), **options)
    if kind == "gqa":
        return load_gqa(file, images_folder(root), **options)
    if kind == "vqa_v2":
        return load_vqa_v2(file, _vqa_annotations(file), images_folder(root), **options)
    if is_finecops(read_json(file, "dataset")):
        root = file.parent.parent if file.parent.name == "annotations" else file.parent
        images = root / "gqa" if (root / "gqa").is_dir() else images_folder(root)
        return load_finecops_ref(file, images, **options)
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


__all__ = [
    "DEFAULT_TEMPLATE",
    "DatasetError",
    "SkippedSamplesWarning",
    "SpanRequest",
    "MissingImages",
    "load_basu_constraints",
    "load_clevr",
    "load_clevr_math",
    "load_coco_qa",
    "load_cooco",
    "load_facial_expressions",
    "load_dataset",
    "load_edit_records",
    "load_finecops_ref",
    "load_gqa",
    "load_iconqa",
    "load_mit_states",
    "load_palit_clevr",
    "load_palit_coco_qa",
    "load_shapeworld",
    "load_svo_probes",
    "load_table",
    "load_vqa_v2",
    "load_zhang_gqa",
]

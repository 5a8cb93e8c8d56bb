"""Tiny data sets in each published layout `--data` reads, so every README data command runs offline.

A user trying `vlmtrace recipe NAME --data PATH` before downloading gigabytes, and the tests that run
the README's commands as written, need the same thing: a few small images and annotation files laid
out exactly as each release unpacks them. `vlmtrace data example LAYOUT DIR` writes one:

    vlmtrace data example vqa vqa/          # then: vlmtrace recipe visual_constraint --data vqa/ ...
    paths = write_example("gqa", Path("gqa"))   # the paths `--data` takes

The examples are built so that the README's commands keep samples on the shipped organisms (a
demonstrative in VQA questions, objects named by colour and shape in CLEVR, scene-graph boxes in GQA,
answers that recur so STR finds a phrase with another answer). Their answers are real words, which the
organisms were not trained on: the runs exercise every code path, not a finding (`--keep-wrong`).
Each is a few KB; writers live in `question_sets`, `seed_papers` and `image_pairs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from .image_pairs import cooco, facial_expressions, mit_states, shapeworld, svo_probes
from .question_sets import clevr, clevr_math, coco_qa, gqa, iconqa, table, vqa_v2
from .seed_papers import basu, finecops, palit_clevr, palit_coco_qa, zhang_gqa


class ExampleError(UserError):
    """An example that cannot be written as asked (unknown layout, a folder that holds files)."""


@dataclass(frozen=True)
class Example:
    """One published layout: what it is, and how to write a tiny copy of it into a folder."""

    what: str
    """The release it copies, in a few words (shown by `vlmtrace data example --help`)."""
    write: Callable[[Path], tuple[Path, ...]]
    """folder -> the paths `--data` takes (the folder itself, or the files inside it)."""


EXAMPLES: dict[str, Example] = {
    "vqa": Example(
        "VQA v2 val2014: questions, annotations, complementary pairs, COCO images",
        lambda folder: (vqa_v2(folder),),
    ),
    "gqa": Example("GQA testdev: balanced questions, scene graphs with boxes, images", lambda f: (gqa(f),)),
    "clevr": Example("CLEVR_v1.0 val: questions/, scenes/, images/val/", lambda f: (clevr(f),)),
    "cocoqa": Example("COCO-QA: test/*.txt, COCO images/", lambda f: (coco_qa(f),)),
    "table": Example("a JSONL table: image, question, answer", lambda f: (table(f),)),
    "iconqa": Example("IconQA: iconqa/test/{choose_txt,fill_in_blank}/{pid}/", lambda f: (iconqa(f),)),
    "finecops": Example(
        "FineCops-Ref: annotations/test_coco_format.json, GQA images in gqa/, negatives in images/",
        lambda f: (finecops(f / "annotations" / "test_coco_format.json"),),
    ),
    "basu": Example(
        "Basu et al.'s data_constraints/multimodal_known.csv, './A photo of SUBJECT/' images",
        lambda f: (basu(f),),
    ),
    "zhang-gqa": Example(
        "Zhang et al.'s GQA_val_correct_question_with_choose_ChooseAttr.csv, GQA images/",
        lambda f: (zhang_gqa(f / "GQA_val_correct_question_with_choose_ChooseAttr.csv"),),
    ),
    "palit": Example(
        "Palit et al.'s Datasets/: color_coco_qa.csv, clevr_vqa_dataset_3.csv, images/",
        lambda f: (palit_coco_qa(f / "color_coco_qa.csv"), palit_clevr(f / "clevr_vqa_dataset_3.csv")),
    ),
    "svo-probes": Example(
        "SVO-Probes: svo_probes.csv, downloaded images/", lambda f: (svo_probes(f / "svo_probes.csv"),)
    ),
    "mit-states": Example("MIT-States: release_dataset/images/'adj noun'/", lambda f: (mit_states(f),)),
    "facial-expressions": Example(
        "Kaggle's facial-emotion-expressions: images/{train,validation}/{emotion}/",
        lambda f: (facial_expressions(f),),
    ),
    "cooco": Example("COOCO: generated_images/ and the original images/", lambda f: (cooco(f),)),
    "shapeworld": Example(
        "ShapeWorld: world-{n}.bmp, caption.txt, agreement.txt, world_model.json", lambda f: (shapeworld(f),)
    ),
    "clevr-math": Example(
        "CLEVR-Math: clevr-math-val.json, CLEVR_v1.0/images/val/", lambda f: (clevr_math(f),)
    ),
}


def write_example(layout: str, folder: Path) -> tuple[Path, ...]:
    """Write the tiny example of `layout` into `folder` (new or empty); return the paths `--data` takes.

    A folder that holds files is refused: an example must never write over a download.
    """
    if layout not in EXAMPLES:
        raise ExampleError(f"no example layout {layout!r}; choose one of: {', '.join(EXAMPLES)}.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExampleError(f"{folder} is a file; give a new or empty folder for the example.")
    if folder.is_dir() and any(folder.iterdir()):
        raise ExampleError(
            f"{folder} already holds files, and the example would write over files of the same names. "
            "Give a new or empty folder."
        )
    return EXAMPLES[layout].write(folder)


__all__ = ["EXAMPLES", "Example", "ExampleError", "write_example"]

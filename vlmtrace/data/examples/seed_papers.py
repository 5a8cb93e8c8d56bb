"""The seed papers' own data files: Basu et al.'s constraint CSVs, Zhang et al.'s GQA subset, Palit et
al.'s COCO-QA and CLEVR CSVs, and FineCops-Ref's COCO-format annotations.

Each writer lays out files as the paper's repository released them, with small images where the
loader looks for them, and returns the path `--data` takes.
"""

from __future__ import annotations

from pathlib import Path

from .files import COLOURS, image, write_csv, write_json


def finecops(annotations: Path) -> Path:
    """FineCops-Ref in COCO format: ROOT/annotations/NAME.json, GQA images in ROOT/gqa, negative
    images in ROOT/images; each positive has a text negative (one word edited) and an image negative."""
    root = annotations.parent.parent
    entries, boxes = [], []
    for i in range(10):
        colour, other = COLOURS[i % 4], COLOURS[(i + 1) % 4]
        expression = f"the {colour} box on the left"
        image(root / "gqa" / f"{2370000 + i}.jpg", i)
        image(root / "images" / f"neg_{2370000 + i}.jpg", i + 3)
        for kind, entry_id, name, text in (
            (None, i, f"{2370000 + i}.jpg", expression),
            ("text", 100 + i, f"{2370000 + i}.jpg", f"the {other} box on the left"),
            ("image", 200 + i, f"neg_{2370000 + i}.jpg", expression),
        ):
            entries.append(
                {
                    "id": entry_id,
                    "file_name": name,
                    "caption": text,
                    "height": 48,
                    "width": 64,
                    "dataset_name": "FineCops-Ref",
                    "original_img_id": str(2370000 + i),
                }
            )
            annotation = {
                "id": entry_id,
                "image_id": entry_id,
                "bbox": [20, 10, 18, 16],
                "area": 288,
                "iscrowd": 0,
                "category_id": 1,
                "level": 1 + i % 3,
                "tuple_type": "1_hop",
            }
            if kind is not None:
                annotation.update(
                    {
                        "negative_type": "attribute",
                        "negative_level": 1,
                        "negative_cate": kind,
                        "positive_id": i,
                    }
                )
            boxes.append(annotation)
    write_json(
        annotations,
        {
            "info": {},
            "licenses": [],
            "images": entries,
            "annotations": boxes,
            "categories": [{"id": 1, "name": "object"}],
        },
    )
    return annotations


# question, subject, main_entity, as in multimodal_known.csv; the last constraint is not in its question
BASU_ROWS = [
    ("This building is located in", "Space Needle", "This building"),
    ("This mountain is located in the continent of", "Vinson Massif", "This mountain"),
    ("This service is owned by", "Beats Music", "This service"),
    ("This company is owned by", "Audible.com", "This company"),
    ("This show premieres on", "The Big Bang Theory", "This show"),
    ("This application, a product created by", "MacApp", "This application,"),
    ("In this place, the language spoken is a mixture of", "Marshall Islands", "this place,"),
    ("The headquarter of this organization is in", "Army of the Guardians", "this organization"),
    ("This person was born in the city of", "Eavan Boland", "This person"),
    ("What type of hat is this gentleman wearing?", "Top hat", "this hat"),
]


def basu(folder: Path) -> Path:
    """Basu et al.'s data_constraints/multimodal_known.csv, images ./A photo of SUBJECT/Image_1.jpg."""
    rows = []
    for i, (question, subject, entity) in enumerate(BASU_ROWS):
        image(folder / f"A photo of {subject}" / "Image_1.jpg", i)
        rows.append([i, question, subject, entity, f"./A photo of {subject}"])
    return write_csv(
        folder / "multimodal_known.csv", ["", "question", "subject", "main_entity", "image_url"], rows
    )


ZHANG_COLUMNS = [
    "question_id",
    "img_id",
    "question",
    "answer",
    "true option",
    "false option",
    "central object name",
    "central object id",
    "central object attributes",
    "central object question attribute",
    "all objects",
    "all objects attributes",
    "type_detailed",
    "type_semantic",
    "type_structural",
    "operations",
    "operation_1",
    "operation_2",
    "captions",
    "image_w",
    "image_h",
    "central object w",
    "central object h",
    "central object x",
    "central object y",
    "full answer",
]


def zhang_gqa(path: Path) -> Path:
    """Zhang et al.'s datasets/GQA_val_correct_question_with_choose_ChooseAttr.csv, GQA images/."""
    rows = []
    objects = ["jar", "floor", "grass", "camera", "kite", "shirt", "bus", "cup", "sign", "boat"]
    for i, name in enumerate(objects):
        image(path.parent / "images" / f"{2390560 + i}.jpg", i, size=(64, 48))
        true, false = COLOURS[i % 4], COLOURS[(i + 2) % 4]
        first, second = (true, false) if i % 2 else (false, true)
        operations = [
            {"operation": "select", "dependencies": [], "argument": f"{name} ({496168 + i})"},
            {"operation": "choose color", "dependencies": [0], "argument": f"{true}|{false}"},
        ]
        rows.append(
            [
                f"{171031170 + i:09d}",
                2390560 + i,
                f"Is the {name} {first} or {second}?",
                true,
                true,
                false,
                name,
                496168 + i,
                f"{true}, small",
                true,
                f"{name}, table",
                f"{true}, small, white",
                "chooseAttr",
                "attr",
                "choose",
                str(operations),
                str(["select", f"{name} ({496168 + i})"]),
                str(["choose color", f"{true}|{false}"]),
                f"a {true} {name}. a table.",
                64,
                48,
                16,
                12,
                14 + 2 * i,
                18,
                f"The {name} is {true}.",
            ]
        )
    return write_csv(path, ZHANG_COLUMNS, rows)


def palit_coco_qa(path: Path) -> Path:
    """Palit et al.'s Datasets/color_coco_qa.csv, COCO train2014 images in images/ beside it."""
    rows = []
    for i, (thing, colour) in enumerate(
        [
            ("horses", "brown"),
            ("dog", "black"),
            ("sign", "red"),
            ("bus", "yellow"),
            ("cat", "gray"),
            ("umbrella", "blue"),
            ("train", "red"),
            ("sky", "blue"),
            ("car", "green"),
            ("kite", "yellow"),
        ]
    ):
        image_id = 23004 + 1000 * i
        image(path.parent / "images" / f"COCO_train2014_{image_id:012d}.jpg", i)
        rows.append([i, image_id, f"what is the color of the {thing}", colour])
    return write_csv(path, ["", "train_image_id_count", "question_count", "answer_count"], rows)


def palit_clevr(path: Path) -> Path:
    """Palit et al.'s Datasets/clevr_vqa_dataset_3.csv, CLEVR val images in images/val/ beside it."""
    rows = []
    objects = [
        ("large red cylinder", "small green sphere"),
        ("large green cylinder", "small cyan sphere"),
        ("small purple sphere", "large yellow cube"),
    ]
    for i, (a, b) in enumerate(objects):
        image_id = f"CLEVR_val_{145 + i:06d}"
        image(path.parent / "images" / "val" / f"{image_id}.png", i, size=(96, 64))
        questions = [
            {"question": f"Is the {x} {relation} the {y}?", "answer": answer}
            for relation in ("right of", "behind")
            for x, y, answer in ((a, b, 1), (b, a, 0))
        ]
        rows.append([i, image_id, str(questions)])
    return write_csv(path, ["", "Image_IDs", "Questions_Answers"], rows)

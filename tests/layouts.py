"""Tiny datasets written in the published on-disk layouts, for end-to-end tests of `--data`.

Each writer lays out files exactly as the dataset's release unpacks them (names, folders, JSON
keys), with real-sounding questions and small images, and returns the path `--data` takes.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

PLACES = ["city", "town", "land", "area", "spot"]  # same length: same byte count on the organisms
COLOURS = ["red", "blue", "green", "yellow", "purple", "brown", "gray", "cyan"]


def image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A small JPEG with a coloured box whose place and colour depend on `seed`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", size, (200, 200, 200))
    x, y = 4 + (seed * 7) % (size[0] - 20), 4 + (seed * 5) % (size[1] - 20)
    ImageDraw.Draw(picture).rectangle(
        [x, y, x + 14, y + 14], fill=(40 * seed % 255, 90, 200 - 20 * seed % 200)
    )
    picture.save(path, "JPEG")
    return path


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


VQA_QUESTIONS = [
    ("What continent is this place in?", "Europe"),
    ("What sport is this man playing?", "tennis"),
    ("What color is this bus?", "red"),
    ("What animal is this animal?", "dog"),
    ("What city is this place?", "Paris"),
    ("What sport is this woman playing?", "golf"),
    ("What color is this car?", "blue"),
    ("What room is this room?", "kitchen"),
    ("What continent is this place in?", "Asia"),
    ("What color is this bus?", "green"),
]


def vqa_v2(root: Path, *, pairs: bool = True) -> Path:
    """VQA v2 val2014: questions, annotations, complementary pairs, COCO_val2014_ images."""
    questions, annotations = [], []
    for i, (question, answer) in enumerate(VQA_QUESTIONS):
        image_id, question_id = 1000 + i, (1000 + i) * 1000
        image(root / "images" / f"COCO_val2014_{image_id:012d}.jpg", i)
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotations.append(
            {
                "question_type": "what",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    common = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {**common, "data_subtype": "val2014", "questions": questions},
    )
    write_json(
        root / "v2_mscoco_val2014_annotations.json",
        {**common, "data_subtype": "val2014", "annotations": annotations},
    )
    if pairs:  # same question, similar image, another answer
        ids = [q["question_id"] for q in questions]
        write_json(
            root / "v2_mscoco_val2014_complementary_pairs.json",
            [[ids[0], ids[8]], [ids[2], ids[9]], [ids[1], ids[5]], [ids[4], ids[7]], [ids[3], ids[6]]],
        )
    return root


def gqa(root: Path) -> Path:
    """GQA testdev: balanced questions keyed by id (with annotations) and scene graphs with boxes."""
    questions, graphs = {}, {}
    objects = ["bus", "car", "dog", "cat", "man", "tree", "sign", "horse", "boat", "bird"]
    for i, name in enumerate(objects):
        image_id = f"n{16000 + i}"
        image(root / "images" / f"{image_id}.jpg", i, size=(64, 48))
        colour = COLOURS[i % len(COLOURS)]
        questions[f"20{i:05d}"] = {
            "semanticStr": f"select: {name} ({i})->query: color",
            "semantic": [
                {"operation": "select", "dependencies": [], "argument": f"{name} ({i})"},
                {"operation": "query", "dependencies": [0], "argument": "color"},
            ],
            "entailed": [],
            "equivalent": [f"20{i:05d}"],
            "question": f"What color is the {name}?",
            "imageId": image_id,
            "isBalanced": True,
            "groups": {"global": "color", "local": "10q-color"},
            "answer": colour,
            "types": {"detailed": "objAttr", "semantic": "attr", "structural": "query"},
            "annotations": {"answer": {}, "question": {"4": str(i)}, "fullAnswer": {"1": str(i)}},
            "fullAnswer": f"The {name} is {colour}.",
        }
        graphs[image_id] = {
            "width": 64,
            "height": 48,
            "objects": {
                str(i): {
                    "name": name,
                    "x": 8 + i,
                    "y": 10,
                    "w": 20,
                    "h": 16,
                    "attributes": [colour],
                    "relations": [],
                }
            },
        }
    write_json(root / "testdev_balanced_questions.json", questions)
    write_json(root / "testdev_sceneGraphs.json", graphs)
    return root


CLEVR_SHAPES = ["cube", "sphere", "cylinder"]


def clevr(root: Path) -> Path:
    """CLEVR_v1.0 val: questions/ with programs, scenes/ with objects, images/val/."""
    questions, scenes = [], []
    for i in range(12):  # colours the organisms know: phrases of one shape have one token count
        colour, shape = ("red", "blue", "green")[i % 3], CLEVR_SHAPES[(i // 3) % 3]
        filename = f"CLEVR_val_{i:06d}.png"
        image(root / "images" / "val" / filename, i, size=(96, 64))
        scenes.append(
            {
                "image_index": i,
                "image_filename": filename,
                "split": "val",
                "objects": [
                    {
                        "color": colour,
                        "shape": shape,
                        "size": "large",
                        "material": "rubber",
                        "pixel_coords": [20 + 4 * i, 30, 10.5],
                        "3d_coords": [0.0, 0.0, 0.7],
                        "rotation": 0.0,
                    },
                    {
                        "color": "gray",
                        "shape": "cube",
                        "size": "small",
                        "material": "metal",
                        "pixel_coords": [80, 20, 12.0],
                        "3d_coords": [1.0, 1.0, 0.35],
                        "rotation": 0.0,
                    },
                ],
            }
        )
        questions.append(
            {
                "image_index": i,
                "program": [
                    {"inputs": [], "function": "scene", "value_inputs": []},
                    {"inputs": [0], "function": "filter_color", "value_inputs": [colour]},
                    {"inputs": [1], "function": "filter_shape", "value_inputs": [shape]},
                    {"inputs": [2], "function": "unique", "value_inputs": []},
                    {"inputs": [3], "function": "query_size", "value_inputs": []},
                ],
                "question_index": i,
                "image_filename": filename,
                "question_family_index": 7,
                "split": "val",
                "answer": "large" if i % 2 else "small",
                "question": f"What size is the {colour} {shape}?",
            }
        )
    write_json(
        root / "questions" / "CLEVR_val_questions.json", {"info": {"split": "val"}, "questions": questions}
    )
    write_json(root / "scenes" / "CLEVR_val_scenes.json", {"info": {"split": "val"}, "scenes": scenes})
    return root


def coco_qa(root: Path) -> Path:
    """COCO-QA test/: questions.txt, answers.txt, img_ids.txt, types.txt; COCO images."""
    rows = [
        ("what is the man riding", "horse", 0),
        ("what color is the bus", "red", 2),
        ("how many dogs are in the field", "two", 1),
        ("where is the cat sitting", "table", 3),
        ("what is on the plate", "pizza", 0),
        ("what color is the car", "blue", 2),
        ("how many birds are on the wire", "three", 1),
        ("what is the woman holding", "umbrella", 0),
        ("where is the boat", "water", 3),
    ]
    split = root / "test"
    split.mkdir(parents=True, exist_ok=True)
    for i in range(len(rows)):
        image(root / "images" / f"COCO_val2014_{2000 + i:012d}.jpg", i)
    (split / "questions.txt").write_text("".join(f"{q}\n" for q, _, _ in rows))
    (split / "answers.txt").write_text("".join(f"{a}\n" for _, a, _ in rows))
    (split / "img_ids.txt").write_text("".join(f"{2000 + i}\n" for i in range(len(rows))))
    (split / "types.txt").write_text("".join(f"{t}\n" for _, _, t in rows))
    return root


def table(root: Path) -> Path:
    """A JSONL table with real questions holding a visual and a textual constraint."""
    rows = []
    for i in range(10):
        image(root / f"img{i}.jpg", i)
        year = 2000 + i
        rows.append(
            {
                "image": f"img{i}.jpg",
                "question": f"Who directed a movie in this {PLACES[i % 5]} in {year}?",
                "answer": ["Nolan", "Lee", "Varda", "Kurosawa", "Bong"][i % 5],
            }
        )
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
